"""mdp.security without a broker: key files, endpoint exposure (mdp.endpoints), allow-lists, ZAP
replies (RFC 27) and the broker's per-message role check."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth
import zmq.utils.z85
from click.testing import CliRunner

from mdp.broker.boundary import insecure_refusal
from mdp.endpoints import is_local_endpoint, unauthenticated_endpoints
from mdp.keys_cli import main as keys_main
from mdp.security import (
    AllowLists,
    BrokerAuth,
    KeyFileError,
    curve_client_options,
    generate_key_pair,
    load_key_pair,
    load_public_key,
    write_public_key,
    zap_reply,
)

# --- key files ----------------------------------------------------------------------------


def test_generate_writes_a_public_file_and_a_0600_secret_file(tmp_path: Path) -> None:
    public, secret = generate_key_pair("alice", tmp_path / "keys")
    assert (public.name, secret.name) == ("alice.key", "alice.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pair = load_key_pair(secret)
    assert load_public_key(public) == pair.public
    assert zmq.curve_public(pair.secret) == pair.public
    # the pyzmq reader agrees (create_certificates format)
    assert zmq.auth.load_certificate(secret) == (pair.public, pair.secret)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
        "alice.key",
        "alice.key_secret",
    ]


def test_generate_never_overwrites_a_key(tmp_path: Path) -> None:
    generate_key_pair("alice", tmp_path)
    before = (tmp_path / "alice.key_secret").read_bytes()
    with pytest.raises(FileExistsError):
        generate_key_pair("alice", tmp_path)
    assert (tmp_path / "alice.key_secret").read_bytes() == before


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a/b", "a b"])
def test_generate_refuses_names_that_are_not_plain_file_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        generate_key_pair(name, tmp_path)


def test_a_public_key_file_is_not_a_key_pair(tmp_path: Path) -> None:
    public, _ = generate_key_pair("alice", tmp_path)
    with pytest.raises(KeyFileError, match="no secret key"):
        load_key_pair(public)


def test_a_mismatched_key_pair_is_refused(tmp_path: Path) -> None:
    _, secret = generate_key_pair("alice", tmp_path)
    other_public, _ = zmq.curve_keypair()
    text = secret.read_text()
    secret.write_text(text.replace(load_public_key(secret).decode(), other_public.decode()))
    with pytest.raises(KeyFileError, match="does not belong"):
        load_key_pair(secret)


def test_garbage_and_missing_key_files_raise_key_file_error(tmp_path: Path) -> None:
    (tmp_path / "junk.key").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "junk.key")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "missing.key")


def test_write_public_key_writes_only_the_public_half(tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    path = write_public_key(public, tmp_path / "allowed" / "bob.key")
    assert zmq.auth.load_certificate(path) == (public, None)
    assert secret not in path.read_bytes()


def test_curve_client_options_carry_own_pair_and_server_key(tmp_path: Path) -> None:
    _, mine = generate_key_pair("alice", tmp_path)
    server_public, _ = generate_key_pair("broker", tmp_path)
    options = dict(curve_client_options(mine, server_public))
    pair = load_key_pair(mine)
    assert options == {
        zmq.CURVE_SERVERKEY: load_public_key(server_public),
        zmq.CURVE_PUBLICKEY: pair.public,
        zmq.CURVE_SECRETKEY: pair.secret,
    }


# --- where the broker may listen without CURVE ------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.9.10:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://lo:5555", True),
        ("tcp://[::ffff:127.0.0.1]:5555", True),
        ("ipc:///tmp/mdp.sock", True),
        ("inproc://broker", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://10.0.0.5:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://broker.example.com:5555", False),
        ("ws://127.0.0.1:5555", False),
        ("udp://127.0.0.1:5555", False),
        ("nonsense", False),
    ],
)
def test_only_loopback_ipc_and_inproc_count_as_local(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


def test_the_refusal_explains_the_set_up_with_exact_commands() -> None:
    assert unauthenticated_endpoints(["ipc:///x", "tcp://127.0.0.1:1", "tcp://*:2"]) == [
        "tcp://127.0.0.1:1",
        "tcp://*:2",
    ]
    text = insecure_refusal(["tcp://*:2"])
    for needle in (
        "mdp-keys generate broker --dir keys",
        "mdp-keys allow client keys/alice.key --dir allowed/clients",
        "mdp-keys allow worker keys/worker1.key --dir allowed/workers",
        "--curve-secret-key keys/broker.key_secret",
        "--insecure",
    ):
        assert needle in text


# --- allow-lists --------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    keys, clients, workers = tmp_path / "keys", tmp_path / "clients", tmp_path / "workers"
    for d in (keys, clients, workers):
        d.mkdir()
    for name in ("alice", "bob", "w1", "broker"):
        generate_key_pair(name, keys)
    write_public_key(load_public_key(keys / "alice.key"), clients / "alice.key")
    write_public_key(load_public_key(keys / "w1.key"), workers / "w1.key")
    return keys, clients, workers


def raw(keys: Path, name: str) -> bytes:
    return zmq.utils.z85.decode(load_public_key(keys / f"{name}.key"))


def test_allow_lists_give_each_key_its_role_and_name(dirs: tuple[Path, Path, Path]) -> None:
    keys, clients, workers = dirs
    lists = AllowLists(clients, workers)
    alice, w1 = lists.lookup(raw(keys, "alice")), lists.lookup(raw(keys, "w1"))
    assert alice is not None and (alice.name, alice.client, alice.worker) == ("alice", True, False)
    assert w1 is not None and (w1.name, w1.client, w1.worker) == ("w1", False, True)
    assert lists.lookup(raw(keys, "bob")) is None


def test_a_key_in_both_lists_has_both_roles(dirs: tuple[Path, Path, Path]) -> None:
    keys, clients, workers = dirs
    write_public_key(load_public_key(keys / "alice.key"), workers / "alice.key")
    peer = AllowLists(clients, workers).lookup(raw(keys, "alice"))
    assert peer is not None and peer.client and peer.worker


def test_refresh_sees_added_and_removed_keys(dirs: tuple[Path, Path, Path]) -> None:
    keys, clients, workers = dirs
    lists = AllowLists(clients, workers)
    generation = lists.generation
    assert lists.refresh() is False and lists.generation == generation
    write_public_key(load_public_key(keys / "bob.key"), clients / "bob.key")
    assert lists.refresh() is True and lists.generation == generation + 1
    assert lists.lookup(raw(keys, "bob")) is not None
    (clients / "alice.key").unlink()
    assert lists.refresh() is True
    assert lists.lookup(raw(keys, "alice")) is None


def test_refresh_sees_a_key_file_rewritten_in_place(dirs: tuple[Path, Path, Path]) -> None:
    keys, clients, workers = dirs
    lists = AllowLists(clients, workers)
    path = clients / "alice.key"
    path.write_text(
        path.read_text().replace(
            load_public_key(keys / "alice.key").decode(), load_public_key(keys / "bob.key").decode()
        )
    )
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert lists.refresh() is True
    assert lists.lookup(raw(keys, "alice")) is None
    assert lists.lookup(raw(keys, "bob")) is not None


def test_junk_files_are_skipped_and_a_vanished_directory_allows_nobody(
    dirs: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    keys, clients, workers = dirs
    (clients / "junk.key").write_text("not a certificate\n")
    lists = AllowLists(clients, workers)
    assert lists.lookup(raw(keys, "alice")) is not None
    assert "ignoring allow-list file" in caplog.text
    for path in clients.iterdir():
        path.unlink()
    clients.rmdir()
    assert lists.refresh() is True
    assert lists.lookup(raw(keys, "alice")) is None
    assert lists.lookup(raw(keys, "w1")) is not None


def test_a_missing_directory_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        AllowLists(tmp_path / "nope", None)


# --- ZAP (RFC 27) -------------------------------------------------------------------------


def zap_request(key: bytes, mechanism: bytes = b"CURVE", domain: bytes = b"mdp") -> list[bytes]:
    return [b"1.0", b"7", domain, b"10.1.2.3", b"", mechanism, key]


def test_zap_accepts_an_allowed_key_with_its_z85_as_user_id(
    dirs: tuple[Path, Path, Path],
) -> None:
    """RFC 27: the reply echoes version and request id; 200 carries the user id."""
    keys, clients, workers = dirs
    reply = zap_reply(zap_request(raw(keys, "alice")), AllowLists(clients, workers))
    assert reply == [b"1.0", b"7", b"200", b"OK", load_public_key(keys / "alice.key"), b""]


def test_zap_refuses_an_unknown_key_with_400(dirs: tuple[Path, Path, Path]) -> None:
    """RFC 27: "400" is an authentication failure; the user id of a failure is empty."""
    keys, clients, workers = dirs
    reply = zap_reply(zap_request(raw(keys, "bob")), AllowLists(clients, workers))
    assert reply[:3] == [b"1.0", b"7", b"400"] and reply[4] == b""


def test_zap_refuses_other_mechanisms_and_domains(dirs: tuple[Path, Path, Path]) -> None:
    keys, clients, workers = dirs
    lists = AllowLists(clients, workers)
    assert zap_reply([b"1.0", b"1", b"mdp", b"1.2.3.4", b"", b"NULL"], lists)[2] == b"400"
    assert zap_reply(zap_request(raw(keys, "alice"), b"PLAIN"), lists)[2] == b"400"
    assert zap_reply(zap_request(raw(keys, "alice"), domain=b"x"), lists)[2] == b"400"
    assert zap_reply([b"9.9", b"1", b"mdp", b"a", b"", b"CURVE", b"k" * 32], lists)[2] == b"500"
    assert zap_reply([b"1.0"], lists)[2] == b"500"


def test_zap_sees_a_key_added_a_moment_ago(dirs: tuple[Path, Path, Path]) -> None:
    keys, clients, workers = dirs
    lists = AllowLists(clients, workers)
    write_public_key(load_public_key(keys / "bob.key"), clients / "bob.key")
    assert zap_reply(zap_request(raw(keys, "bob")), lists)[2] == b"200"


# --- the broker's role check --------------------------------------------------------------


def user(keys: Path, name: str) -> str:
    return load_public_key(keys / f"{name}.key").decode()


@pytest.fixture
def auth(dirs: tuple[Path, Path, Path]) -> BrokerAuth:
    keys, clients, workers = dirs
    return BrokerAuth.from_files(keys / "broker.key_secret", clients, workers)


REQUEST_V02 = [b"C", b"MDPC02", b"\x01", b"shell", b"body"]
REQUEST_V01 = [b"C", b"", b"MDPC01", b"shell", b"body"]
READY_V02 = [b"W", b"MDPW02", b"\x01", b"shell"]
READY_V01 = [b"W", b"", b"MDPW01", b"\x01", b"shell"]


@pytest.mark.parametrize("message", [REQUEST_V02, REQUEST_V01])
def test_a_client_key_may_send_requests(
    auth: BrokerAuth, dirs: tuple[Path, Path, Path], message: list[bytes]
) -> None:
    assert auth.admit(message, user(dirs[0], "alice")) is True


@pytest.mark.parametrize("message", [READY_V02, READY_V01])
def test_a_client_key_may_not_act_as_a_worker(
    auth: BrokerAuth, dirs: tuple[Path, Path, Path], message: list[bytes]
) -> None:
    assert auth.admit(message, user(dirs[0], "alice")) is False
    assert auth.refused == 1


@pytest.mark.parametrize("message", [REQUEST_V02, REQUEST_V01])
def test_a_worker_key_may_not_send_requests(
    auth: BrokerAuth, dirs: tuple[Path, Path, Path], message: list[bytes]
) -> None:
    assert auth.admit(message, user(dirs[0], "w1")) is False


def test_a_worker_key_may_act_as_a_worker(auth: BrokerAuth, dirs: tuple[Path, Path, Path]) -> None:
    assert auth.admit(READY_V02, user(dirs[0], "w1")) is True
    assert auth.worker_keys == {b"W": user(dirs[0], "w1")}


def test_a_message_without_user_id_or_from_a_revoked_key_is_refused(
    auth: BrokerAuth, dirs: tuple[Path, Path, Path]
) -> None:
    keys, clients, _ = dirs
    assert auth.admit(REQUEST_V02, None) is False
    (clients / "alice.key").unlink()
    auth.lists.refresh()
    assert auth.admit(REQUEST_V02, user(keys, "alice")) is False


def test_garbage_from_an_allowed_key_is_left_to_the_core(
    auth: BrokerAuth, dirs: tuple[Path, Path, Path]
) -> None:
    for message in ([b"C", b"x"], [b"C", b"", b""], [b"C", b"junk", b"1", b"2"]):
        assert auth.admit(message, user(dirs[0], "alice")) is True


def test_every_authenticated_request_is_audited_with_the_key_name(
    auth: BrokerAuth, dirs: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mdp.audit")
    auth._audit = True
    auth.admit(REQUEST_V02, user(dirs[0], "alice"))
    auth.flush_audit()
    auth.admit(REQUEST_V01, user(dirs[0], "alice"))
    auth.admit([b"D", b"", b"MDPC02", b"\x01", b"os", b"body"], user(dirs[0], "alice"))
    auth.flush_audit()
    auth.flush_audit()  # nothing pending: nothing logged
    lines = [r.getMessage() for r in caplog.records if r.name == "mdp.audit"]
    assert lines == [
        "request from client 'alice' (connection 43) for service 'shell'",
        "2 requests: from client 'alice' (connection 43) for service 'shell'; "
        "from client 'alice' (connection 44) for service 'os'",
    ]
    assert auth.key_pair.secret.decode() not in caplog.text


def test_revoked_workers_are_the_identities_of_revoked_worker_keys(
    auth: BrokerAuth, dirs: tuple[Path, Path, Path]
) -> None:
    keys, _, workers = dirs
    auth.admit(READY_V02, user(keys, "w1"))
    assert auth.revoked_workers() == []
    (workers / "w1.key").unlink()
    auth.lists.refresh()
    assert auth.revoked_workers() == [b"W"]
    assert auth.worker_keys == {}


def test_prune_forgets_identities_that_are_no_longer_workers(
    auth: BrokerAuth, dirs: tuple[Path, Path, Path]
) -> None:
    auth.admit(READY_V02, user(dirs[0], "w1"))
    auth.prune({b"W": object()})
    assert b"W" in auth.worker_keys
    auth.prune({})
    assert auth.worker_keys == {}


# --- mdp-keys -----------------------------------------------------------------------------


def test_mdp_keys_generate_allow_list_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    result = runner.invoke(keys_main, ["generate", "alice", "--dir", str(keys)])
    assert result.exit_code == 0, result.output
    assert (keys / "alice.key").exists() and (keys / "alice.key_secret").exists()
    result = runner.invoke(
        keys_main, ["allow", "client", str(keys / "alice.key_secret"), "--dir", str(allowed)]
    )
    assert result.exit_code == 0, result.output
    assert zmq.auth.load_certificate(allowed / "alice.key") == (
        load_public_key(keys / "alice.key"),
        None,
    )
    result = runner.invoke(keys_main, ["list", str(allowed)])
    assert result.output == f"alice\t{load_public_key(keys / 'alice.key').decode()}\n"
    result = runner.invoke(keys_main, ["revoke", "client", "alice", "--dir", str(allowed)])
    assert result.exit_code == 0 and not (allowed / "alice.key").exists()


def test_mdp_keys_refuses_to_overwrite_or_to_replace_another_key(tmp_path: Path) -> None:
    runner = CliRunner()
    runner.invoke(keys_main, ["generate", "a", "--dir", str(tmp_path)])
    runner.invoke(keys_main, ["generate", "b", "--dir", str(tmp_path)])
    assert runner.invoke(keys_main, ["generate", "a", "--dir", str(tmp_path)]).exit_code == 1
    allowed = str(tmp_path / "allowed")
    assert (
        runner.invoke(
            keys_main, ["allow", "worker", str(tmp_path / "a.key"), "--dir", allowed]
        ).exit_code
        == 0
    )
    result = runner.invoke(
        keys_main, ["allow", "worker", str(tmp_path / "b.key"), "--dir", allowed, "--name", "a"]
    )
    assert result.exit_code == 1 and "different key" in result.output


# --- the library's safe default -----------------------------------------------------------


def test_broker_server_refuses_an_exposed_endpoint_before_binding() -> None:
    from mdp.broker.server import BrokerServer, InsecureBindError

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        server = BrokerServer(["tcp://127.0.0.1:0", "tcp://0.0.0.0:0"], context=context)
        with pytest.raises(InsecureBindError, match="mdp-keys generate"):
            server.bind()
        assert server.bound == []
    finally:
        context.destroy(linger=0)


def test_a_failing_zap_handler_refuses_instead_of_dying(
    dirs: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from mdp.security.zap import safe_reply as _safe_reply

    keys, clients, workers = dirs
    lists = AllowLists(clients, workers)

    def broken() -> bool:
        raise RuntimeError("bug")

    lists.refresh = broken  # type: ignore[method-assign]
    assert _safe_reply(zap_request(raw(keys, "alice")), lists)[:3] == [b"1.0", b"7", b"500"]
    assert "ZAP handler failed" in caplog.text
