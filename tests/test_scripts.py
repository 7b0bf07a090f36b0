"""The scripts/ commands as a new user meets them: --help, a run before scripts/setup, the demo's knobs, a
pool that cannot start under the demo, and SIGTERM to the demo. Each runs the real script in a copy of the
repository's scripts/ beside a stub scripts/setup (nothing is installed) and a .venv/bin/python that runs
this interpreter; every process is started in its own session and killed with it at the end."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import kill_session

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root():
    """A stand-in repository root (short path: the demo binds ipc sockets under it)."""
    d = Path(tempfile.mkdtemp(prefix="bp-ux-", dir="/tmp"))
    shutil.copytree(REPO / "scripts", d / "scripts")
    (d / "scripts" / "setup").write_text('#!/usr/bin/env bash\ntouch "$(dirname "$0")/../setup-ran"\n')
    (d / ".venv" / "bin").mkdir(parents=True)
    venv_py = d / ".venv" / "bin" / "python"
    venv_py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in (d / "scripts" / "setup", venv_py):
        f.chmod(0o755)
    (d / "data").mkdir()  # no MRPC: the demo's random model / echo runs without the shared data
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL", "SIZE", "BACKEND", "PARALLEL", "CLIENTS", "CYCLE", "SWEEP", "BERTPOOL_PYTHON")}
    env.update(extra)
    return env


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies are gone already
                pids.append(int(entry))
    return pids


def _is_bench(pid: int) -> bool:
    try:
        return b"bertpool.clients.bench" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _session_left(sid: int, timeout_s: float = 20.0) -> list[int]:
    """The processes of session ``sid`` still there once it has emptied, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _session_pids(sid)


def _no_stub_python3(tmp: Path) -> str:
    """A PATH whose python3 has no bertpool (as on a fresh machine)."""
    bin_dir = tmp / "nobertpool-bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


@pytest.mark.parametrize("name", ["serve", "keys", "broker", "workers", "bench", "compile"])
def test_a_command_before_setup_says_run_setup(root, name):
    shutil.rmtree(root / ".venv")
    r = subprocess.run(["bash", str(root / "scripts" / name), "--help"], capture_output=True, text=True,
                       timeout=60, env=_env(PATH=_no_stub_python3(root)))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "run scripts/setup" in r.stderr and "ModuleNotFoundError" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_bertpool_python_that_does_not_run_is_an_error(root):
    r = subprocess.run(["bash", str(root / "scripts" / "keys"), "--help"], capture_output=True, text=True,
                       timeout=60, env=_env(BERTPOOL_PYTHON=str(root / "no such python"),
                                            PATH=_no_stub_python3(root)))
    assert r.returncode == 2 and "BERTPOOL_PYTHON" in r.stderr, (r.returncode, r.stderr)


def test_wrapper_passes_paths_with_spaces_and_exit_codes_through(root):
    keys = root / "key dir" / "sub dir"
    r = subprocess.run(["bash", str(root / "scripts" / "keys"), str(keys), "peer-a"], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert r.returncode == 0, r.stderr
    assert (keys / "peer-a.key").is_file() and (keys / "peer-a.key_secret").is_file()
    again = subprocess.run(["bash", str(root / "scripts" / "keys"), str(keys), "peer-a"], capture_output=True,
                           text=True, timeout=60, env=_env())
    assert again.returncode == 2, (again.returncode, again.stderr)  # refuses to overwrite, exit 2


@pytest.mark.parametrize("name", ["setup", "served-vs-model", "demo"])
def test_help_prints_usage_exit_0_and_runs_nothing(root, name):
    # setup: the real one (its --help must install nothing); the others in the stand-in root.
    script = REPO / "scripts" / "setup" if name == "setup" else root / "scripts" / name
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                       timeout=60, env=_env(BERTPOOL_SHARED_DATA=str(root / "data")))
    assert r.returncode == 0, (r.returncode, r.stdout[-500:], r.stderr[-500:])
    assert "usage" in r.stdout.lower() and r.stderr == "", (r.stdout, r.stderr)
    assert not (root / "setup-ran").exists() and not (root / "runs").exists()


@pytest.mark.parametrize("knob", ["MODEL=bert-base", "SIZE=huge", "PARALLEL=0", "CLIENTS=abc", "CYCLE=-1",
                                  "SWEEP=1,,4", "BACKEND=fake", "ARG"])
def test_demo_refuses_a_bad_knob_in_one_line_before_installing(root, knob):
    name, _, value = knob.partition("=")
    extra = {"MODEL": "random"} if name == "SIZE" else {}
    argv = ["bash", str(root / "scripts" / "demo")] + (["--bogus"] if name == "ARG" else [])
    env = _env(BERTPOOL_SHARED_DATA=str(root / "data"), **extra, **({name: value} if value else {}))
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        kill_session(p)
    assert p.returncode == 2, (p.returncode, out[-800:], err[-800:])
    assert err.startswith("scripts/demo: error:") and len(err.strip().splitlines()) == 1, err
    assert not (root / "setup-ran").exists() and not (root / "runs").exists()


def test_a_second_demo_in_the_same_checkout_refuses_before_installing(root):
    """Two demos in one checkout shared runs/demo: its model cache, its sockets (the second one's serve
    failed to bind, or both fine-tuned into one directory) and its report. The second now stops at once."""
    import fcntl

    (root / "runs").mkdir()
    with open(root / "runs" / "demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running demo holds it
        env = _env(BERTPOOL_SHARED_DATA=str(root / "data"), BACKEND="echo", CLIENTS="1", CYCLE="1")
        p = subprocess.Popen(["bash", str(root / "scripts" / "demo")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            out, err = p.communicate(timeout=60)
        finally:
            kill_session(p)
    assert p.returncode == 2, (p.returncode, out[-800:], err[-800:])
    assert err.startswith("scripts/demo: error: another scripts/demo is running in this checkout"), err
    assert len(err.strip().splitlines()) == 1 and not (root / "setup-ran").exists()


def test_demo_stops_when_its_pool_cannot_start(root):
    """PARALLEL over serve's bound: serve exits 2 at once; the bench used to wait for its workers for 600 s."""
    env = _env(BERTPOOL_SHARED_DATA=str(root / "data"), BACKEND="echo", PARALLEL="1000", CLIENTS="1", CYCLE="1")
    p = subprocess.Popen(["bash", str(root / "scripts" / "demo")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=90)
        left = _session_left(p.pid)
    finally:
        kill_session(p)
    assert p.returncode == 2, (p.returncode, err[-1500:])
    assert "bertpool-serve stopped" in err and "--parallel must be at most" in err, err
    assert left == []


def test_sigterm_to_the_demo_stops_everything_it_started(root):
    env = _env(BERTPOOL_SHARED_DATA=str(root / "data"), BACKEND="echo", PARALLEL="1", CLIENTS="1",
               CYCLE="1000000")
    log = root / "runs" / "demo" / "serve.log"
    p = subprocess.Popen(["bash", str(root / "scripts" / "demo")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        bench = []
        while time.monotonic() < deadline and p.poll() is None:  # serving: a worker is ready, the bench runs
            if log.exists() and "ready, capacity" in log.read_text():
                bench = [pid for pid in _session_pids(p.pid) if _is_bench(pid)]
                if bench:
                    break
            time.sleep(0.1)
        assert p.poll() is None and bench, p.stderr.read() if p.poll() is not None else "no bench"
        os.kill(p.pid, signal.SIGTERM)  # the demo's shell alone, as `kill PID` or a CI timeout does
        _, err = p.communicate(timeout=60)
        left = _session_left(p.pid)
    finally:
        kill_session(p)
    assert p.returncode == 143, (p.returncode, err[-1500:])
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left]
