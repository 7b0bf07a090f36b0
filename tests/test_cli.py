"""Every command: complete --help, and clear errors (no tracebacks) on bad flags."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bertpool.common.cli import parse_host_port
from bertpool.common.errors import ConfigError

MODULES = {
    "bertpool-serve": "bertpool.pool.serve",
    "bertpool-broker": "bertpool.broker.broker",
    "bertpool-workers": "bertpool.workers.supervisor",
    "bertpool-worker": "bertpool.workers.worker",
    "bertpool-bench": "bertpool.clients.bench",
    "bertpool-bench-broker": "bertpool.bench.relay",
    "bertpool-bench-backend": "bertpool.bench.backend",
    "bertpool-compile": "bertpool.compile.cli",
    "bertpool-demo-model": "bertpool.compile.demo_model",
    "bertpool-finetune": "bertpool.compile.finetune",
    "bertpool-keys": "bertpool.common.keys",
    "bertpool-bench-faults": "bertpool.bench.faults",
    "bertpool-bench-gateway": "bertpool.bench.gateway",
    "bertpool-gateway": "bertpool.gateway.gateway",
}

SHARED_FLAGS = {
    "bertpool-serve": ["--address", "--worker-address", "--backend", "--model", "--dir", "--parallel",
                       "--batch-size", "--batch-timeout-ms", "--echo-delay-ms", "--heartbeat-interval-s",
                       "--heartbeat-liveness", "--max-message-bytes", "--max-queue-bytes",
                       "--frontend-sndhwm-msgs", "--max-redispatch", "--drain-timeout-s", "--busy-poll-us"],
    "bertpool-workers": ["--worker-address", "--backend", "--model", "--parallel", "--batch-size",
                         "--batch-timeout-ms", "--heartbeat-interval-s", "--heartbeat-liveness",
                         "--max-message-bytes"],
    "bertpool-worker": ["--heartbeat-interval-s", "--heartbeat-liveness", "--max-message-bytes"],
    "bertpool-broker": ["--address", "--worker-address", "--heartbeat-interval-s", "--heartbeat-liveness",
                        "--max-message-bytes", "--max-queue-bytes", "--max-request-bytes",
                        "--frontend-sndhwm-msgs", "--max-redispatch", "--drain-timeout-s", "--busy-poll-us"],
    "bertpool-bench": ["--address", "--clients", "--cycle", "--tsv", "--json"],
    "bertpool-compile": ["--input_saved_model", "--output_saved_model", "--crude_gelu", "--target"],
    "bertpool-finetune": ["--pretrained", "--train", "--dev", "--output", "--epochs", "--batch-size",
                          "--learning-rate", "--warmup-fraction", "--seed", "--reuse"],
}


def run(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", sorted(MODULES))
def test_help_is_complete(command):
    proc = run(MODULES[command], "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in SHARED_FLAGS.get(command, []):
        assert flag in proc.stdout, f"{command} --help lacks {flag}"
    # What its exit codes mean (most said nothing), with the code every command shares.
    assert "Exit status: 0 " in " ".join(proc.stdout.split()), f"{command} --help does not say its exit status"


@pytest.mark.parametrize("module, args, message", [
    ("bertpool.pool.serve", ["--backend", "nope"], "invalid choice"),
    ("bertpool.pool.serve", ["--parallel", "0"], "parallel must be >= 1"),
    ("bertpool.pool.serve", ["--address", "localhost:1"], "must start with tcp://"),
    ("bertpool.pool.serve", ["--batch-size", "0"], "batch_size must be >= 1"),
    ("bertpool.broker.broker", ["--worker-address", "nope"], "must start with tcp://"),
    ("bertpool.broker.broker", ["--max-queue", "0"], "max_queue must be >= 1"),
    ("bertpool.broker.broker", ["--heartbeat-interval-s", "0"], "heartbeat_interval_s must be"),
    ("bertpool.broker.broker", ["--max-queue-bytes", "10"], "max_queue_bytes"),
    ("bertpool.broker.broker", ["--frontend-sndhwm-msgs", "0"], "frontend_sndhwm_msgs must be >= 1"),
    ("bertpool.pool.serve", ["--heartbeat-liveness", "0"], "heartbeat_liveness must be"),
    ("bertpool.workers.supervisor", ["--max-message-bytes", "100"], "max_message_bytes must be"),
    ("bertpool.workers.worker", ["--backend", "tf"], "needs --model"),
    ("bertpool.workers.supervisor", ["--worker-address", "localhost:5556"], "must start with tcp://"),
    # A port ZeroMQ would wrap, or one chosen at bind that no peer could know.
    ("bertpool.broker.broker", ["--address", "tcp://127.0.0.1:99999"], "PORT in 1..65535"),
    ("bertpool.pool.serve", ["--worker-address", "tcp://127.0.0.1:*"], "PORT in 1..65535"),
    ("bertpool.workers.supervisor", ["--worker-address", "tcp://127.0.0.1:0"], "PORT in 1..65535"),
    ("bertpool.pool.serve", ["--address", "ipc:///tmp/bp-same", "--worker-address", "ipc:///tmp/bp-same"],
     "addresses must differ"),
    # inproc:// only reaches the same process: no peer of any bertpool command could connect.
    ("bertpool.broker.broker", ["--address", "inproc://pool"], "inproc:// reaches only sockets in the same"),
    ("bertpool.pool.serve", ["--worker-address", "inproc://w"], "inproc:// reaches only sockets in the same"),
    ("bertpool.workers.worker", ["--worker-address", "inproc://w"], "inproc:// reaches only sockets in the same"),
    ("bertpool.clients.bench", ["--address", "inproc://pool"], "inproc:// reaches only sockets in the same"),
    ("bertpool.gateway.gateway", ["--broker", "inproc://pool"], "inproc:// reaches only sockets in the same"),
    # Values past what ZeroMQ's int options hold are clear errors, not OverflowError tracebacks.
    ("bertpool.broker.broker", ["--frontend-sndhwm-msgs", "99999999999"], "must be <= 2147483647"),
    ("bertpool.broker.broker", ["--max-message-bytes", "99999999999999999999"], "must be <= 2147483647"),
    ("bertpool.workers.supervisor", ["--max-message-bytes", "99999999999999999999"], "max_message_bytes must be in"),
    ("bertpool.pool.serve", ["--batch-timeout-ms", "nan"], "batch_timeout_ms must be a number >= 0"),
    ("bertpool.pool.serve", ["--echo-delay-ms", "-1"], "echo_delay_ms must be a number >= 0"),
    ("bertpool.workers.worker", ["--echo-delay-ms", "nan"], "echo_delay_ms must be a number >= 0"),
    ("bertpool.pool.serve", ["--threads", "-2"], "threads must be >= 0"),
    # Flags that would do nothing, or starve the batcher, are mistakes to point out.
    ("bertpool.pool.serve", ["--threads", "4"], "the echo backend runs no model"),
    ("bertpool.pool.serve", ["--capacity", "1", "--batch-size", "8"], "capacity 1 is below batch_size 8"),
    ("bertpool.broker.broker", ["--heartbeat-interval-s", "1e-9"], "heartbeat_interval_s must be in [0.01, 3600]"),
    ("bertpool.workers.supervisor", ["--first-core", "-1"], "first_core must be >= 0"),
    ("bertpool.pool.serve", ["--vocab", "/nonexistent-bertpool/vocab.txt"], "is not a file"),
    ("bertpool.pool.serve", ["--drain-timeout-s", "inf"], "drain_timeout_s must be in [0, 86400] s"),
    ("bertpool.pool.serve", ["--busy-poll-us", "20000"], "busy_poll_us must be in [0, 10000] us"),
    ("bertpool.broker.broker", ["--busy-poll-us", "-1"], "busy_poll_us must be in [0, 10000] us"),
    ("bertpool.bench.relay", ["--busy-poll-us", "nan"], "busy_poll_us must be in [0, 10000] us"),
    ("bertpool.bench.backend", ["--busy-poll-us", "-5"], "busy_poll_us must be in [0, 10000] us"),
    ("bertpool.gateway.gateway", ["--timeout-s", "inf"], "--timeout-s must be > 0 and at most 86400 s"),
])
def test_bad_flags_are_clear_errors(module, args, message, tmp_path):
    proc = run(module, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    out = proc.stdout + proc.stderr
    assert message in out and "Traceback" not in out


def test_echo_delay_with_a_model_is_refused(tmp_path):
    """--echo-delay-ms would quietly do nothing beside a model: refused before any worker starts."""
    (tmp_path / "saved_model.pb").write_bytes(b"never loaded: the flags are refused first")
    proc = run("bertpool.pool.serve", "--model", str(tmp_path), "--echo-delay-ms", "5")
    assert proc.returncode == 2 and "--echo-delay-ms is for the echo backend" in proc.stderr, proc.stderr


def test_serve_with_a_model_that_cannot_load_exits_nonzero(tmp_path):
    proc = run("bertpool.pool.serve", "--backend", "tf", "--model", str(tmp_path), "--parallel", "1",
               "--address", f"ipc://{tmp_path}/f", "--worker-address", f"ipc://{tmp_path}/b",
               "--stats-interval-s", "0", timeout=180)
    assert proc.returncode == 1
    assert "could not load" in proc.stderr


# ------------------------------------------------- HOST:PORT of listening flags

@pytest.mark.parametrize("text, expected", [
    ("9100", ("127.0.0.1", 9100)), ("0.0.0.0:9100", ("0.0.0.0", 9100)), ("localhost:1", ("localhost", 1)),
    ("[::1]:65535", ("::1", 65535)), (" 127.0.0.1:9100 ", ("127.0.0.1", 9100)), ("0.0.0.0:80", ("0.0.0.0", 80))])
def test_host_port_forms(text, expected):
    assert parse_host_port(text, "--metrics-address") == expected


@pytest.mark.parametrize("text", ["", "x", "nope", "1.2.3.4:99999", "h:99999", ":abc", ":9100", ":80", "h:p",
                                  "127.0.0.1:0", "127.0.0.1:", "::1:9100", "300.1.2.3:9100", "ho st:9100",
                                  "[nope]:9100"])
def test_bad_host_port_is_a_config_error_naming_the_flag(text):
    with pytest.raises(ConfigError, match="^--http "):
        parse_host_port(text, "--http")


@pytest.mark.parametrize("text, says", [
    ("http://127.0.0.1:9100", "not a URL"), ("tcp://127.0.0.1:9100", "not a URL"),
    ("127.0.0.1:9100:1", "give HOST:PORT"),  # not an IPv6 address: no hint about brackets
    ("::1:9100", "write an IPv6 host in brackets"),
])
def test_a_bad_host_port_says_what_to_write(text, says):
    with pytest.raises(ConfigError, match=says):
        parse_host_port(text, "--metrics-address")


# ------------------------------------------------- writing an output directory whole or not at all

@pytest.mark.parametrize("interrupted", [None, "while writing", "between the renames"])
def test_replacing_dir_keeps_the_old_output_unless_the_new_one_is_whole(tmp_path, monkeypatch, interrupted):
    """An interrupt (Ctrl-C, or SIGTERM under sigterm_as_interrupt) anywhere leaves the old output as
    it was and nothing beside it; the commit used to delete the old output before moving the new one
    in, so an interrupt between the two (a large model's delete takes seconds) lost both."""
    from pathlib import Path

    from bertpool.common.cli import replacing_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if interrupted == "between the renames" and Path(target) == out and ".partial-" in self.name:
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    try:
        with replacing_dir(out, force=True) as staging:
            staging.mkdir()
            (staging / "new.txt").write_text("new")
            if interrupted == "while writing":
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        assert interrupted
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or set-aside directory left
    assert [p.name for p in out.iterdir()] == ["new.txt" if interrupted is None else "old.txt"]


@pytest.mark.parametrize("where", ["under a file", "under a file, deeper", "in /proc", "not permitted"])
def test_an_output_directory_that_cannot_be_made_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch,
                                                                                         where):
    """bertpool-compile --output_saved_model /proc/x failed after all its work with a traceback and
    "unexpected error (a bug)"; demo-model with TensorFlow's NotFoundError; /etc/passwd/x said "File
    exists: '/etc/passwd'". check_output_dir (every tool's first check) now says why, naming the file
    in the way, and leaves no probe behind."""
    import os
    import tempfile
    from pathlib import Path

    from bertpool.common.cli import check_output_dir

    (tmp_path / "file").write_text("keep me")
    output, says = {
        "under a file": (tmp_path / "file" / "out", f"{tmp_path / 'file'} is a file, not a directory"),
        "under a file, deeper": (tmp_path / "file" / "a" / "out", f"{tmp_path / 'file'} is a file, not a directory"),
        "in /proc": (Path("/proc/bertpool-out"), "cannot create a directory in /proc"),
        "not permitted": (tmp_path / "ro" / "out", f"cannot create a directory in {tmp_path} (Read-only file system)"),
    }[where]
    if where == "in /proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    if where == "not permitted":  # a read-only mount, which a test cannot make: the kernel's answer, faked
        def read_only(*args, **kwargs):
            raise OSError(30, os.strerror(30))
        monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(ConfigError, match="^" + re.escape(f"cannot write --output {output}: ") + ".*"
                       + re.escape(says)):
        check_output_dir("--output", output, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe directory left
    assert (tmp_path / "file").read_text() == "keep me"


def test_replacing_dir_says_cannot_write_for_what_goes_wrong_writing_the_output(tmp_path):
    """A file where the output's parent should be, or an OSError writing into the staging directory (a
    full disk), is "cannot write OUTPUT: ..." (exit 2 in every tool), not an untyped OSError that
    bertpool-compile reported as a bug; an OSError about another path (an input) stays what it was."""
    import errno

    from bertpool.common.cli import replacing_dir

    (tmp_path / "file").write_text("keep me")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'file'} is a file, not a directory")):
        with replacing_dir(tmp_path / "file" / "out", force=False):
            raise AssertionError("the block ran")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=re.escape(f"cannot write {out}: No space left on device")):
        with replacing_dir(out, force=False) as staging:
            staging.mkdir()
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "weights.npz"))
    with pytest.raises(ConfigError, match=re.escape(f"cannot write {out}: File too large")):
        with replacing_dir(out, force=False) as staging:  # a write() past a file-size limit names no file
            staging.mkdir()
            raise OSError(errno.EFBIG, "File too large")
    with pytest.raises(FileNotFoundError):
        with replacing_dir(out, force=False) as staging:
            staging.mkdir()
            open(tmp_path / "missing-input.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no output, no staging directory


STOP_TWICE = """
import os, signal, threading, time
from bertpool.common.cli import install_stop_handlers
lock, calls, done = threading.Lock(), [], threading.Event()

def stop():
    with lock:  # as Event.set or a Condition would: not reentrant
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal while this call holds the lock
            time.sleep(0.2)  # its handler runs now, on the main thread, if handlers call stop() there
        if len(calls) == 2:
            done.set()

install_stop_handlers(stop)
os.kill(os.getpid(), signal.SIGTERM)
print("stopped twice" if done.wait(20) else "stuck")
"""


def test_a_second_stop_signal_during_stop_does_not_deadlock():
    """serve, broker, workers: a second SIGTERM while the first one's stop() held a lock (serve gets
    several when its parent dies) ran the nested handler on the main thread, waiting for ever on that
    lock. Each signal now runs stop() on a thread of its own."""
    try:
        proc = subprocess.run([sys.executable, "-c", STOP_TWICE], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the process deadlocked in its stop handler")
    assert proc.stdout.strip() == "stopped twice", proc.stdout + proc.stderr


def test_the_writability_probe_leaves_an_existing_file_as_it_was_and_removes_one_it_made(tmp_path):
    from bertpool.common.cli import check_writable

    kept = tmp_path / "kept.json"
    kept.write_text("an earlier report")
    check_writable("--json", str(kept))
    check_writable("--json", str(tmp_path / "new.json"))
    assert kept.read_text() == "an earlier report" and not (tmp_path / "new.json").exists()
    # make_parent (bertpool-bench-compile's --json under its work tree): the directories stay, the file does not.
    deep = tmp_path / "runs" / "new" / "report.json"
    check_writable("--json", deep, make_parent=True)
    assert deep.parent.is_dir() and not deep.exists()
    with pytest.raises(ConfigError, match=re.escape(f"cannot write --json {kept}/x.json: ")):
        check_writable("--json", kept / "x.json", make_parent=True)  # a file where a directory should be
