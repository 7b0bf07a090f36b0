"""CURVE key files as an operator handles them: bertpool-keys under a permissive umask, things in
the way of its files, names, directories it cannot use; secret keys where only public ones belong
(a peer's --curve-server-key, an allow-list); hidden files in an allow-list; serve's own peers.

No broker runs here: these are the checks made at start (exit 2, one line), which the live
tests in test_security.py build on.
"""

from __future__ import annotations

import argparse
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth

from bertpool.common import keys as keys_cli
from bertpool.common.errors import ConfigError
from bertpool.common.security import (CurveClientConfig, CurveServerConfig, complete_serve_args,
                                      generate_key_pairs, load_allow_list)

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE (built without libsodium)")

@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """A key directory: broker, client, worker (both files each)."""
    d = tmp_path_factory.mktemp("keys")
    generate_key_pairs(d, ["broker", "client", "worker"])
    return d


def keys_tool(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bertpool.common.keys", *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


def one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 with one ``error:`` line holding ``message``, and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


# ----------------------------------------------------------------- bertpool-keys

def test_keys_tool_under_umask_000_creates_no_directory_others_may_write(tmp_path):
    """Missing parents of DIR were made 0777 under umask 000: anyone could rename the key
    directory away and put one of their own in its place."""
    proc = keys_tool(str(tmp_path / "p" / "q" / "keys"), "broker", umask=0)
    assert proc.returncode == 0, proc.stderr
    for d in (tmp_path / "p", tmp_path / "p" / "q"):
        assert d.stat().st_mode & 0o022 == 0, f"{d} is mode {d.stat().st_mode & 0o777:04o}"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "p" / "q" / "keys").iterdir()}
    assert modes == {"broker.key": 0o644, "broker.key_secret": 0o600}
    assert stat.S_IMODE((tmp_path / "p" / "q" / "keys").stat().st_mode) == 0o700


def test_generating_keys_leaves_the_callers_umask_as_it_was(tmp_path):
    """The library call changes the process's umask while it writes (0077 for the secret files, no
    group or world write for the directories) and must put the caller's back."""
    import os

    old = os.umask(0o027)
    try:
        generate_key_pairs(tmp_path / "new" / "keys", ["a"])
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_keys_tool_refuses_a_dangling_symlink_in_the_way_without_force(tmp_path):
    """A dangling symlink at NAME.key_secret was replaced silently, though every other thing in
    the way needs --force; with --force the link itself is replaced, never followed."""
    (tmp_path / "a.key_secret").symlink_to(tmp_path / "elsewhere")
    one_line_error(keys_tool(str(tmp_path), "a"), "refusing to overwrite")
    assert (tmp_path / "a.key_secret").is_symlink() and not (tmp_path / "a.key").exists()
    assert keys_tool(str(tmp_path), "a", "--force").returncode == 0
    assert not (tmp_path / "a.key_secret").is_symlink() and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("name", ["client.key", "client.key_secret"])
def test_keys_tool_refuses_a_name_with_a_key_suffix(tmp_path, name):
    """``bertpool-keys keys/ client.key`` wrote client.key.key, which the README's
    ``cp keys/client.key allow/clients/`` never copies."""
    one_line_error(keys_tool(str(tmp_path), name), "give the bare name (client)")
    assert not list(tmp_path.iterdir())


def test_keys_tool_in_a_directory_it_cannot_search_exits_2(tmp_path, monkeypatch, capsys):
    """A DIR whose parent the user may not search: stat() itself fails (was a traceback, exit 1).
    Simulated, since root searches any directory: stat() of anything under it is EACCES."""
    locked = tmp_path / "locked"
    real_stat = Path.stat

    def stat_denied(self, *args, **kwargs):
        if str(self).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat_denied)
    assert keys_cli.main([str(locked / "keys"), "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot use key directory" in err[0] and "Permission denied" in err[0], err


def test_force_replaces_each_key_file_atomically_and_a_failed_write_keeps_the_old_keys(tmp_path, monkeypatch,
                                                                                       capsys):
    """--force unlinked the old files, then pyzmq rewrote them: a full disk (or a crash) midway left a
    truncated key, or none. Now each file is written aside, in DIR, and renamed over its name: a write
    that fails leaves the old pair as it was (and nothing beside it); one that succeeds swaps in a new
    file (a reader holding the old one still reads the old key), the secret 0600 from its creation."""
    assert keys_cli.main([str(tmp_path), "a"]) == 0
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_create = zmq.auth.create_certificates
    modes = []

    def disk_full_midway(directory, name):
        public, secret = real_create(directory, name)
        modes.append(stat.S_IMODE(Path(secret).stat().st_mode))
        Path(secret).write_bytes(Path(secret).read_bytes()[:40])  # cut short, as a full disk leaves it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zmq.auth, "create_certificates", disk_full_midway)
    assert keys_cli.main([str(tmp_path), "a", "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write keys into {tmp_path}: No space left on device" in err[0], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # whole, and no leftovers
    assert modes == [0o600]  # never readable by others, not even before its rename

    monkeypatch.setattr(zmq.auth, "create_certificates", real_create)
    with open(tmp_path / "a.key_secret", "rb") as holder:
        assert keys_cli.main([str(tmp_path), "a", "--force"]) == 0
        assert holder.read() == old["a.key_secret"]
    new = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(new) == sorted(old) and new["a.key_secret"] != old["a.key_secret"]
    assert zmq.auth.load_certificate(tmp_path / "a.key_secret")[0] == zmq.auth.load_certificate(tmp_path / "a.key")[0]
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in new}
    assert modes == {"a.key": 0o644, "a.key_secret": 0o600}


def test_keys_tool_in_a_directory_it_cannot_write_exits_2(tmp_path, monkeypatch, capsys):
    """Nothing can be created, removed or renamed in DIR (read-only, or not ours): one typed line,
    exit 2, and the key files there are left as they were. Simulated, since root writes into any
    directory: each such call on a path inside it is EACCES."""
    import builtins
    import os

    assert keys_cli.main([str(tmp_path), "a"]) == 0
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def denied_inside(real, writes=lambda *args, **kwargs: True):
        def call(path, *args, **kwargs):
            if os.fspath(path).startswith(f"{tmp_path}{os.sep}") and writes(*args, **kwargs):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", denied_inside(builtins.open, lambda mode="r", *a, **k: mode[0] in "wax"))
    monkeypatch.setattr(os, "open", denied_inside(os.open, lambda flags, *a, **k: flags & os.O_CREAT))
    for name in ("mkdir", "unlink", "replace", "rename"):
        monkeypatch.setattr(os, name, denied_inside(getattr(os, name)))
    assert keys_cli.main([str(tmp_path), "a", "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write keys into {tmp_path}: Permission denied" in err[0], err
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


# ------------------------------------------------- secret keys where public belong

def test_a_peer_refuses_the_brokers_secret_key_as_its_server_key(keys, tmp_path):
    """The broker's .key_secret given as --curve-server-key loaded quietly: the broker's secret
    had left its host, and the peer went on as if nothing were wrong."""
    with pytest.raises(ConfigError, match=r"holds a SECRET key, but --curve-server-key"):
        CurveClientConfig(server_key_file=str(keys / "broker.key_secret"),
                          secret_key_file=str(keys / "client.key_secret"))
    proc = subprocess.run([sys.executable, "-m", "bertpool.workers.worker", "--backend", "echo",
                           "--worker-address", f"ipc://{tmp_path}/b",
                           "--curve-server-key", str(keys / "broker.key_secret"),
                           "--curve-secret-key", str(keys / "worker.key_secret")],
                          capture_output=True, text=True, timeout=60)
    one_line_error(proc, "--curve-server-key")


@pytest.mark.parametrize("copy_as", ["client.key_secret", "client.key"])
def test_an_allow_list_holding_a_secret_key_is_refused(keys, tmp_path, copy_as):
    """``cp keys/client.key* allow/`` (or a secret renamed .key) loaded quietly, leaving a peer's
    secret key in a directory that is copied and read more freely than its owner would allow."""
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(keys / "client.key", allow / "other.key")
    shutil.copy(keys / "client.key_secret", allow / copy_as)
    with pytest.raises(ConfigError, match="secret key files|holds a SECRET key") as caught:
        load_allow_list(allow, "client")
    assert str(allow) in str(caught.value) and "public key" in str(caught.value)


def test_an_allow_list_skips_hidden_files_as_the_shells_glob_does(keys, tmp_path):
    """An editor's lock file (a dangling symlink ``.#client.key``) or a hidden leftover made the
    whole list fail to load, and a SIGHUP reload be refused."""
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(keys / "client.key", allow)
    (allow / ".#client.key").symlink_to("root@host.1234:1700000000")
    (allow / ".old.key").write_text("not a certificate")
    public = zmq.auth.load_certificate(keys / "client.key")[0]
    assert load_allow_list(allow, "client") == frozenset({public})


# -------------------------------------------------------------- serve's own peers

def serve_args(keys: Path) -> argparse.Namespace:
    return argparse.Namespace(curve_client_secret_key=str(keys / "worker.key_secret"),
                              curve_gateway_secret_key=None, gateway_http=None, gateway_grpc=None)


def test_serve_gives_its_own_peers_the_brokers_public_key_file(keys, tmp_path):
    """serve's workers and gateway get the broker's public NAME.key; without one beside the secret
    file it is an error at start (its peers used to be handed the broker's secret file instead)."""
    allow_c, allow_w = tmp_path / "c", tmp_path / "w"
    allow_c.mkdir(), allow_w.mkdir()
    shutil.copy(keys / "client.key", allow_c)
    shutil.copy(keys / "worker.key", allow_w)
    args = serve_args(keys)
    complete_serve_args(args, CurveServerConfig(str(keys / "broker.key_secret"), str(allow_c), str(allow_w)))
    assert args.curve_server_key == str(keys / "broker.key")

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(keys / "broker.key_secret", lone)
    with pytest.raises(ConfigError, match=r"lone/broker\.key beside --curve-secret-key"):
        complete_serve_args(serve_args(keys), CurveServerConfig(str(lone / "broker.key_secret"),
                                                                str(allow_c), str(allow_w)))
