"""`mdp-worker` options and service lookup (services.cli, services.registry), without running
a worker: help, version, environment variables, and clear errors with exit code 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from services import echo
from services.cli import ByteSize, main
from services.command import CommandService, CommandSettings
from services.dedup import RequestCache
from services.registry import ServiceSpecError, load_service, load_services

SETTINGS = CommandSettings()


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_help_explains_every_option_and_its_variable() -> None:
    code, out = invoke("-h")
    assert code == 0
    for option in (
        "--service",
        "--broker",
        "--concurrency",
        "--max-timeout",
        "--default-timeout",
        "--max-output",
        "--mdp-version",
        "--heartbeat-ms",
        "--liveness",
        "--grace",
        "--log-level",
        "MDP_WORKER_SERVICE",
        "MDP_WORKER_CONCURRENCY",
    ):
        assert option in out


def test_version() -> None:
    code, out = invoke("--version")
    assert code == 0 and "mdp-worker" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Missing option '-s' / '--service'"),
        (["-s", "bogus"], "unknown service 'bogus'"),
        (["-s", "os", "-s", "os"], "given more than once"),
        (["-s", "no_such_module_mdp:f"], "cannot import 'no_such_module_mdp'"),
        (["-s", "os:getcwd"], "neither a Service nor an async function"),
        (["-s", "services.echo:nothing"], "has no attribute 'nothing'"),
        (["-s", "mmi.x=services.echo:echo"], "bad service name"),
        (["-s", "os", "-b", "localhost:5555"], "not a ZeroMQ endpoint"),
        (["-s", "os", "-b", "tcp://"], "the address after tcp:// is missing"),
        (["-s", "os", "-b", "tcp://127.0.0.1:99999"], "the port 99999 is outside 1-65535"),
        (["-s", "os", "-b", "tcp://bad host:5555"], "cannot connect"),
        (["-s", "os", "-c", "0"], "--concurrency"),
        (["-s", "os", "--max-output", "lots"], "not a size"),
        (["-s", "os", "--mdp-version", "0.3"], "--mdp-version"),
    ],
)
def test_bad_input_is_a_usage_error_without_traceback(args: list[str], message: str) -> None:
    code, out = invoke(*args)
    assert code == 2
    assert message in out
    assert "Traceback" not in out


def test_options_come_from_environment_variables() -> None:
    code, out = invoke(env={"MDP_WORKER_SERVICE": "os bogus"})
    assert code == 2 and "unknown service 'bogus'" in out
    code, out = invoke("-s", "os", env={"MDP_WORKER_CONCURRENCY": "zero"})
    assert code == 2 and "'zero' is not a valid integer" in out


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1048576), ("512K", 512 * 1024), ("1M", 1024**2), ("1MiB", 1024**2), ("2g", 2**31)],
)
def test_byte_sizes(text: str, size: int) -> None:
    assert ByteSize().convert(text, None, None) == size


def test_builtin_services_by_name() -> None:
    services = load_services(["os", "shell", "echo"], SETTINGS)
    assert [s.name for s in services] == ["os", "shell", "echo"]
    assert isinstance(services[0].handler, CommandService)
    assert services[0].handler.cache is services[1].handler.cache  # type: ignore[attr-defined]


def test_user_service_from_module_and_function() -> None:
    service = load_service("services.echo:echo", SETTINGS, RequestCache())
    assert (service.name, service.handler) == ("echo", echo.echo)
    named = load_service("mirror=services.echo:echo", SETTINGS, RequestCache())
    assert named.name == "mirror"


def test_user_service_object_is_used_as_is_or_renamed() -> None:
    assert load_service("services.echo:SERVICE", SETTINGS, RequestCache()) is echo.SERVICE
    renamed = load_service("copy=services.echo:SERVICE", SETTINGS, RequestCache())
    assert (renamed.name, renamed.handler) == ("copy", echo.echo)


def test_a_module_that_fails_to_import_is_reported() -> None:
    with pytest.raises(ServiceSpecError, match="cannot import"):
        load_service("no.such.module:f", SETTINGS, RequestCache())
