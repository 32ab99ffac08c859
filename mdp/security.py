"""Who may talk to the broker, and what a worker lets a command do. `spec/security.md` is the
prose version of this module.

Theory of operation
-------------------
Transport security is CurveZMQ (RFC 26) on the broker's one ROUTER socket, with every
handshake checked by a ZAP handler (RFC 27) that lives in the broker process:

- Keys are ordinary ZeroMQ certificate files (`zmq.auth.create_certificates` format):
  `NAME.key` holds a public key, `NAME.key_secret` a key pair. The broker has a key pair;
  clients and workers each have one and know the broker's public key.
- The broker reads two allow-list directories of public keys: one for clients, one for
  workers (`AllowLists`). They are re-read whenever they change, so `mdp-keys allow` and
  `rm` take effect without a restart.
- The ZAP handler (`zap_reply`, run by `ZapThread` or `AsyncZapAuthenticator`) refuses a key in
  neither list with status 400, so an unknown key never gets past the handshake. An accepted
  connection gets the peer's public key (Z85 text) as its ZAP User-Id.
- ZeroMQ stamps that User-Id on every message the connection delivers. The broker's receive
  loop reads it from each message's first frame and `BrokerAuth.admit` checks the message's
  role against the *current* allow-lists: a client header needs a key in the client list, a
  worker header a key in the worker list. So a client key cannot register as a worker, a
  worker key cannot send requests, and a revoked key's established connections stop working
  at the next re-read (at most `RESCAN_INTERVAL` seconds); revoked workers are also
  disconnected and forgotten (`BrokerAuth.revoked_workers`).

Checking each message (rather than caching a role per ROUTER identity) is deliberate: a peer may
choose its own routing id, so an identity can move from one connection (and key) to another,
and ZAP never learns the peer's routing id. The check costs one frame object and one dict
lookup per message (spec/security.md, "Cost").

Worker-side policy (what a command may be and what it may use) is `CommandPolicy` and
`ChildLimits`; the command services apply them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import logging
import math
import os
import pwd
import re
import resource
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.asyncio
import zmq.auth
import zmq.utils.z85

from mdp.errors import MDPError

__all__ = [
    "PUBLIC_SUFFIX",
    "RESCAN_INTERVAL",
    "SECRET_SUFFIX",
    "ZAP_DOMAIN",
    "AllowLists",
    "AsyncZapAuthenticator",
    "BrokerAuth",
    "ChildLimits",
    "CommandPolicy",
    "KeyFileError",
    "KeyPair",
    "Peer",
    "SecurityError",
    "ZapThread",
    "curve_client_options",
    "exposed_endpoints",
    "generate_key_pair",
    "insecure_bind_help",
    "is_local_endpoint",
    "load_key_pair",
    "load_public_key",
    "valid_key_name",
    "write_public_key",
    "zap_reply",
]

log = logging.getLogger("mdp.security")
audit = logging.getLogger("mdp.audit")

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"  # RFC 27: the handler binds this endpoint
ZAP_DOMAIN: Final = b"mdp"
ZAP_VERSION: Final = b"1.0"
RESCAN_INTERVAL: Final = 1.0
"""Seconds between re-reads of the allow-list directories (they are also re-read on every
handshake, so a new connection always sees the current lists)."""

PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"
_Z85_KEY_LENGTH: Final = 40
_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")

SocketOptions = list[tuple[int, int | bytes]]


class SecurityError(MDPError):
    """CURVE cannot be set up as asked (so the program must not start without it)."""


class KeyFileError(SecurityError):
    """A certificate file or allow-list directory is missing, unreadable or malformed."""


# ------------------------------------------------------------------------------------------
# Certificate files


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, both keys in Z85 text (40 bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)


def valid_key_name(name: str) -> bool:
    """A key NAME is a plain file name: letters, digits, `_`, `.`, `-`; not starting with `.`."""
    return bool(_KEY_NAME.fullmatch(name))


def _check_z85_key(key: bytes | None, path: Path, what: str) -> bytes:
    if key is None or len(key) != _Z85_KEY_LENGTH:
        raise KeyFileError(f"{path}: no valid {what} (expected 40 Z85 characters)")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{path}: the {what} is not valid Z85 text") from None
    return key


def _load_certificate(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    path = Path(path)
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key (Z85) in a certificate file; a `.key_secret` file also has one."""
    public, _ = _load_certificate(path)
    return _check_z85_key(public, Path(path), "public key")


def load_key_pair(path: str | os.PathLike[str]) -> KeyPair:
    """The key pair in a `.key_secret` file. Warns if others may read the file."""
    path = Path(path)
    public, secret = _load_certificate(path)
    if secret is None:
        raise KeyFileError(
            f"{path} holds no secret key: pass the NAME.key_secret file written by "
            "`mdp-keys generate`, not the public NAME.key"
        )
    pair = KeyPair(
        _check_z85_key(public, path, "public key"), _check_z85_key(secret, path, "secret key")
    )
    if zmq.curve_public(pair.secret) != pair.public:
        raise KeyFileError(f"{path}: the public key does not belong to the secret key")
    with contextlib.suppress(OSError):
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("secret key file %s is readable by other users; chmod 600 it", path)
    return pair


def generate_key_pair(name: str, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write `NAME.key` (public, mode 0644) and `NAME.key_secret` (mode 0600) into `directory`.

    The files are written by `zmq.auth.create_certificates` inside a private (0700) temporary
    directory and then linked into place, so the secret is never readable by others, not even
    for a moment, and an existing key pair is never overwritten (FileExistsError).
    """
    if not valid_key_name(name):
        raise ValueError(f"bad key name {name!r}: use letters, digits, '_', '.', '-'")
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    public_path = target / f"{name}{PUBLIC_SUFFIX}"
    secret_path = target / f"{name}{SECRET_SUFFIX}"
    for existing in (public_path, secret_path):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists; not overwriting a key")
    scratch = Path(tempfile.mkdtemp(prefix=".mdp-keys-", dir=target))
    try:
        public_tmp, secret_tmp = map(Path, zmq.auth.create_certificates(scratch, name))
        secret_tmp.chmod(0o600)
        public_tmp.chmod(0o644)
        os.link(secret_tmp, secret_path)  # link: fails instead of replacing an existing file
        try:
            os.link(public_tmp, public_path)
        except BaseException:
            secret_path.unlink()
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public_path, secret_path


_PUBLIC_CERTIFICATE: Final = """\
#   ZeroMQ CURVE Public Certificate (written by mdp-keys)
#   Give this file to the peers that must recognise its owner.

metadata
curve
    public-key = "{key}"
"""


def write_public_key(public: bytes, path: str | os.PathLike[str]) -> Path:
    """Write a public-only certificate for `public` at `path`, atomically (temp file + rename).

    Same format as `zmq.auth.create_certificates` writes. The broker re-reads allow-list
    directories at any moment; the rename means it sees either no file or the whole file.
    """
    path = Path(path)
    if not path.name.endswith(PUBLIC_SUFFIX):
        raise ValueError(f"{path}: public key files are named NAME{PUBLIC_SUFFIX}")
    _check_z85_key(public, path, "public key")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mdp-keys-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(_PUBLIC_CERTIFICATE.format(key=public.decode("ascii")))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------------
# Where the broker may listen without CURVE

_LOOPBACK_NAMES: Final = frozenset({"localhost", "lo", "ip6-localhost"})
_LOCAL_TRANSPORTS: Final = frozenset({"ipc", "inproc"})


def is_local_endpoint(endpoint: str) -> bool:
    """True if binding `endpoint` cannot be reached from another machine.

    ipc:// and inproc:// are local; tcp:// is local only for a loopback address (127.0.0.0/8,
    ::1), `localhost` or the `lo` interface. Anything else, including `*`, other host names
    and other transports, counts as exposed: we do not resolve names to decide.
    """
    transport, sep, address = endpoint.partition("://")
    if not sep:
        return False
    transport = transport.lower()
    if transport in _LOCAL_TRANSPORTS:
        return True
    if transport != "tcp":
        return False
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if ";" in host:  # tcp://SOURCE;DEST is a connect form; for bind the host is what counts
        return False
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def exposed_endpoints(endpoints: Iterable[str]) -> list[str]:
    """The endpoints among `endpoints` that other machines might reach.

    A tcp:// endpoint whose port is neither a number nor `*` is left out: ZeroMQ refuses to
    bind it, and that error says more than a refusal about authentication would.
    """
    return [e for e in endpoints if not is_local_endpoint(e) and not _unbindable_tcp(e)]


def _unbindable_tcp(endpoint: str) -> bool:
    transport, _, address = endpoint.partition("://")
    if transport.lower() != "tcp" or ":" not in address:
        return False
    port = address.rsplit(":", 1)[1]
    return not (port.isdigit() or port == "*")


def insecure_bind_help(endpoints: Sequence[str]) -> str:
    """Why the broker refuses to listen on `endpoints` without CURVE, and how to set it up."""
    bind = " ".join(f"--bind {e}" for e in endpoints)
    return (
        f"refusing to listen on {', '.join(endpoints)} without authentication: anyone who can "
        "reach it could run commands on your workers.\n"
        "Set up CURVE keys (README, 'Running across machines'):\n"
        "  mdp-keys generate broker --dir keys\n"
        "  mdp-keys generate alice --dir keys      # one per client\n"
        "  mdp-keys generate worker1 --dir keys    # one per worker\n"
        "  mdp-keys allow client keys/alice.key --dir allowed/clients\n"
        "  mdp-keys allow worker keys/worker1.key --dir allowed/workers\n"
        f"  mdp-broker {bind} --curve-secret-key keys/broker.key_secret "
        "--allow-clients allowed/clients --allow-workers allowed/workers\n"
        "Or pass --insecure to listen without authentication anyway (not recommended)."
    )


# ------------------------------------------------------------------------------------------
# Allow-lists


@dataclass(frozen=True, slots=True)
class Peer:
    """An allowed public key: its name (the file name without `.key`) and its roles."""

    key: str
    """The public key, Z85 text; also the ZAP User-Id of its connections."""
    name: str
    client: bool = False
    worker: bool = False

    def describe(self) -> str:
        roles = "+".join(r for r, ok in (("client", self.client), ("worker", self.worker)) if ok)
        return f"{roles} {self.name!r}"


Signature = tuple[tuple[str, int, int, int], ...] | None


def _directory_signature(directory: Path) -> Signature:
    """What changes when a key file is added, removed, renamed or rewritten; None if missing."""
    try:
        entries = [
            (entry.name, st.st_ino, st.st_mtime_ns, st.st_size)
            for entry in os.scandir(directory)
            if entry.name.endswith(PUBLIC_SUFFIX) and (st := entry.stat())
        ]
    except OSError:
        return None
    return tuple(sorted(entries))


class AllowLists:
    """The client and worker allow-list directories, re-read when they change.

    `peers` maps a public key (Z85 text) to its `Peer`; it is replaced as a whole on each
    re-read, so readers in other threads always see one consistent version. `generation` goes
    up by one on every change. Only one thread should call `refresh()`.
    """

    def __init__(
        self,
        clients: str | os.PathLike[str] | None,
        workers: str | os.PathLike[str] | None,
    ) -> None:
        self.clients = Path(clients) if clients is not None else None
        self.workers = Path(workers) if workers is not None else None
        for directory in (self.clients, self.workers):
            if directory is not None and not directory.is_dir():
                raise KeyFileError(f"allow-list directory {directory} does not exist")
        self.peers: dict[str, Peer] = {}
        self.generation = 0
        self._signatures: tuple[Signature, Signature] = (None, None)
        self._loaded = False
        self.refresh()

    def lookup(self, public_key: bytes) -> Peer | None:
        """The allowed peer with this (raw, 32-byte) public key, or None."""
        return self.peers.get(zmq.utils.z85.encode(public_key).decode("ascii"))

    def refresh(self) -> bool:
        """Re-read both directories if anything in them changed; True if the lists changed."""
        signatures = (self._signature(self.clients), self._signature(self.workers))
        if self._loaded and signatures == self._signatures:
            return False
        peers: dict[str, Peer] = {}
        for directory, role in ((self.clients, "client"), (self.workers, "worker")):
            if directory is None:
                continue
            if not directory.is_dir():
                log.warning(
                    "allow-list directory %s is gone: no %s key is allowed", directory, role
                )
                continue
            for key, name in self._read(directory):
                known = peers.get(key)
                if known is None:
                    known = Peer(key, name)
                peers[key] = Peer(
                    key,
                    known.name,
                    client=known.client or role == "client",
                    worker=known.worker or role == "worker",
                )
        changed = peers != self.peers
        self._signatures = signatures
        if changed or not self._loaded:
            removed = self.peers.keys() - peers.keys()
            self.peers = peers
            self.generation += 1
            log.info(
                "allow-lists %s: %d client keys, %d worker keys%s",
                "changed" if self._loaded else "loaded",
                sum(p.client for p in peers.values()),
                sum(p.worker for p in peers.values()),
                f" ({len(removed)} revoked)" if removed and self._loaded else "",
            )
        self._loaded = True
        return changed

    @staticmethod
    def _signature(directory: Path | None) -> Signature:
        return None if directory is None else _directory_signature(directory)

    @staticmethod
    def _read(directory: Path) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                public, secret = zmq.auth.load_certificate(path)
                key = _check_z85_key(public, path, "public key")
            except (OSError, ValueError, KeyFileError) as exc:
                log.warning("ignoring allow-list file %s: %s", path, exc)
                continue
            if secret is not None:
                log.warning("allow-list file %s contains a secret key; it should not", path)
            found.append((key.decode("ascii"), path.name[: -len(PUBLIC_SUFFIX)]))
        return found


# ------------------------------------------------------------------------------------------
# ZAP (RFC 27)


def zap_reply(request: list[bytes], lists: AllowLists) -> list[bytes]:
    """The handler's answer to one ZAP request (envelope already stripped by a REP socket).

    Request: version, request id, domain, address, identity, mechanism, credentials...
    Reply:   version, request id, status code, status text, user id, metadata.
    Only CURVE in our domain with a key from either allow-list gets "200"; the user id is the
    key in Z85 text, which the broker later finds on every message of the connection.
    """
    if len(request) < 6:
        log.warning("malformed ZAP request (%d frames)", len(request))
        return [
            ZAP_VERSION,
            request[1] if len(request) > 1 else b"",
            b"500",
            b"malformed",
            b"",
            b"",
        ]
    version, request_id, domain, address, _identity, mechanism = request[:6]
    credentials = request[6:]

    def refuse(code: bytes, text: str) -> list[bytes]:
        log.warning("refused connection from %s: %s", address.decode("ascii", "replace"), text)
        return [ZAP_VERSION, request_id, code, text.encode(), b"", b""]

    if version != ZAP_VERSION:
        return refuse(b"500", "unsupported ZAP version")  # RFC 27: "500" internal error
    if domain != ZAP_DOMAIN:
        return refuse(b"400", f"unknown ZAP domain {domain!r}")
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return refuse(b"400", f"mechanism {mechanism.decode('ascii', 'replace')} is not allowed")
    lists.refresh()  # a handshake always sees the current lists
    peer = lists.lookup(credentials[0])
    if peer is None:
        key = zmq.utils.z85.encode(credentials[0]).decode("ascii")
        return refuse(b"400", f"unknown key {key}")
    log.info("accepted %s from %s", peer.describe(), address.decode("ascii", "replace"))
    return [ZAP_VERSION, request_id, b"200", b"OK", peer.key.encode("ascii"), b""]


def _safe_reply(request: list[bytes], lists: AllowLists) -> list[bytes]:
    """`zap_reply`, but a bug in it refuses the handshake (500) instead of killing the
    handler: a REP socket must answer every request, and no answer would stall every
    handshake."""
    try:
        return zap_reply(request, lists)
    except Exception:
        log.exception("ZAP handler failed; refusing the connection")
        request_id = request[1] if len(request) > 1 else b""
        return [ZAP_VERSION, request_id, b"500", b"internal error", b"", b""]


class ZapThread:
    """The ZAP handler in a daemon thread, for the broker's (non-asyncio) poll loop.

    `start()` binds the handler on `context` before returning, so any CURVE socket created
    afterwards is checked. Between requests it re-reads the allow-lists every
    `RESCAN_INTERVAL` seconds, which is how revocation reaches established connections.
    """

    def __init__(self, lists: AllowLists, rescan_interval: float = RESCAN_INTERVAL) -> None:
        self.lists = lists
        self.rescan_interval = rescan_interval
        self._socket: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stopping = False

    def start(self, context: zmq.Context[Any]) -> None:
        sock: zmq.Socket[bytes] = context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise SecurityError(f"cannot start the ZAP handler: {exc}") from None
        self._socket = sock
        self._thread = threading.Thread(target=self._run, name="mdp-zap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        sock = self._socket
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        next_scan = time.monotonic() + self.rescan_interval
        try:
            while not self._stopping:
                timeout = max(0.0, next_scan - time.monotonic())
                events = dict(poller.poll(math.ceil(timeout * 1000)))
                if events.get(sock):
                    sock.send_multipart(_safe_reply(sock.recv_multipart(), self.lists))
                if time.monotonic() >= next_scan:
                    self._rescan()
                    next_scan = time.monotonic() + self.rescan_interval
        finally:
            sock.close(linger=0)
            self._socket = None

    def _rescan(self) -> None:
        try:
            self.lists.refresh()
        except OSError as exc:  # a directory that vanished mid-read: next scan will tell
            log.warning("cannot re-read the allow-lists: %s", exc)


class AsyncZapAuthenticator:
    """The ZAP handler as an asyncio task, for programs that run a CURVE server in asyncio.

    Same rules as `ZapThread`. `context` may be a plain or an asyncio pyzmq context; the
    handler binds on it (shadowing it for asyncio) so sockets of that context are checked.
    """

    def __init__(self, lists: AllowLists, rescan_interval: float = RESCAN_INTERVAL) -> None:
        self.lists = lists
        self.rescan_interval = rescan_interval
        self._task: asyncio.Task[None] | None = None
        self._socket: zmq.asyncio.Socket | None = None

    def start(self, context: zmq.Context[Any]) -> None:
        actx = zmq.asyncio.Context.shadow(context.underlying)
        sock = actx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise SecurityError(f"cannot start the ZAP handler: {exc}") from None
        self._socket = sock
        self._task = asyncio.get_running_loop().create_task(self._run(sock), name="mdp-zap")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, sock: zmq.asyncio.Socket) -> None:
        next_scan = time.monotonic() + self.rescan_interval
        try:
            while True:
                timeout = max(0.0, next_scan - time.monotonic())
                if await sock.poll(math.ceil(timeout * 1000)):
                    request = await sock.recv_multipart()
                    await sock.send_multipart(_safe_reply(request, self.lists))
                if time.monotonic() >= next_scan:
                    try:
                        self.lists.refresh()
                    except OSError as exc:
                        log.warning("cannot re-read the allow-lists: %s", exc)
                    next_scan = time.monotonic() + self.rescan_interval
        finally:
            sock.close(linger=0)
            self._socket = None


# ------------------------------------------------------------------------------------------
# The broker's side


CLIENT_ROLE: Final = 1
WORKER_ROLE: Final = 2
_ROLE_OF_HEADER: Final[Mapping[bytes, int]] = {
    b"MDPC01": CLIENT_ROLE,
    b"MDPC02": CLIENT_ROLE,
    b"MDPW01": WORKER_ROLE,
    b"MDPW02": WORKER_ROLE,
}
_REFUSAL_LOG_INTERVAL: Final = 1.0


class BrokerAuth:
    """CURVE for the broker: its key pair, the allow-lists, the ZAP handler, the role check.

    The server calls `socket_options()` before binding, `start(context)` before binding,
    `admit(frames, user_id)` for every message (frames include the ROUTER identity),
    `revoked_workers()` when `lists.generation` changed, `prune(...)` now and then, and
    `stop()` at the end.
    """

    def __init__(
        self,
        key_pair: KeyPair,
        lists: AllowLists,
        *,
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> None:
        self.key_pair = key_pair
        self.lists = lists
        self.zap = ZapThread(lists, rescan_interval)
        self.worker_keys: dict[bytes, str] = {}
        """ROUTER identity -> key of the last worker message from it (to expel on revocation)."""
        self.refused = 0
        """Messages dropped because their key lost its place in the allow-lists or has the
        wrong role for the message."""
        self.audit_pending: list[tuple[str, bytes, bytes]] = []
        """Requests admitted since the last `flush_audit()`: (key name, identity, service)."""
        self._audit = False
        self._last_refusal_log = 0.0

    @classmethod
    def from_files(
        cls,
        secret_key_file: str | os.PathLike[str],
        clients: str | os.PathLike[str] | None,
        workers: str | os.PathLike[str] | None,
        *,
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> BrokerAuth:
        """Load the broker's key pair and allow-list directories (KeyFileError if unusable)."""
        return cls(
            load_key_pair(secret_key_file),
            AllowLists(clients, workers),
            rescan_interval=rescan_interval,
        )

    def socket_options(self) -> SocketOptions:
        """Options that make a ROUTER a CURVE server whose handshakes ZAP must approve."""
        return [
            (zmq.CURVE_SERVER, 1),
            (zmq.CURVE_SECRETKEY, self.key_pair.secret),
            (zmq.CURVE_PUBLICKEY, self.key_pair.public),
            (zmq.ZAP_DOMAIN, ZAP_DOMAIN),
            # Without a ZAP handler, fail the handshake rather than let everyone in.
            (zmq.ZAP_ENFORCE_DOMAIN, 1),
        ]

    def start(self, context: zmq.Context[Any]) -> None:
        self._audit = audit.isEnabledFor(logging.INFO)
        self.zap.start(context)

    def stop(self) -> None:
        self.zap.stop()

    def admit(self, frames: list[bytes], user_id: str | None) -> bool:
        """May this message (ROUTER identity first) go to the broker core?

        A message whose key is no longer allowed, or whose header does not match the key's
        role, is refused (and counted). Anything else passes; the core then judges the MDP.
        """
        peer = self.lists.peers.get(user_id) if user_id is not None else None
        if peer is None:
            self._refuse(frames[0], user_id, "key not in the allow-lists (revoked?)")
            return False
        n = len(frames)
        if n < 3:
            return True  # no MDP message; the core drops and counts it
        index = 2 if not frames[1] else 1
        header = frames[index] if index < n else b""
        role = _ROLE_OF_HEADER.get(header)
        if role == CLIENT_ROLE:
            if not peer.client:
                self._refuse(frames[0], peer.name, "a worker key may not send requests")
                return False
            if self._audit:
                # v0.1: header service...; v0.2: header command service...
                at = index + (1 if header == b"MDPC01" else 2)
                self.audit_pending.append((peer.name, frames[0], frames[at] if at < n else b""))
        elif role == WORKER_ROLE:
            if not peer.worker:
                self._refuse(frames[0], peer.name, "a client key may not act as a worker")
                return False
            self.worker_keys[frames[0]] = peer.key
        return True

    def flush_audit(self) -> None:
        """Log the requests admitted since the last call: one record per call (the server calls
        it once per batch), so under load the audit trail costs one log record per batch."""
        pending = self.audit_pending
        if not pending:
            return
        lines = [
            f"client {name!r} (connection {identity.hex()}) for service "
            f"{service.decode('utf-8', 'replace')!r}"
            for name, identity, service in pending
        ]
        pending.clear()
        if len(lines) == 1:
            audit.info("request from %s", lines[0])
        else:
            audit.info("%d requests: from %s", len(lines), "; from ".join(lines))

    def revoked_workers(self) -> list[bytes]:
        """Identities whose last worker message came from a key no longer allowed as worker."""
        peers = self.lists.peers
        gone = [
            identity
            for identity, key in self.worker_keys.items()
            if (peer := peers.get(key)) is None or not peer.worker
        ]
        for identity in gone:
            del self.worker_keys[identity]
        return gone

    def prune(self, registered: Mapping[bytes, object]) -> None:
        """Forget identities that are no longer registered workers."""
        if len(self.worker_keys) > len(registered):
            for identity in [i for i in self.worker_keys if i not in registered]:
                del self.worker_keys[identity]

    def _refuse(self, identity: bytes, who: str | None, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        # Rate-limited: a refused peer may send thousands of messages.
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
            self._last_refusal_log = now
            log.warning(
                "dropped a message from %s (connection %s): %s [%d refused so far]",
                who,
                identity.hex(),
                why,
                self.refused,
            )


# ------------------------------------------------------------------------------------------
# Clients and workers


def curve_client_options(
    secret_key_file: str | os.PathLike[str], server_key_file: str | os.PathLike[str]
) -> SocketOptions:
    """Socket options that make a DEALER/REQ a CURVE client of the broker.

    `secret_key_file`: this peer's `NAME.key_secret`; `server_key_file`: the broker's public
    `NAME.key` (its `.key_secret` works too, but do not hand that out). Set them before
    connecting. Raises KeyFileError.
    """
    pair = load_key_pair(secret_key_file)
    server = load_public_key(server_key_file)
    return [
        (zmq.CURVE_SERVERKEY, server),
        (zmq.CURVE_PUBLICKEY, pair.public),
        (zmq.CURVE_SECRETKEY, pair.secret),
    ]


# ------------------------------------------------------------------------------------------
# Worker policy: which commands, with what environment and limits

_SHELL_CONTROL = re.compile(r"[;&|`\n\r<>]|\$\(")
_LOADER_VARIABLES = re.compile(r"^(PATH|IFS|ENV|BASH_ENV|LD_\w*|DYLD_\w*|PYTHON\w*)$")


@dataclass(frozen=True, slots=True)
class CommandPolicy:
    """What the command services accept (spec/security.md, "Worker policy").

    `allow`: fnmatch patterns (case-sensitive). Empty: every command is allowed. Otherwise,
    for "os" the executable as the request names it must match one pattern (a pattern without
    `/` only matches a bare name looked up in PATH, never a path) and may not contain `..`;
    for "shell" the first word must match and the line may not contain `;`, `&`, `|`, `` ` ``,
    `$(`, `<`, `>` or a newline (otherwise any command could follow an allowed one).
    `deny_env`: reject any request that carries environment variables. Whatever `deny_env`
    says, with an allow-list a request may not set PATH, IFS, ENV, BASH_ENV, LD_*, DYLD_* or
    PYTHON* (they change which program runs).
    """

    allow: tuple[str, ...] = ()
    deny_env: bool = False

    def check(self, service: str, command: str, env: Mapping[str, str] | None = None) -> str | None:
        """None if the request may run; otherwise why it is rejected (for the client)."""
        if env and self.deny_env:
            return "this worker does not accept environment variables (--deny-env)"
        if not self.allow:
            return None
        if env:
            bad = sorted(k for k in env if _LOADER_VARIABLES.match(k))
            if bad:
                return f"environment variables not allowed with --allow: {', '.join(bad)}"
        if service == "shell":
            if _SHELL_CONTROL.search(command):
                return "shell control characters (; & | ` $( < > newline) are not allowed"
            words = command.split()
            program = words[0] if words else ""
        else:
            program = command
        if ".." in Path(program).parts:
            return f"{program!r}: '..' is not allowed in a program path"
        if self.allows(program):
            return None
        return f"{program!r} does not match any allowed pattern"

    def allows(self, program: str) -> bool:
        for pattern in self.allow:
            if "/" not in pattern and "/" in program:
                continue
            if fnmatch.fnmatchcase(program, pattern):
                return True
        return False


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """How a command's child process is confined: resource limits and the user it runs as.

    `max_memory`: RLIMIT_AS in bytes (address space: a command that asks for more gets ENOMEM
    / MemoryError instead of pushing the machine into swap). `max_procs`: RLIMIT_NPROC, counted
    per user, so it is meaningful with `user` (a dedicated account). `user`: run commands as
    this account; needs the worker to run as root. Limits are set in the child between fork
    and exec (`preexec_fn`, which only calls setrlimit); the user switch is done by
    subprocess itself (`user=`, `group=`, `extra_groups=`).
    """

    max_memory: int | None = None
    max_procs: int | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError("--max-memory must be positive")
        if self.max_procs is not None and self.max_procs <= 0:
            raise ValueError("--max-procs must be positive")

    def check_user(self) -> pwd.struct_passwd | None:
        """The account for `user` (ValueError if unknown or if we are not root)."""
        if self.user is None:
            return None
        try:
            account = pwd.getpwnam(self.user)
        except KeyError:
            raise ValueError(f"--user {self.user}: no such user") from None
        if os.geteuid() != 0:
            raise ValueError(f"--user {self.user} needs the worker to be started as root")
        return account

    def popen_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for subprocess / asyncio.create_subprocess_exec."""
        kwargs: dict[str, Any] = {}
        account = self.check_user()
        if account is not None:
            kwargs["user"] = account.pw_uid
            kwargs["group"] = account.pw_gid
            kwargs["extra_groups"] = os.getgrouplist(account.pw_name, account.pw_gid)
        preexec = self.preexec()
        if preexec is not None:
            kwargs["preexec_fn"] = preexec
        return kwargs

    def preexec(self) -> Callable[[], None] | None:
        """The function the child runs before exec, or None if there are no limits."""
        limits: list[tuple[int, int]] = []
        if self.max_memory is not None:
            limits.append((resource.RLIMIT_AS, self.max_memory))
        if self.max_procs is not None:
            limits.append((resource.RLIMIT_NPROC, self.max_procs))
        if not limits:
            return None
        setrlimit = resource.setrlimit

        def set_limits() -> None:  # runs in the forked child: syscalls only, no imports/locks
            for which, value in limits:
                setrlimit(which, (value, value))

        return set_limits
