"""The console's pages: server-rendered HTML (Jinja2, autoescaped) and one small script.

Pages work without JavaScript (forms post, links page); `static/app.js` adds live output on the
job page (an EventSource on /api/v1/jobs/{id}/events) and nothing else. Every value a command
or a worker produced is escaped by the templates or inserted as text by the script: output that
says `<script>` shows those characters.
"""

from __future__ import annotations

import datetime as dt
import shlex
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from clients.commands import CommandSpec
from clients.web.api import find_jobs, job_host, known_job, request_body, rerun
from clients.web.backend import JOB_STATES, TERMINAL_STATES, Backend, BackendError
from clients.web.metrics import worker_busy
from clients.web.output import as_text
from clients.web.security import COOKIE, CSRF_FIELD, Guard

__all__ = ["error_page", "login_page", "read_form", "router"]

PAGE_SIZE: Final = 25
JOB_SERVICE_PREFIXES: Final = ("jobs.", "titanic.")
MAX_FORM: Final = 256 * 1024

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(resources.files("clients.web") / "templates"))


def _when(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    moment = dt.datetime.fromtimestamp(value, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(job: dict[str, Any]) -> str:
    start, end = job.get("started") or job.get("created"), job.get("finished")
    if not isinstance(start, int | float) or not isinstance(end, int | float):
        return ""
    seconds = max(0.0, end - start)
    return f"{seconds:.2f} s" if seconds < 60 else f"{seconds // 60:.0f} min {seconds % 60:.0f} s"


def command_line(request: Any, service: str = "") -> str:
    """A command request as one line, as a user would type it (`CommandSpec.display`)."""
    if not isinstance(request, dict) or not isinstance(request.get("command_name"), str):
        return ""
    params = [p if isinstance(p, str) else "…" for p in request.get("parameters") or []]
    if service.split("@", 1)[0] == "shell":  # the shell reads command_name as a script
        return " ".join([request["command_name"], *map(shlex.quote, params)])
    return shlex.join([request["command_name"], *params])


templates.env.filters["when"] = _when
templates.env.globals.update(
    JOB_STATES=JOB_STATES,
    TERMINAL_STATES=TERMINAL_STATES,
    command_line=command_line,
    duration=_duration,
    job_host=job_host,
    worker_busy=worker_busy,
)


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page, with what every page needs (the CSRF token, the active tab)."""
    context.setdefault("csrf", request.state.csrf if hasattr(request.state, "csrf") else "")
    context.setdefault("signed_in", getattr(request.state, "auth", None) is not None)
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def login_page(
    request: Request, status_code: int = 200, next_path: str = "/", message: str = ""
) -> HTMLResponse:
    """The page that asks for the token (also the answer to any page without a session)."""
    return render(request, "login.html", status_code, next_path=_local(next_path), message=message)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    return render(request, "error.html", status_code, status=status_code, message=message)


def _local(path: str) -> str:
    """Only same-site paths are followed after a login (no open redirect)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST, after its CSRF token was checked (403 otherwise)."""
    body = await request.body()
    if len(body) > MAX_FORM:
        raise HTTPException(413, "form too large")
    form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), True).items()}
    if request.state.auth == "session" and not getattr(request.state, "csrf_checked", False):
        guard: Guard = request.app.state.guard
        if not guard.csrf_valid(request.state.sid, form.get(CSRF_FIELD)):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
    return form


# ----------------------------------------------------------------------------------------------
# Login


@router.get("/login")
async def login(request: Request, token: str = "", next: str = "/") -> Response:
    """`/login?token=TOKEN`: the URL mdp-web prints. Sets the session cookie and redirects to
    the same page without the token in the address bar."""
    if not token:
        return login_page(request, next_path=next)
    return _sign_in(request, token, next)


@router.post("/login")
async def login_form(request: Request) -> Response:
    body = await request.body()
    form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    return _sign_in(request, form.get("token", "").strip(), form.get("next", "/"))


def _sign_in(request: Request, token: str, next_path: str) -> Response:
    guard: Guard = request.app.state.guard
    if not guard.token_valid(token):
        return login_page(request, 401, next_path, "That token is not the console's token.")
    response = RedirectResponse(_local(next_path), status_code=303)
    response.set_cookie(
        COOKIE,
        guard.new_session(),
        httponly=True,
        samesite="strict",
        secure=guard.secure_cookie,
        path="/",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    await read_form(request)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# ----------------------------------------------------------------------------------------------
# Pages


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request) -> Response:
    backend = backend_of(request)
    problems: list[str] = []
    services: list[Any] = []
    workers: list[dict[str, Any]] = []
    workers_available = False
    counts: dict[str, int] = {}
    try:
        services = await backend.services()
        found = await backend.workers()
        workers, workers_available = found.workers, found.available
    except BackendError as exc:
        problems.append(exc.message)
    try:
        counts = await backend.count_jobs()
    except BackendError as exc:
        problems.append(exc.message)
    job_services = [s for s in services if s.name.startswith(JOB_SERVICE_PREFIXES)]
    return render(
        request,
        "dashboard.html",
        tab="dashboard",
        services=[s for s in services if not s.name.startswith(JOB_SERVICE_PREFIXES)],
        job_services=job_services,
        workers=workers,
        workers_available=workers_available,
        counts=counts,
        problems=problems,
    )


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(
    request: Request,
    state: str = "",
    service: str = "",
    host: str = "",
    before: str = "",
) -> Response:
    backend = backend_of(request)
    states = [state] if state in JOB_STATES else []
    cursor = int(before) if before.isdigit() else None
    jobs: list[dict[str, Any]] = []
    next_cursor = None
    problems: list[str] = []
    try:
        page = await find_jobs(
            backend, states, service.strip() or None, host.strip() or None, cursor, PAGE_SIZE
        )
        jobs, next_cursor = page["jobs"], page["next"]
        if jobs:  # jobs.list leaves out the requests; one jobs.status brings the commands
            answer = await backend.call("jobs.status", {"ids": [j["id"] for j in jobs]})
            full = {j.get("id"): j for j in answer.get("jobs") or [] if isinstance(j, dict)}
            for job in jobs:
                job["request"] = full.get(job["id"], {}).get("request")
    except BackendError as exc:
        problems.append(exc.message)
    filters = {"state": state, "service": service, "host": host}
    older = None
    if next_cursor is not None and jobs:
        older = "/jobs?" + urlencode(
            {**{k: v for k, v in filters.items() if v}, "before": next_cursor}
        )
    return render(
        request,
        "jobs.html",
        tab="jobs",
        jobs=jobs,
        filters=filters,
        older=older,
        first_page=cursor is None,
        problems=problems,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str) -> Response:
    backend = backend_of(request)
    try:
        job = await known_job(backend, job_id)
    except BackendError as exc:
        return error_page(request, exc.status, exc.message)
    result: dict[str, Any] = {}
    if job.get("state") in TERMINAL_STATES:
        try:
            result = (await backend.result(job_id)).get("result") or {}
        except BackendError:
            result = {}
    message = result.get("message") or job.get("message") or ""
    return render(
        request,
        "job.html",
        tab="jobs",
        job=job,
        message=message,
        result_stdout=as_text(result.get("stdout")),
        result_stderr=as_text(result.get("stderr")),
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel_form(request: Request, job_id: str) -> Response:
    await read_form(request)
    try:
        await backend_of(request).cancel([job_id])
    except BackendError as exc:
        return error_page(request, exc.status, exc.message)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/rerun")
async def rerun_form(request: Request, job_id: str) -> Response:
    await read_form(request)
    try:
        answer = await rerun(backend_of(request), job_id)
    except BackendError as exc:
        return error_page(request, exc.status, exc.message)
    request.app.state.metrics.submitted.inc()
    return RedirectResponse(f"/jobs/{answer['id']}", status_code=303)


@router.get("/run", response_class=HTMLResponse)
async def run_page(request: Request, service: str = "shell", host: str = "") -> Response:
    return await _run_form(request, {"service": service, "host": host}, [])


async def _run_form(
    request: Request, values: dict[str, str], errors: list[str], status_code: int = 200
) -> Response:
    services: list[str] = []
    try:
        services = [
            s.name
            for s in await backend_of(request).services()
            if not s.name.startswith(JOB_SERVICE_PREFIXES) and "@" not in s.name
        ]
    except BackendError as exc:
        errors = [*errors, exc.message]
    for name in ("shell", "os"):
        if name not in services:
            services.append(name)
    return render(
        request,
        "run.html",
        status_code,
        tab="run",
        services=sorted(services),
        values=values,
        errors=errors,
    )


@router.post("/run")
async def run_submit(request: Request) -> Response:
    form = await read_form(request)
    service = form.get("service", "").strip()
    host = form.get("host", "").strip()
    entry: dict[str, Any] = {
        "command_type": f"{service}@{host}" if host else service,
        "command_name": form.get("command_name", "").strip(),
        "parameters": [line for line in form.get("parameters", "").splitlines() if line],
    }
    if form.get("timeout", "").strip():
        try:
            entry["timeout"] = float(form["timeout"])
        except ValueError:
            return await _run_form(request, form, ["timeout: not a number of seconds"], 422)
    if form.get("cwd", "").strip():
        entry["cwd"] = form["cwd"].strip()
    try:
        spec = CommandSpec.model_validate(entry)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'command'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        ]
        return await _run_form(request, form, problems, 422)
    try:
        answer = await backend_of(request).submit(spec.command_type, request_body(spec))
    except BackendError as exc:
        messages = [exc.message, *(f"{e.get('loc')}: {e.get('msg')}" for e in exc.errors)]
        return await _run_form(request, form, messages, exc.status)
    request.app.state.metrics.submitted.inc()
    return RedirectResponse(f"/jobs/{answer['id']}", status_code=303)
