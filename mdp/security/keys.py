"""CURVE certificate files: read, write and generate key pairs (spec/security.md, "Keys").

Keys are ordinary ZeroMQ certificate files (`zmq.auth.create_certificates` format):
`NAME.key` holds a public key, `NAME.key_secret` a key pair. The broker has a key pair;
clients and workers each have one and know the broker's public key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import zmq
import zmq.auth
import zmq.utils.z85

from mdp.errors import KeyFileError

__all__ = [
    "PUBLIC_SUFFIX",
    "SECRET_SUFFIX",
    "KeyPair",
    "check_z85_key",
    "generate_key_pair",
    "load_key_pair",
    "load_public_key",
    "valid_key_name",
    "write_public_key",
]

log = logging.getLogger("mdp.security")

PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"
_Z85_KEY_LENGTH: Final = 40
_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, both keys in Z85 text (40 bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)


def valid_key_name(name: str) -> bool:
    """A key NAME is a plain file name: letters, digits, `_`, `.`, `-`; not starting with `.`."""
    return bool(_KEY_NAME.fullmatch(name))


def check_z85_key(key: bytes | None, path: Path, what: str) -> bytes:
    """`key` if it is 40 characters of valid Z85 text; else KeyFileError naming `path`."""
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
    return check_z85_key(public, Path(path), "public key")


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
        check_z85_key(public, path, "public key"), check_z85_key(secret, path, "secret key")
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
    check_z85_key(public, path, "public key")
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
