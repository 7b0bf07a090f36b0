"""Operating the supervised pool: workers that die, cannot reload, crash-loop; serve killed outright; SIGHUP.

Real processes (bertpool-serve with the echo backend, or a tiny model), on ipc:// under tmp_path; every wait
is on a log line, a process or a file, bounded in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bertpool.clients.client import Client
from bertpool.workers.backends import fallback_vocab_path
from conftest import alive, children_of, free_tcp_port, wait_gone

WAIT_S = 120.0  # the longest any one wait below may take (a loaded 2-core host starts workers slowly)


def wait_for(what: str, predicate, pool=None, timeout_s: float = WAIT_S):
    """Poll ``predicate()`` until it is truthy (its value), failing after ``timeout_s``, or as soon as
    ``pool``'s serve has exited, with ``what`` (and the pool's log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (pool and pool.process.poll() is not None):
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    ended = f"serve exited with {pool.process.returncode}" if pool and pool.process.poll() is not None else "timed out"
    raise AssertionError(f"{ended} waiting for {what}" + (f"; serve log:\n{pool.log()}" if pool else ""))


def worker_pids(pool) -> list[int]:
    """The worker processes serve runs now (its children)."""
    return children_of(pool.process.pid)


def kill_a_worker(pool) -> int:
    """SIGKILL one of serve's workers; its pid."""
    pid = wait_for("a worker process", lambda: worker_pids(pool), pool)[0]
    os.kill(pid, signal.SIGKILL)
    return pid


def serve_env(tmp_path: Path) -> dict[str, str]:
    """Our environment with TMPDIR inside tmp_path, so the supervisor's temporary directory can be watched."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def temp_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "tmp").glob("bertpool-workers-*"))


@pytest.fixture
def vocab(tmp_path) -> Path:
    """A copy of the default vocabulary, for --vocab: removing it makes every later worker load fail."""
    path = tmp_path / "vocab.txt"
    shutil.copy(fallback_vocab_path(), path)
    return path


def test_a_worker_that_cannot_load_on_restart_is_retried_while_the_others_serve(start_pool, vocab):
    """What a worker needs to load (here its --vocab; in production the model directory) is damaged under a
    serving pool, then a worker dies: its restart cannot load. That used to stop the whole pool (exit 1),
    though the other worker served on fine; now that slot is retried slowly, saying so, and the pool serves."""
    pool = start_pool("--backend", "echo", "--vocab", str(vocab), parallel=2)
    vocab.unlink()
    kill_a_worker(pool)
    wait_for("the failed restart's ERROR", lambda: "1 other worker keeps serving what it loaded" in pool.log(), pool)
    assert pool.process.poll() is None, pool.log()
    with Client(pool.address, timeout_s=30) as client:
        assert len(client.predict_many([("still", "serving")] * 8)) == 8
    log = pool.log()
    assert "could not load its model or configuration" in log and "vocab.txt" in log, log
    assert "retrying this one in 30 s" in log and "Traceback" not in log, log
    assert pool.stop() == 0


def test_deaths_before_ready_show_on_the_metrics_endpoint(start_pool, vocab):
    """The broker counts a restart when the new process says READY, so a worker dying as it loads was
    invisible to Prometheus (bertpool_worker_restarts_total stays 0 here). serve's endpoint also has the
    supervisor's count of unasked exits by cause, and the slots it retries."""
    parser = pytest.importorskip("prometheus_client.parser")
    port = free_tcp_port()
    pool = start_pool("--backend", "echo", "--vocab", str(vocab), "--metrics-address", str(port), parallel=2)

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in parser.text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    assert before[("bertpool_worker_exits_total", (("cause", "signal"),))] == 0
    assert before[("bertpool_worker_slots_failing", ())] == 0
    vocab.unlink()
    kill_a_worker(pool)
    after = wait_for("the failed restart on the endpoint",
                     lambda: (m := scrape())[("bertpool_worker_slots_failing", ())] == 1 and m, pool)
    assert after[("bertpool_worker_exits_total", (("cause", "signal"),))] == 1
    assert after[("bertpool_worker_exits_total", (("cause", "load_failed"),))] >= 1
    assert after[("bertpool_worker_restarts_total", ())] == 0  # what the broker alone sees
    assert pool.stop() == 0


@pytest.mark.parametrize("code, cause", [(-9, "signal"), (-11, "signal"), (1, "error"), (0, "exited"),
                                         (2, "load_failed"), (3, "refused")])
def test_exit_causes(code, cause):
    from bertpool.workers.supervisor import exit_cause

    assert exit_cause(code) == cause


def test_a_pool_left_with_no_worker_that_can_load_stops_and_says_why(start_pool, vocab):
    """The same with one worker: nothing is left to serve, so serve stops (exit 1) with the reason."""
    pool = start_pool("--backend", "echo", "--vocab", str(vocab), parallel=1)
    vocab.unlink()
    kill_a_worker(pool)
    assert pool.process.wait(WAIT_S) == 1, pool.log()
    log = pool.log()
    assert "no other worker is left to serve" in log.splitlines()[-1], log
    assert "Traceback" not in log, log


def test_a_crash_looping_worker_is_reported_once_with_its_restart_count(start_pool):
    """Each death says how the worker ended (a signal by name, not "exited with -9"), which restart this is
    and how many died young in a row, with a growing delay; the fifth young death in a row is called a
    crash loop, once, at ERROR; at the end serve says how often each slot was restarted."""
    from bertpool.workers.supervisor import CRASH_LOOP_DEATHS

    pool = start_pool("--backend", "echo", parallel=1)
    for n in range(1, CRASH_LOOP_DEATHS + 1):
        pid = kill_a_worker(pool)
        wait_for(f"death {n} logged", lambda: f"(pid {pid}, NeuronCore 0) was killed by SIGKILL" in pool.log(), pool)
        wait_for("the restarted worker", lambda: worker_pids(pool) and worker_pids(pool) != [pid], pool)
    log = pool.log()
    assert "restart 1 of this slot; 1 in a row died within 30 s" in log, log
    assert f"restart {CRASH_LOOP_DEATHS} of this slot; {CRASH_LOOP_DEATHS} in a row" in log, log
    assert "restarting it in 0.5 s" in log and "restarting it in 1.0 s" in log, log
    assert log.count("is crash-looping") == 1, log
    assert pool.stop() == 0
    assert f"workers restarted {CRASH_LOOP_DEATHS} times in all (worker 0: {CRASH_LOOP_DEATHS})" in pool.log()


def test_serve_killed_outright_leaves_no_temporary_directory_for_good(tmp_path):
    """serve SIGKILLed cannot remove its workers' config directory (a /tmp holding 112 of them was found);
    the next supervisor on the host removes those of supervisors that are gone, and its own on a stop."""
    from conftest import Pool

    def serve(name: str) -> Pool:
        log_path = tmp_path / f"{name}.log"
        front, back = f"ipc://{tmp_path}/{name}-f", f"ipc://{tmp_path}/{name}-b"
        with open(log_path, "wb") as log:
            import subprocess
            proc = subprocess.Popen([sys.executable, "-m", "bertpool.pool.serve", "--backend", "echo",
                                     "--parallel", "1", "--address", front, "--worker-address", back,
                                     "--stats-interval-s", "0"], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=serve_env(tmp_path))
        pool = Pool(proc, front, back, log_path)
        pools.append(pool)
        pool.wait_workers(1)
        return pool

    pools: list[Pool] = []
    try:
        first = serve("first")
        workers = children_of(first.process.pid)
        first.process.kill()
        first.process.wait(10)
        assert not wait_gone(workers, 30)
        assert len(temp_dirs(tmp_path)) == 1  # what SIGKILL left
        second = serve("second")
        left = temp_dirs(tmp_path)
        assert len(left) == 1, left  # the stale one is gone; this is the second serve's
        mine = left[0]
        assert mine.name.startswith(f"bertpool-workers-{second.process.pid}-")
        assert "removed 1 temporary directory left by supervisors that were killed" in second.log()
        assert second.stop() == 0
        assert temp_dirs(tmp_path) == []
    finally:
        for pool in pools:
            pool.stop()
            try:
                os.killpg(pool.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_worker_restarts_after_its_config_directory_was_cleaned_away(tmp_path):
    """A /tmp cleaner (systemd-tmpfiles) removed the supervisor's directory under a serving pool: the next
    restart raised a traceback out of the supervisor and the whole pool died. Now it makes the directory
    again and the worker comes back."""
    from conftest import Pool
    import subprocess

    front, back = f"ipc://{tmp_path}/f", f"ipc://{tmp_path}/b"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bertpool.pool.serve", "--backend", "echo", "--parallel",
                                 "2", "--address", front, "--worker-address", back, "--stats-interval-s", "0"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=serve_env(tmp_path))
    pool = Pool(proc, front, back, log_path)
    try:
        pool.wait_workers(2)
        (made,) = temp_dirs(tmp_path)
        shutil.rmtree(made)
        victim = kill_a_worker(pool)
        wait_for("a new worker", lambda: len(set(worker_pids(pool)) - {victim}) == 2, pool)
        pool.wait_workers(2)
        assert pool.process.poll() is None, pool.log()
        assert "was removed while serving; making it again" in pool.log()
        assert pool.stop() == 0
        assert "Traceback" not in pool.log(), pool.log()
        assert temp_dirs(tmp_path) == []
    finally:
        pool.stop()
        try:
            os.killpg(pool.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sighup_says_the_model_is_not_reloaded(start_pool, tmp_path):
    """Operators send SIGHUP expecting a model reload; serve only re-reads CURVE allow-lists. It now says
    the model is not reloaded (and keeps serving the one loaded), instead of a lone "CURVE is off"."""
    from compile_fixtures import make_savedmodel

    model = make_savedmodel(tmp_path / "model")
    pool = start_pool("--model", str(model), parallel=1)
    os.kill(pool.process.pid, signal.SIGHUP)
    wait_for("the reload lines", lambda: "CURVE is off" in pool.log(), pool)
    assert f"the model is NOT reloaded; the workers keep the one they loaded from {model}" in pool.log()
    with Client(pool.address, timeout_s=30) as client:
        assert len(client.predict_many([("still", "serving")] * 4)) == 4
    assert pool.stop() == 0
    assert not alive(pool.process.pid)


def test_parallel_is_checked_once_and_named_as_the_flag(monkeypatch):
    """--parallel was checked twice at start, by supervisor_config_from_args under the flag's name and
    again by SupervisorConfig under the field's. Now SupervisorConfig holds the one check, and names
    --parallel however it is built (serve, bertpool-workers, a bench's own config)."""
    import argparse

    from bertpool.common.errors import ConfigError
    from bertpool.workers import supervisor

    with pytest.raises(ConfigError, match="^--parallel must be >= 1, got 0$"):
        supervisor.SupervisorConfig(parallel=0)
    checked = []
    real_check = supervisor.check_processes
    monkeypatch.setattr(supervisor, "check_processes", lambda name, value: (checked.append(name),
                                                                            real_check(name, value)))
    parser = argparse.ArgumentParser()
    supervisor.add_supervisor_arguments(parser)
    args = parser.parse_args(["--parallel", "2", "--backend", "echo"])
    config = supervisor.supervisor_config_from_args(args, "ipc:///tmp/leftovers-nobody")
    assert config.parallel == 2 and checked == ["--parallel"]
