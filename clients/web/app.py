"""The mdp-web ASGI application: the REST API, the pages, `/metrics`, behind one guard.

    app = create_app(Backend(Client(endpoint)), Guard.for_bind(token, "127.0.0.1"))

`GuardMiddleware` runs before any route (see `clients.web.security` for the why of each check):
1. a `Host` that is not on the allow-list: 400;
2. an unsafe method (POST) from a foreign `Origin`: 403;
3. no valid Bearer token and no valid session cookie: 401 (JSON for /api and /metrics, the
   login page otherwise), except for /login and /static;
4. an unsafe method authenticated by the cookie needs the CSRF token: in the `X-CSRF-Token`
   header (scripts; checked here) or in the form's `csrf_token` field (pages; checked by
   `clients.web.ui.read_form` before anything else reads the form).
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients.web import api, ui
from clients.web.backend import Backend
from clients.web.metrics import WebMetrics
from clients.web.security import COOKIE, CSRF_HEADER, Guard
from mdp import __version__

__all__ = ["create_app"]

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PREFIXES: Final = ("/static/", "/login", "/favicon.ico")
DOCS_ASSETS: Final = "/api/v1/docs/assets"
CSP: Final = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
CSP_DOCS: Final = CSP.replace(b"script-src 'self'", b"script-src 'self' 'unsafe-inline'")
API_DESCRIPTION = """\
The REST API of the MDP web console: services and workers (MMI), jobs (the job services of
spec/jobs.md), their output, and live output as Server-Sent Events.

Authenticate with `Authorization: Bearer TOKEN` (the token mdp-web prints at start, or the one
in its --token-file). Byte values (stdout, stderr, output chunks) are strings when they are
valid UTF-8 and `{"base64": "..."}` otherwise.
"""


class GuardMiddleware:
    """The checks of the module docstring, as plain ASGI (streaming responses pass through)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = self.guard
        request = Request(scope)
        headers = request.headers
        path: str = scope["path"]
        if not guard.host_allowed(headers.get("host")):
            await _plain(400, "Host not allowed: open the console by the address it printed")(
                scope, receive, send
            )
            return
        unsafe = scope["method"] not in SAFE_METHODS
        if unsafe and not guard.origin_allowed(headers.get("origin")):
            await _refuse(path, 403, "cross-origin request refused")(scope, receive, send)
            return
        auth, sid = None, None
        if guard.bearer_valid(headers.get("authorization")):
            auth = "bearer"
        else:
            sid = guard.session_id(request.cookies.get(COOKIE))
            if sid is not None:
                auth = "session"
        state = scope.setdefault("state", {})
        state["auth"], state["sid"] = auth, sid
        state["csrf"] = guard.csrf_token(sid) if sid is not None else ""
        public = path.startswith(PUBLIC_PREFIXES)
        if auth is None and not public:
            if _is_api(path):
                response: Response = JSONResponse(
                    {"detail": "authentication required: Authorization: Bearer TOKEN"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="mdp-web"'},
                )
            else:
                response = ui.login_page(request, status_code=401, next_path=path)
            await response(scope, receive, send)
            return
        if unsafe and auth == "session" and not public:
            header = headers.get(CSRF_HEADER)
            if header is not None or _is_api(path):
                if sid is None or not guard.csrf_valid(sid, header):
                    await _refuse(path, 403, "missing or wrong CSRF token")(scope, receive, send)
                    return
                state["csrf_checked"] = True
        await self.app(scope, receive, _with_headers(send, path))


def _with_headers(send: Send, path: str) -> Send:
    """Add the security headers to every response: no framing (a cancel button under someone
    else's page), no referrer to other sites (the login URL carries the token; "no-referrer"
    would make browsers send `Origin: null` on our own posts), and a content policy that
    lets pages run only our own script (Swagger UI needs its one inline script)."""
    policy = CSP_DOCS if path == "/api/v1/docs" else CSP
    extra = [
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", policy),
    ]

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return wrapped


def _is_api(path: str) -> bool:
    return path.startswith("/api/") or path == "/metrics"


def _plain(status: int, message: str) -> Response:
    return Response(message + "\n", status_code=status, media_type="text/plain")


def _refuse(path: str, status: int, message: str) -> Response:
    if _is_api(path):
        return JSONResponse({"detail": message}, status_code=status)
    return _plain(status, message)


def create_app(backend: Backend, guard: Guard) -> FastAPI:
    """The application: `backend` reaches the broker, `guard` decides who may use it."""
    app = FastAPI(
        title="mdp-web",
        version=__version__,
        description=API_DESCRIPTION,
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    # Swagger UI 4 (swagger-ui-bundle, served locally) renders OpenAPI 3.0 documents only; what
    # FastAPI writes here is valid 3.0 but for `type: null` in optional fields, which it shows.
    app.openapi_version = "3.0.3"
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.backend = backend
    app.state.guard = guard
    app.state.metrics = WebMetrics()
    app.include_router(api.router)
    app.include_router(ui.router)
    static = resources.files("clients.web") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    _docs(app)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body = await request.app.state.metrics.render(request.app.state.backend)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:] if p != "CommandSpec") or "body"
        return JSONResponse(
            {
                "detail": f"{where}: {first['msg']}",
                "errors": jsonable_encoder(errors),
            },
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _is_api(request.url.path):
            return JSONResponse(
                {"detail": exc.detail, "errors": []},
                status_code=exc.status_code,
                headers=getattr(exc, "headers", None),
            )
        return ui.error_page(request, exc.status_code, str(exc.detail))

    app.add_middleware(GuardMiddleware, guard=guard)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, saying that every operation takes the Bearer token (so the API
    page has an "Authorize" button)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
        )
        schema.setdefault("components", {})["securitySchemes"] = {
            "token": {"type": "http", "scheme": "bearer", "description": "mdp-web's token"}
        }
        schema["security"] = [{"token": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def _docs(app: FastAPI) -> None:
    """The interactive API page (Swagger UI), served from the swagger-ui-bundle package: no
    CDN, so it works offline and leaks nothing."""
    try:
        from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the [web] extra installs it
        return
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/api/v1/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/api/v1/openapi.json",
            title="mdp-web API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )
