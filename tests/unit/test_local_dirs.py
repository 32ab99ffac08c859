"""The private runtime and config directories (mdp.local_dirs, spec/security.md "Local
boundary"): where the default endpoint and the key set live, and what makes us refuse them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mdp.local_dirs import (
    FALLBACK_RUNTIME_BASE,
    PrivateDirError,
    config_dir,
    default_endpoint,
    ensure_private_dir,
    runtime_dir,
)
from mdp.security import load_key_pair, load_public_key
from mdp.security.keyset import KeySetError, find_key_set, init_key_set

pytestmark = pytest.mark.timeout(10)

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to make a directory owned by another user"
)


def short_tmp() -> Path:
    """A short private temporary directory (unix socket paths are limited to 107 bytes)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="mdp-t-"))


def test_default_endpoint_is_an_ipc_socket_in_a_private_runtime_dir() -> None:
    base = short_tmp()
    endpoint = default_endpoint({"XDG_RUNTIME_DIR": str(base)})
    assert endpoint == f"ipc://{base}/mdp/broker.sock"
    assert (base / "mdp").stat().st_mode & 0o777 == 0o700


def test_runtime_dir_falls_back_to_a_per_uid_dir_without_xdg_runtime_dir() -> None:
    expected = Path(FALLBACK_RUNTIME_BASE) / f"mdp-{os.geteuid()}"
    assert runtime_dir({}) == expected
    assert runtime_dir({"XDG_RUNTIME_DIR": "relative/dir"}) == expected


@ROOT_ONLY
def test_an_inherited_xdg_runtime_dir_of_another_user_is_not_used() -> None:
    base = short_tmp()
    os.chown(base, 65534, 65534)  # as after `su` kept the caller's XDG_RUNTIME_DIR
    assert (
        runtime_dir({"XDG_RUNTIME_DIR": str(base)})
        == Path(FALLBACK_RUNTIME_BASE) / f"mdp-{os.geteuid()}"
    )


def test_a_directory_open_to_others_is_refused_with_the_fix() -> None:
    base = short_tmp()
    (base / "mdp").mkdir(mode=0o755)
    (base / "mdp").chmod(0o755)
    with pytest.raises(PrivateDirError, match=r"mode 0755.*chmod 700"):
        default_endpoint({"XDG_RUNTIME_DIR": str(base)})


def test_a_symlink_is_refused() -> None:
    base = short_tmp()
    (base / "elsewhere").mkdir(mode=0o700)
    (base / "mdp").symlink_to(base / "elsewhere")
    with pytest.raises(PrivateDirError, match="symbolic link"):
        default_endpoint({"XDG_RUNTIME_DIR": str(base)})


@ROOT_ONLY
def test_a_directory_made_by_another_user_is_refused() -> None:
    base = short_tmp()
    squatted = base / "mdp"
    squatted.mkdir(mode=0o700)
    os.chown(squatted, 65534, 65534)
    with pytest.raises(PrivateDirError, match=r"belongs to .*uid 65534"):
        default_endpoint({"XDG_RUNTIME_DIR": str(base)})


def test_a_socket_path_too_long_for_unix_sockets_is_refused() -> None:
    base = short_tmp() / ("x" * 100)
    base.mkdir(mode=0o700)
    with pytest.raises(PrivateDirError, match="longer than a unix socket path"):
        default_endpoint({"XDG_RUNTIME_DIR": str(base)})


def test_ensure_private_dir_creates_missing_parents_privately(tmp_path: Path) -> None:
    target = tmp_path / "home" / ".config" / "mdp"
    assert ensure_private_dir(target) == target
    assert target.stat().st_mode & 0o777 == 0o700


def test_config_dir_follows_xdg_config_home_then_home() -> None:
    assert config_dir({"XDG_CONFIG_HOME": "/c"}) == Path("/c/mdp")
    assert config_dir({"HOME": "/h"}) == Path("/h/.config/mdp")


# ------------------------------------------------------------------------------------------
# The key set


def test_init_makes_three_key_pairs_and_the_allow_lists(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    made = init_key_set(env)
    found = find_key_set(env)
    assert found == made
    secret, clients, workers = found.broker_files()
    assert load_key_pair(secret).public == load_public_key(found.public("broker"))
    client_secret, server = found.peer_files("client")
    assert load_public_key(clients / "client.key") == load_key_pair(client_secret).public
    worker_secret, _ = found.peer_files("worker")
    assert load_public_key(workers / "worker.key") == load_key_pair(worker_secret).public
    assert server == found.public("broker")
    for role in ("broker", "client", "worker"):
        assert found.secret(role).stat().st_mode & 0o777 == 0o600
    assert made.root.stat().st_mode & 0o777 == 0o700


def test_init_never_overwrites_a_key_set(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    made = init_key_set(env)
    before = made.secret("broker").read_bytes()
    with pytest.raises(FileExistsError):
        init_key_set(env)
    assert made.secret("broker").read_bytes() == before


def test_no_key_set_means_none(tmp_path: Path) -> None:
    assert find_key_set({"XDG_CONFIG_HOME": str(tmp_path)}) is None


def test_a_key_set_missing_a_file_names_it(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    made = init_key_set(env)
    made.secret("worker").unlink()
    found = find_key_set(env)
    assert found is not None
    with pytest.raises(KeySetError, match=r"keys/worker\.key_secret"):
        found.peer_files("worker")
    found.peer_files("client")  # the others still work


def test_a_key_set_open_to_others_is_not_used(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    made = init_key_set(env)
    made.root.chmod(0o755)
    with pytest.raises(KeySetError, match="not using the key set"):
        find_key_set(env)
