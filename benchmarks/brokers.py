"""The brokers under test: start one as a separate process, read its CPU and memory, stop it.

Our broker and majortomo's run as `python -m ...` children of the benchmark, bound to a free
loopback port, with per-message logging off: ours with `--log-level WARNING`, majortomo with a
logging config at WARNING (its default is INFO, which formats and writes a line for every
PARTIAL and FINAL). Two more processes stand in the broker's place for comparison:
- "c": the zguide's C MDP/0.1 broker (`mdbroker.c`), when a path to a built binary is given
  (`c_broker=`); it is started as `PATH ENDPOINT` and logs nothing per message without `-v`.
- "proxy": the transport ceiling, `benchmarks.proxy`: `zmq.proxy` between a ROUTER for the
  clients and a DEALER for the workers, so the same peers' bytes move with no MDP at all
  (libzmq's own C loop after setup). It has a second endpoint, `worker_endpoint`.
Ours can also run with CURVE (`security="curve"`): a fresh broker, client and worker key pair
and the two allow-lists are made in the broker's temporary directory (`CurveKeys`), and the
peers get `mdp.security.curve_client_options` for their sockets. `security="curve-info"` is
the same at our default `--log-level INFO`, which writes the audit records (one per batch of
requests).
CPU time is user+system of the broker's own process, by PID: the scheduler's exact run time of
each of its threads (/proc/PID/task/*/schedstat) where available, psutil's user+system (10 ms
granularity) otherwise.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import psutil

from mdp.security import (
    curve_client_options,
    generate_key_pair,
    load_public_key,
    write_public_key,
)

BrokerKind = Literal["ours", "majortomo", "c", "proxy"]
BROKERS: Final[tuple[BrokerKind, ...]] = ("ours", "majortomo")
"""The two brokers every scenario compares; "c" and "proxy" are compared with ours apart."""
ALL_KINDS: Final[tuple[BrokerKind, ...]] = ("ours", "majortomo", "c", "proxy")
LABELS: Final[dict[str, str]] = {
    "ours": "ours (mdp)",
    "majortomo": "majortomo 0.2.0",
    "c": "zguide mdbroker.c",
    "proxy": "zmq.proxy (transport ceiling)",
}

Security = Literal["plain", "curve", "curve-info"]
"""How our broker is secured: "plain" (no CURVE), "curve" (CURVE, --log-level WARNING like
every other run), "curve-info" (CURVE at the default INFO: the audit records are written)."""
SECURITY: Final[tuple[Security, ...]] = ("plain", "curve", "curve-info")
SECURITY_LABELS: Final[dict[str, str]] = {
    "plain": "no CURVE",
    "curve": "CURVE",
    "curve-info": "CURVE, INFO log (audit records)",
}
SocketOptions = Sequence[tuple[int, int | bytes]]
"""zmq socket options as (option, value) pairs, set before connecting."""

STARTUP_TIMEOUT = 15.0
STOP_GRACE = 0.5

_MAJORTOMO_LOGGING = """\
logging:
  root:
    level: WARNING
  handlers:
    console:
      level: WARNING
"""


def _run_time_ns(schedstat: Path) -> int:
    """A thread's on-CPU time in ns: the first field of /proc/PID/task/TID/schedstat."""
    return int(schedstat.read_text().split()[0])


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class CurveKeys:
    """Key files for one CURVE broker and its peers (one key pair for all clients, one for all
    workers), made the way `mdp-keys generate` and `mdp-keys allow` make them."""

    broker_secret: Path
    broker_public: Path
    client_secret: Path
    worker_secret: Path
    allow_clients: Path
    allow_workers: Path

    @classmethod
    def generate(cls, directory: Path) -> CurveKeys:
        """Fresh key pairs in `directory/keys`, the allow-lists in `directory/allowed`."""
        keys = directory / "keys"
        broker_public, broker_secret = generate_key_pair("broker", keys)
        client_public, client_secret = generate_key_pair("bench-client", keys)
        worker_public, worker_secret = generate_key_pair("bench-worker", keys)
        allow_clients = directory / "allowed" / "clients"
        allow_workers = directory / "allowed" / "workers"
        # What `mdp-keys allow client|worker FILE --dir DIR` does: copy the public key.
        write_public_key(load_public_key(client_public), allow_clients / client_public.name)
        write_public_key(load_public_key(worker_public), allow_workers / worker_public.name)
        return cls(
            broker_secret, broker_public, client_secret, worker_secret, allow_clients, allow_workers
        )

    def client_options(self) -> SocketOptions:
        """Socket options for a client: its key pair and the broker's public key."""
        return curve_client_options(self.client_secret, self.broker_public)

    def worker_options(self) -> SocketOptions:
        """Socket options for a worker: its key pair and the broker's public key."""
        return curve_client_options(self.worker_secret, self.broker_public)

    def broker_arguments(self) -> list[str]:
        """The broker's command-line options for these keys."""
        return [
            *("--curve-secret-key", str(self.broker_secret)),
            *("--allow-clients", str(self.allow_clients)),
            *("--allow-workers", str(self.allow_workers)),
        ]


@dataclass
class BrokerProcess:
    """A running broker: its endpoint, its process, and readings of its resource use."""

    kind: BrokerKind
    endpoint: str
    command: list[str]
    popen: subprocess.Popen[bytes]
    process: psutil.Process
    stderr_path: Path
    _workdir: tempfile.TemporaryDirectory[str] = field(repr=False)
    security: Security = "plain"
    curve: CurveKeys | None = None
    """The key files when `security` is not "plain"; the peers must use them."""
    worker_endpoint: str = ""
    """Where workers connect, when not `endpoint` (the proxy's DEALER side)."""

    def __post_init__(self) -> None:
        if not self.worker_endpoint:
            self.worker_endpoint = self.endpoint

    @property
    def pid(self) -> int:
        """The broker's process id."""
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the broker process has used so far.

        Read from the scheduler's per-thread run time (/proc/PID/task/*/schedstat, in ns)
        where the kernel has it: the same quantity psutil reports as user+system, without
        its 10 ms granularity (which is several percent of a short run). psutil otherwise.
        """
        total = 0
        try:
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                total += _run_time_ns(task / "schedstat")
        except (OSError, ValueError):
            times = self.process.cpu_times()
            return float(times.user + times.system)
        return total / 1e9

    def main_thread_cpu_seconds(self) -> float:
        """CPU time of the broker's main (Python) thread only; the rest is ZeroMQ's I/O thread."""
        try:
            return _run_time_ns(Path(f"/proc/{self.pid}/task/{self.pid}/schedstat")) / 1e9
        except (OSError, ValueError):
            pass
        for thread in self.process.threads():
            if thread.id == self.pid:
                return float(thread.user_time + thread.system_time)
        return float("nan")

    def rss_bytes(self) -> int:
        """The broker's resident set size now."""
        return int(self.process.memory_info().rss)

    def peak_rss_bytes(self) -> int:
        """The broker's peak resident set size so far (VmHWM from /proc; RSS elsewhere)."""
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return self.rss_bytes()

    def alive(self) -> bool:
        """True while the broker process has not exited."""
        return self.popen.poll() is None

    def wait_idle(
        self, threshold: float = 0.02, window: float = 0.3, timeout: float = 60.0
    ) -> bool:
        """Wait until the broker uses under `threshold` of a core over `window` seconds.

        Returns False if it is still busy after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu_seconds()
            time.sleep(window)
            if self.cpu_seconds() - before < threshold * window:
                return True
        return False

    def stderr_tail(self, limit: int = 2000) -> str:
        """The end of what the broker wrote on stderr."""
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")[-limit:]
        return ""

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """Stop the broker by PID: SIGTERM, a short grace, then SIGKILL. Returns its exit code.

        majortomo only notices SIGTERM when its 2.5 s receive timeout ends, so it is usually
        killed after the grace period; nothing is measured after this point.
        """
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5.0)
        self._workdir.cleanup()
        return self.popen.returncode


def broker_command(
    kind: BrokerKind,
    endpoint: str,
    *,
    max_queue: int | None = None,
    request_ttl: float | None = None,
    config_path: Path | None = None,
    wrapper: list[str] | None = None,
    curve: CurveKeys | None = None,
    log_level: str = "WARNING",
    c_broker: str | None = None,
    worker_endpoint: str = "",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line that starts broker `kind` on `endpoint`.

    `wrapper` goes between the interpreter and `-m`, e.g. `["-m", "cProfile", "-o", PATH]`.
    `curve` and `log_level` apply to our broker only; `c_broker` (the binary) to "c";
    `worker_endpoint` (the DEALER side) to "proxy"; `extra_args` (more options) to "ours".
    """
    python = [sys.executable, *(wrapper or [])]
    if kind == "c":
        if not c_broker:
            raise ValueError("the C broker needs the path of a built mdbroker binary")
        return [c_broker, endpoint]
    if kind == "proxy":
        return [*python, "-m", "benchmarks.proxy", endpoint, worker_endpoint]
    if kind == "ours":
        command = [*python, "-m", "mdp.broker", "--bind", endpoint, "--log-level", log_level]
        if max_queue is not None:
            command += ["--max-queue", str(max_queue)]
        if request_ttl is not None:
            command += ["--request-ttl", str(request_ttl)]
        if curve is not None:
            command += curve.broker_arguments()
        else:
            # tcp without CURVE must be asked for; on loopback, on a benchmark machine.
            command.append("--insecure")
        return [*command, *extra_args]
    command = [*python, "-m", "majortomo.broker", "-b", endpoint]
    if config_path is not None:
        command += ["-c", str(config_path)]
    return command


def start_broker(
    kind: BrokerKind,
    *,
    max_queue: int | None = None,
    request_ttl: float | None = None,
    wrapper: list[str] | None = None,
    pythonpath: str | None = None,
    security: Security = "plain",
    c_broker: str | None = None,
    extra_args: Sequence[str] = (),
) -> BrokerProcess:
    """Start broker `kind` on a free loopback port and wait until it accepts connections.

    `max_queue` and `request_ttl` apply to our broker only (majortomo has neither limit).
    `wrapper`: see `broker_command`. `pythonpath` is put first on the broker's PYTHONPATH, to
    measure a patched copy of a package without touching the installed one. `security`: see
    `Security` (our broker only); the key files live in the broker's temporary directory.
    `c_broker`: the path of the built zguide broker, for kind "c".
    """
    if security != "plain" and kind != "ours":
        raise ValueError(f"{kind} has no CURVE support here; security must be 'plain'")
    workdir = tempfile.TemporaryDirectory(prefix=f"mdp-bench-{kind}-")
    config_path = Path(workdir.name) / "majortomo-logging.yaml"
    config_path.write_text(_MAJORTOMO_LOGGING)
    stderr_path = Path(workdir.name) / "stderr.log"
    curve = CurveKeys.generate(Path(workdir.name)) if security != "plain" else None
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    worker_endpoint = f"tcp://127.0.0.1:{free_port()}" if kind == "proxy" else endpoint
    command = broker_command(
        kind,
        endpoint,
        max_queue=max_queue,
        request_ttl=request_ttl,
        config_path=config_path,
        wrapper=wrapper,
        curve=curve,
        log_level="INFO" if security == "curve-info" else "WARNING",
        c_broker=c_broker,
        worker_endpoint=worker_endpoint,
        extra_args=extra_args,
    )
    env = None
    if pythonpath:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    with stderr_path.open("wb") as stderr:
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=workdir.name,  # not the checkout: `-m` puts the working directory first
        )
    broker = BrokerProcess(
        kind,
        endpoint,
        command,
        popen,
        psutil.Process(popen.pid),
        stderr_path,
        workdir,
        security,
        curve,
        worker_endpoint,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if not broker.alive():
            tail = broker.stderr_tail()
            broker.stop()
            raise RuntimeError(f"{kind} broker exited at startup: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return broker
        except OSError:
            time.sleep(0.05)
    broker.stop()
    raise RuntimeError(f"{kind} broker did not listen on {endpoint} within {STARTUP_TIMEOUT} s")
