"""The REST API of mdp-web (spec/api.md), over real HTTP against the real stack."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from clients.web.app import create_app
from clients.web.backend import Backend
from clients.web.security import Guard
from mdp.client import Client
from tests.integration.test_worker_harness import workers_of
from tests.support import (
    TEST_HEARTBEAT_MS,
    TEST_LIVENESS,
    Process,
    free_tcp_endpoint,
    script,
    start_broker,
    wait_until,
)
from tests.web.conftest import (
    Console,
    broker_has_insecure,
    printed_url,
    submit,
    wait_for_state,
    worker_flags,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def http(console: Console) -> Iterator[httpx.Client]:
    with console.client() as client:
        yield client


def read_events(
    response: httpx.Response, on_output: Callable[[], None] | None = None
) -> list[dict[str, object]]:
    """Parse a text/event-stream body into [{"id", "event", "data"}] until `end`;
    `on_output` is called after each output event."""
    events: list[dict[str, object]] = []
    current: dict[str, object] = {}
    for line in response.iter_lines():
        if not line:
            if "event" in current:
                events.append(current)
                if current["event"] == "output" and on_output is not None:
                    on_output()
                if current["event"] == "end":
                    return events
            current = {}
            continue
        field, _, value = line.partition(": ")
        if field == "id":
            current["id"] = int(value)
        elif field == "event":
            current["event"] = value
        elif field == "data":
            current["data"] = json.loads(value)
    return events


# ----------------------------------------------------------------------------------------------
# Who may ask


def test_every_endpoint_needs_the_token_even_on_loopback(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=10) as anonymous:
        for path in ("/api/v1/services", "/api/v1/jobs", "/api/v1/jobs/x/events", "/metrics"):
            answer = anonymous.get(path)
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.post("/api/v1/jobs", json={}).status_code == 401
        wrong = anonymous.get("/api/v1/services", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        page = anonymous.get("/")
        assert page.status_code == 401
        assert "Sign in" in page.text


def test_a_foreign_host_header_is_refused(console: Console, http: httpx.Client) -> None:
    # DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends its own name.
    answer = http.get("/api/v1/services", headers={"Host": "evil.example"})
    assert answer.status_code == 400
    assert http.get("/api/v1/services", headers={"Host": "localhost"}).status_code == 200


def test_a_post_from_a_foreign_origin_is_refused(http: httpx.Client) -> None:
    command = {"command_type": "shell", "command_name": "true"}
    answer = http.post("/api/v1/jobs", json=command, headers={"Origin": "http://evil.example"})
    assert answer.status_code == 403
    assert answer.json()["detail"] == "cross-origin request refused"


def test_the_login_url_gives_a_session_and_posts_need_its_csrf_token(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=20) as browser:
        login = browser.get(f"/login?token={console.token}")
        assert login.status_code == 303
        assert login.headers["location"] == "/"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        page = browser.get("/run")
        assert page.status_code == 200
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf is not None
        command = {"command_type": "shell", "command_name": "true"}
        assert browser.get("/api/v1/services").status_code == 200  # reads need no CSRF token
        refused = browser.post("/api/v1/jobs", json=command)
        assert refused.status_code == 403
        form = {"service": "shell", "command_name": "true"}
        assert browser.post("/run", data=form).status_code == 403
        assert browser.post("/run", data={**form, "csrf_token": "forged"}).status_code == 403
        accepted = browser.post(
            "/api/v1/jobs", json=command, headers={"X-CSRF-Token": csrf.group(1)}
        )
        assert accepted.status_code == 201
        ran = browser.post("/run", data={**form, "csrf_token": csrf.group(1)})
        assert ran.status_code == 303
        assert ran.headers["location"].startswith("/jobs/")
        assert browser.get("/login?token=wrong-token-here").status_code == 401


# ----------------------------------------------------------------------------------------------
# Services and workers


def test_services_lists_the_registered_services(http: httpx.Client) -> None:
    services = {s["name"]: s for s in http.get("/api/v1/services").json()["services"]}
    assert services["shell"]["workers"] >= 1
    assert services["shell"]["queued"] >= 0


def test_workers_degrade_when_the_broker_does_not_list_them(http: httpx.Client) -> None:
    answer = http.get("/api/v1/workers")
    assert answer.status_code == 200
    body = answer.json()
    if body["available"]:  # a broker with mmi.workers
        assert any("shell" in w.get("services", []) for w in body["workers"])  # spec/mdp.md §5.1
    else:  # 501 from the broker: the services list has the counts
        assert body["workers"] == []


def test_openapi_document_describes_the_api(http: httpx.Client) -> None:
    document = http.get("/api/v1/openapi.json").json()
    assert document["openapi"].startswith("3.0")  # what the bundled Swagger UI renders
    assert document["security"] == [{"token": []}]
    paths = document["paths"]
    for path in ("/api/v1/jobs", "/api/v1/jobs/{job_id}/events", "/api/v1/services"):
        assert path in paths
    page = http.get("/api/v1/docs")
    assert page.status_code == 200
    assert "/api/v1/docs/assets/swagger-ui-bundle.js" in page.text  # served here, no CDN
    assert http.get("/api/v1/docs/assets/swagger-ui-bundle.js").status_code == 200


# ----------------------------------------------------------------------------------------------
# Jobs


def test_submit_refuses_a_bad_command_with_the_fields_error(http: httpx.Client) -> None:
    answer = http.post("/api/v1/jobs", json={"command_type": "shell", "parameters": [1]})
    assert answer.status_code == 422
    body = answer.json()
    assert body["detail"].startswith("command_name")
    assert any(e["loc"][-1] == "command_name" for e in body["errors"])
    unknown = http.post(
        "/api/v1/jobs", json={"command_type": "shell", "command_name": "x", "sudo": True}
    )
    assert unknown.status_code == 422
    assert http.post("/api/v1/jobs", json=[]).status_code == 422
    assert http.post("/api/v1/jobs", content=b"{not json").status_code == 422


def test_a_job_from_submit_to_result(http: httpx.Client) -> None:
    answer = http.post(
        "/api/v1/jobs",
        json=[
            {"command_type": "shell", "command_name": "echo out; echo err >&2; exit 3"},
            {"command_type": "os", "command_name": "printf", "parameters": ["%s", "\u00e9"]},
        ],
    )
    assert answer.status_code == 201
    failing, ok = (j["id"] for j in answer.json()["jobs"])
    job = wait_for_state(http, failing, {"failed"})
    assert job["exit_code"] == 3
    assert job["request"]["command_name"] == "echo out; echo err >&2; exit 3"
    result = http.get(f"/api/v1/jobs/{failing}/result").json()
    assert result["result"]["stdout"] == "out\n"
    assert result["result"]["stderr"] == "err\n"
    output = http.get(f"/api/v1/jobs/{failing}/output").json()
    assert output["done"] is True
    assert {c["stream"]: c["data"] for c in output["chunks"]} == {
        "stdout": "out\n",
        "stderr": "err\n",
    }
    wait_for_state(http, ok, {"ok"})
    assert http.get(f"/api/v1/jobs/{ok}/result").json()["result"]["stdout"] == "\u00e9"


def test_binary_output_is_base64_in_json(http: httpx.Client) -> None:
    job_id = submit(http, command_type="shell", command_name="printf '\\377\\376'")
    wait_for_state(http, job_id, {"ok"})
    result = http.get(f"/api/v1/jobs/{job_id}/result").json()["result"]
    assert result["stdout"] == {"base64": "//4="}


def test_unknown_jobs_are_404_everywhere(http: httpx.Client) -> None:
    for method, path in (
        ("GET", "/api/v1/jobs/nope"),
        ("GET", "/api/v1/jobs/nope/result"),
        ("GET", "/api/v1/jobs/nope/output"),
        ("GET", "/api/v1/jobs/nope/events"),
        ("POST", "/api/v1/jobs/nope/cancel"),
        ("POST", "/api/v1/jobs/nope/rerun"),
    ):
        answer = http.request(method, path)
        assert answer.status_code == 404, path
        assert "nope" in answer.json()["detail"]


def test_list_filters_by_state_and_service_and_pages(http: httpx.Client) -> None:
    ok = submit(http, command_type="os", command_name="true")
    failed = submit(http, command_type="os", command_name="false")
    wait_for_state(http, ok, {"ok"})
    wait_for_state(http, failed, {"failed"})
    ids_failed = [j["id"] for j in http.get("/api/v1/jobs?state=failed&limit=1000").json()["jobs"]]
    assert failed in ids_failed
    assert ok not in ids_failed
    by_service = [j["id"] for j in http.get("/api/v1/jobs?service=os&limit=1000").json()["jobs"]]
    assert ok in by_service
    assert failed in by_service
    assert by_service.index(failed) < by_service.index(ok)  # newest first
    first = http.get("/api/v1/jobs?limit=1").json()
    assert len(first["jobs"]) == 1
    second = http.get(f"/api/v1/jobs?limit=1&before={first['next']}").json()
    assert second["jobs"][0]["id"] != first["jobs"][0]["id"]
    assert http.get("/api/v1/jobs?state=bogus").status_code == 422
    assert http.get("/api/v1/jobs?limit=0").status_code == 422


def test_cancel_ends_a_running_command_and_rerun_makes_a_new_job(http: httpx.Client) -> None:
    job_id = submit(http, command_type="os", command_name="sleep", parameters=["60"])
    wait_for_state(http, job_id, {"running"})
    answer = http.post(f"/api/v1/jobs/{job_id}/cancel")
    assert answer.status_code == 200
    assert answer.json()["cancel"] == "requested"
    wait_for_state(http, job_id, {"cancelled"}, timeout=20)
    again = http.post(f"/api/v1/jobs/{job_id}/cancel").json()
    assert again["cancel"] == "finished"
    rerun = http.post(f"/api/v1/jobs/{job_id}/rerun")
    assert rerun.status_code == 201
    new_id = rerun.json()["id"]
    assert new_id != job_id
    assert http.get(f"/api/v1/jobs/{new_id}").json()["request"]["parameters"] == ["60"]
    http.post(f"/api/v1/jobs/{new_id}/cancel")


# ----------------------------------------------------------------------------------------------
# Live output


def test_events_give_stored_then_live_chunks_then_the_end(
    http: httpx.Client, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    job_id = submit(
        http,
        command_type="shell",
        command_name=f"echo one; while [ ! -e {go} ]; do sleep 0.05; done; echo two >&2; "
        "sleep 0.2; echo three",
    )
    wait_for_state(http, job_id, {"running"})
    states: list[str] = []

    def release() -> None:  # the command goes on only once "one" came through the stream
        states.append(http.get(f"/api/v1/jobs/{job_id}").json()["state"])
        go.touch()

    with http.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response, release)
    assert states[0] == "running"  # "one" was streamed live, before the end
    assert events[0]["event"] == "state"
    assert events[-1]["event"] == "end"
    assert events[-1]["data"]["state"] == "ok"  # type: ignore[index]
    output = [e for e in events if e["event"] == "output"]
    assert [e["id"] for e in output] == list(range(len(output)))
    text = "".join(e["data"]["text"] for e in output)  # type: ignore[index]
    assert text.split() == ["one", "two", "three"]


def test_last_event_id_resumes_without_gaps_or_repeats(http: httpx.Client) -> None:
    job_id = submit(
        http,
        command_type="shell",
        command_name="for i in 1 2 3 4; do echo line $i; sleep 0.1; echo err $i >&2; done",
    )
    wait_for_state(http, job_id, {"ok"})
    with http.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        everything = [e for e in read_events(response) if e["event"] == "output"]
    assert len(everything) >= 2
    cut = everything[len(everything) // 2]["id"]
    headers = {"Last-Event-ID": str(cut)}
    with http.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=headers) as response:
        rest = [e for e in read_events(response) if e["event"] == "output"]
    assert [e["id"] for e in rest] == [e["id"] for e in everything if e["id"] > cut]  # type: ignore[operator]
    assert (
        http.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"}).status_code == 400
    )


# ----------------------------------------------------------------------------------------------
# Metrics


def test_metrics_after_a_known_workload(http: httpx.Client) -> None:
    def scrape() -> str:
        answer = http.get("/metrics")
        assert answer.status_code == 200
        return answer.text

    before = _value(scrape(), "mdp_web_jobs_submitted_total")
    ids = [submit(http, command_type="os", command_name="false") for _ in range(3)]
    for job_id in ids:
        wait_for_state(http, job_id, {"failed"})
    text = scrape()
    assert _value(text, "mdp_web_jobs_submitted_total") == before + 3
    assert _value(text, 'mdp_jobs{state="failed"}') >= 3
    assert _value(text, 'mdp_service_workers{service="os"}') >= 1
    assert _value(text, 'mdp_web_backend_up{backend="jobs"}') == 1
    assert 'mdp_job_queue_wait_seconds_bucket{le="600.0"}' in text
    wait_until(lambda: _value(scrape(), "mdp_job_queue_wait_seconds_count") >= 3, timeout=10)


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the scrape")


def test_without_mdp_jobs_job_endpoints_say_503_at_once(tmp_path: Path) -> None:
    endpoint = free_tcp_endpoint()
    extra = ["--insecure"] if broker_has_insecure() else []
    broker = start_broker(endpoint, *extra)
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token)
    web = Process(
        [
            *(script("mdp-web"), "--broker", endpoint, "--bind", "127.0.0.1:0"),
            *("--token-file", str(tmp_path / "token")),
        ],
        to_files=True,
    )
    try:
        url = wait_until(lambda: printed_url(web), timeout=20, what="mdp-web's URL")
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            assert http.get("/api/v1/services").json() == {"services": []}
            started = time.monotonic()
            answer = http.post("/api/v1/jobs", json={"command_type": "os", "command_name": "true"})
            assert answer.status_code == 503
            assert "is mdp-jobs running?" in answer.json()["detail"]
            # Said well before one silent attempt (5 s) is over: MMI is asked after 0.5 s.
            assert time.monotonic() - started < 4
            started = time.monotonic()
            page = http.get("/")
            assert page.status_code == 200
            assert "start <code>mdp-jobs</code>" in page.text
            assert time.monotonic() - started < 4  # the dashboard does not wait either
    finally:
        web.stop()
        broker.stop()


def test_given_two_brokers_the_console_keeps_working_when_one_is_killed(tmp_path: Path) -> None:
    """README "Scaling out": mdp-web is given every broker; kill -9 of the one it uses costs
    one silent attempt (--timeout), then requests go to the other."""
    first, second = free_tcp_endpoint(), free_tcp_endpoint()
    beat = ["--heartbeat-ms", str(TEST_HEARTBEAT_MS), "--liveness", str(TEST_LIVENESS)]
    brokers = [start_broker(first), start_broker(second)]
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token)
    processes = [
        Process(
            [script("mdp-worker"), "-s", "shell", "--broker", first, "--broker", second,
             "-c", "2", *beat, *worker_flags()],
            to_files=True,
        ),
        # Jobs go through the broker that survives; jobs.* are served on both.
        Process(
            [script("mdp-jobs"), "--broker", second, "--also-broker", first,
             "--db", str(tmp_path / "jobs.sqlite3"), *beat],
            to_files=True,
        ),
    ]  # fmt: skip
    web = Process(
        [
            *(script("mdp-web"), "--broker", first, "--broker", second, "--timeout", "1"),
            *("--bind", "127.0.0.1:0", "--token-file", str(tmp_path / "token")),
        ],
        to_files=True,
    )
    processes.append(web)
    try:
        url = wait_until(lambda: printed_url(web), timeout=20, what="mdp-web's URL")
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:

            def ready() -> bool:
                names = {s["name"] for s in http.get("/api/v1/services").json()["services"]}
                return {"shell", "jobs.submit"} <= names

            wait_until(ready, timeout=20, interval=0.1, what="the services on the first broker")
            before = submit(http, command_type="shell", command_name="echo before")
            assert wait_for_state(http, before, {"ok"}, timeout=20)["state"] == "ok"
            brokers[0].kill()
            brokers[0].wait(5)
            started = time.monotonic()
            after = submit(http, command_type="shell", command_name="echo after")
            assert time.monotonic() - started < 10  # one silent attempt, then the second broker
            assert wait_for_state(http, after, {"ok"}, timeout=20)["state"] == "ok"
            result = http.get(f"/api/v1/jobs/{before}/result")
            assert result.status_code == 200 and result.json()["result"]["stdout"] == "before\n"
            assert http.get("/api/v1/workers").status_code == 200
            # And the other way round (whichever broker it used, one of the kills hit it):
            # with the second broker gone, submits are acknowledged through the first.
            brokers[0] = start_broker(first)
            wait_until(lambda: workers_of(first, "jobs.submit") > 0, timeout=20, what="re-READY")
            brokers[1].kill()
            brokers[1].wait(5)
            queued = submit(http, command_type="shell", command_name="echo queued")
            assert http.get(f"/api/v1/jobs/{queued}").json()["state"] == "queued"
    finally:
        for proc in [*processes, *brokers]:
            proc.stop()


def test_a_non_loopback_bind_without_tls_is_refused(tmp_path: Path) -> None:
    refused = subprocess.run(
        [script("mdp-web"), "--bind", "0.0.0.0:0"], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 2
    assert "refusing to serve 0.0.0.0:0 over plain http" in refused.stderr
    (tmp_path / "short").write_text("tiny\n")
    short = subprocess.run(
        [script("mdp-web"), "--token-file", str(tmp_path / "short")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert short.returncode == 2
    assert "at least 16 characters" in short.stderr


# ----------------------------------------------------------------------------------------------
# Expired jobs (in-process: retention cannot be made to expire a job of the shared stack)


def test_an_expired_job_is_410_and_an_unknown_one_404_on_every_job_endpoint() -> None:
    """spec/api.md: 404 for an id mdp-jobs never knew, 410 for one retention removed. The app
    in-process, over a backend whose `jobs.status` says so (the job service's side of it,
    `expired` vs `unknown`, is tests/integration/test_jobs.py's)."""

    class RetentionRemovedIt(Backend):
        async def job(self, job_id: str) -> dict[str, object]:
            return {"id": job_id, "state": "expired" if job_id.startswith("old") else "unknown"}

    token = secrets.token_urlsafe(24)
    backend = RetentionRemovedIt(Client("tcp://127.0.0.1:1", timeout=0.1, retries=0))
    app = create_app(backend, Guard(token))
    headers = {"Authorization": f"Bearer {token}", "Host": "127.0.0.1"}

    async def statuses(job_id: str) -> dict[str, tuple[int, str]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=headers
        ) as client:
            found = {}
            for method, path in [
                ("GET", ""),
                ("GET", "/result"),
                ("GET", "/output"),
                ("GET", "/events"),
                ("POST", "/cancel"),
            ]:
                answer = await client.request(method, f"/api/v1/jobs/{job_id}{path}")
                found[f"{method} {path or '/'}"] = (answer.status_code, answer.json()["detail"])
            return found

    try:
        expired = asyncio.run(statuses("old-1"))
        unknown = asyncio.run(statuses("never-1"))
    finally:
        backend.close()
    assert {k: v[0] for k, v in expired.items()} == dict.fromkeys(expired, 410), expired
    assert all("has expired" in detail for _, detail in expired.values())
    assert {k: v[0] for k, v in unknown.items()} == dict.fromkeys(unknown, 404), unknown
