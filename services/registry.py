"""Finding services by name: the built-in ones ("os", "shell", "echo") and user services given
as `module:function` or `NAME=module:function`.

A user target may be a `mdp.worker.Service` (used as is, renamed if NAME is given) or an async
handler `(Request) -> list[bytes]` (served under NAME, or under its attribute name).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Sequence

from mdp.errors import ProtocolError
from mdp.worker import Handler, Service
from services import echo
from services.command import CommandService, CommandSettings
from services.dedup import RequestCache
from services.execution import GroupTracker

__all__ = ["BUILTIN", "ServiceSpecError", "control_services", "load_service", "load_services"]

BUILTIN = ("os", "shell", "echo")


class ServiceSpecError(ValueError):
    """A --service value names nothing we can serve; the message says why."""


def load_services(
    specs: Sequence[str],
    settings: CommandSettings,
    cache: RequestCache | None = None,
    tracker: GroupTracker | None = None,
) -> list[Service]:
    """Resolve every spec; one request cache is shared by the command services of a process.
    `tracker` (the worker's watchdog) is told of every command's process group."""
    cache = cache if cache is not None else RequestCache()
    services = [load_service(spec, settings, cache, tracker) for spec in specs]
    names = [s.name for s in services]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ServiceSpecError(f"service {duplicates[0]!r} given more than once")
    return services


def control_services(services: Sequence[Service]) -> list[Service]:
    """The worker-addressed control service (`MODE@NAME`, spec/command-service.md §14.3) of
    each command service among `services`."""
    return [s.handler.control_service() for s in services if isinstance(s.handler, CommandService)]


def load_service(
    spec: str,
    settings: CommandSettings,
    cache: RequestCache,
    tracker: GroupTracker | None = None,
) -> Service:
    """One service from a built-in name, `module:attr` or `NAME=module:attr`."""
    spec = spec.strip()
    if spec == "os":
        return CommandService("os", settings, cache, tracker).service()
    if spec == "shell":
        return CommandService("shell", settings, cache, tracker).service()
    if spec == "echo":
        return echo.SERVICE
    if ":" not in spec:
        raise ServiceSpecError(
            f"unknown service {spec!r}: use one of {', '.join(BUILTIN)} or module:function"
        )
    name, _, target = spec.rpartition("=") if "=" in spec else ("", "", spec)
    module_name, _, attr_path = target.partition(":")
    if not module_name or not attr_path:
        raise ServiceSpecError(f"{spec!r}: expected module:function")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ServiceSpecError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise ServiceSpecError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ServiceSpecError(f"{module_name!r} has no attribute {attr_path!r}") from None
    name = name.strip() or attr_path.rsplit(".", 1)[-1]
    try:
        if isinstance(obj, Service):
            return dataclasses.replace(obj, name=name) if "=" in spec else obj
        if _is_async_callable(obj):
            handler: Handler = obj  # type: ignore[assignment]
            return Service(name, handler)
    except (ProtocolError, ValueError) as exc:
        raise ServiceSpecError(f"bad service name {name!r}: {exc}") from None
    raise ServiceSpecError(
        f"{target!r} is neither a Service nor an async function taking a Request"
    )


def _is_async_callable(obj: object) -> bool:
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - an instance with async __call__
    return callable(obj) and inspect.iscoroutinefunction(call)
