"""Configs travel as data: common.configdata, and the supervisor -> worker hand-over built on it."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import typing

import pytest
import zmq

from bertpool.common import configdata
from bertpool.common.errors import ConfigError
from bertpool.common.security import CurveClientConfig, generate_key_pairs
from bertpool.workers.backends import BackendConfig
from bertpool.workers.supervisor import worker_argv
from bertpool.workers.worker import WorkerConfig, build_parser, config_from_args


def _leaves(obj, prefix=""):
    """(dotted name, value, default) of every travelling leaf field, recursing into nested configs."""
    hints = typing.get_type_hints(type(obj))
    for f in configdata.data_fields(obj):
        value = getattr(obj, f.name)
        name = prefix + f.name
        nested = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
        if nested:
            assert value is not None, f"{name}: set a nested config so its fields are covered"
            yield from _leaves(value, name + ".")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield name, value, default


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE (built without libsodium)")
    root = tmp_path_factory.mktemp("keys")
    generate_key_pairs(root, ["broker", "worker"])
    return root


def _every_field_set(key_dir) -> WorkerConfig:
    """A WorkerConfig whose every field (nested ones too) differs from its default."""
    return WorkerConfig(
        broker_address="ipc:///tmp/bertpool-roundtrip-back",
        backend=BackendConfig(name="tf", model_dir="/models/x", echo_delay_ms=2.5, seq_length=64, threads=3),
        vocab_path="/models/x/vocab.txt", batch_size=8, batch_timeout_ms=7.5, capacity=11,
        stats_interval_s=0.25, name="host:1.ab:core-3", slot="host:1.ab:core-3",
        heartbeat_interval_s=0.5, heartbeat_liveness=5, max_message_bytes=8 << 20, inline_batch_ms=2.5,
        curve=CurveClientConfig(server_key_file=str(key_dir / "broker.key"),
                                secret_key_file=str(key_dir / "worker.key_secret")))


def test_round_trip_keeps_every_field_through_the_worker_command_line(tmp_path, key_dir):
    """The supervisor's hand-over: what a worker process parses back equals what was sent,
    for every field, including ones added after this test was written."""
    config = _every_field_set(key_dir)
    unchanged = [name for name, value, default in _leaves(config) if value == default]
    assert not unchanged, f"set these fields to non-default values in this test: {unchanged}"
    argv = worker_argv(config, tmp_path / "w.json", str(tmp_path / "w.error"))
    assert argv[1:3] == ["-m", "bertpool.workers.worker"]
    parser = build_parser()
    args = parser.parse_args(argv[3:])
    assert args.load_error_file == str(tmp_path / "w.error")
    back = config_from_args(parser, args)
    assert back == config
    assert list(_leaves(back)) == list(_leaves(config))


def test_config_file_is_private_and_holds_no_key_material(tmp_path, key_dir):
    config = _every_field_set(key_dir)
    path = tmp_path / "w.json"
    worker_argv(config, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    for secret in (config.curve.secret_key, config.curve.public_key, config.curve.server_key):
        assert secret.decode() not in text
    assert json.loads(text)["curve"] == {"server_key_file": config.curve.server_key_file,
                                         "secret_key_file": config.curve.secret_key_file}


def test_loaded_curve_keys_never_reach_a_command_line(tmp_path, key_dir):
    files = _every_field_set(key_dir).curve
    loaded = CurveClientConfig(server_key=files.server_key, public_key=files.public_key,
                               secret_key=files.secret_key)
    with pytest.raises(ConfigError, match="CURVE keys as files"):
        worker_argv(WorkerConfig(curve=loaded), tmp_path / "w.json")
    assert not (tmp_path / "w.json").exists()


def test_default_config_round_trips_without_curve():
    assert configdata.from_dict(WorkerConfig, configdata.to_dict(WorkerConfig())) == WorkerConfig()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(surprise=1), r"WorkerConfig: unknown field\(s\) surprise"),
    (lambda d: d.pop("stats_interval_s"), r"WorkerConfig: missing field\(s\) stats_interval_s"),
    (lambda d: d["backend"].pop("seq_length"), r"WorkerConfig.backend: missing field\(s\) seq_length"),
    (lambda d: d["backend"].update(extra=True), r"WorkerConfig.backend: unknown field\(s\) extra"),
    (lambda d: d.update(batch_size="4"), r"WorkerConfig.batch_size: expected int, got '4'"),
    (lambda d: d.update(batch_size=True), r"WorkerConfig.batch_size: expected int, got True"),
    (lambda d: d.update(backend=None), r"WorkerConfig.backend: expected an object, got NoneType"),
    (lambda d: d.update(curve={"server_key_file": "a"}), r"WorkerConfig.curve: missing field\(s\) secret_key_file"),
    (lambda d: d.update(batch_size=0), r"batch_size must be >= 1"),  # the dataclass's own check runs
])
def test_from_dict_refuses_bad_data_with_typed_errors(change, message):
    data = configdata.to_dict(WorkerConfig())
    change(data)
    with pytest.raises(ConfigError, match=message):
        configdata.from_dict(WorkerConfig, data)


def test_from_dict_accepts_an_int_for_a_float():
    data = configdata.to_dict(WorkerConfig())
    data["batch_timeout_ms"] = 3
    assert configdata.from_dict(WorkerConfig, data).batch_timeout_ms == 3.0


def test_worker_refuses_config_json_mixed_with_flags_and_bad_files(tmp_path):
    path = tmp_path / "w.json"
    configdata.write_json(WorkerConfig(), path)
    parser = build_parser()
    with pytest.raises(ConfigError, match="drop --batch-size"):
        config_from_args(parser, parser.parse_args(["--config-json", str(path), "--batch-size", "2"]))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config"):
        config_from_args(parser, parser.parse_args(["--config-json", str(path)]))


def test_worker_process_with_a_bad_config_file_exits_2_with_one_line(tmp_path):
    """A bad --config-json is a load failure: exit 2, reason in the error file (never restarted)."""
    path, error = tmp_path / "w.json", tmp_path / "w.error"
    path.write_text(json.dumps({**configdata.to_dict(WorkerConfig()), "surprise": 1}))
    proc = subprocess.run([sys.executable, "-m", "bertpool.workers.worker", "--config-json", str(path),
                           "--load-error-file", str(error)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bertpool-worker: error: WorkerConfig: unknown field(s) surprise" in proc.stderr
    assert "unknown field(s) surprise" in error.read_text()


def _pool_parser():
    import argparse

    from bertpool.common.cli import add_address_arguments
    from bertpool.workers.supervisor import add_supervisor_arguments
    parser = argparse.ArgumentParser()
    add_address_arguments(parser, frontend=False)
    add_supervisor_arguments(parser)
    return parser


def test_pool_takes_the_workers_config_as_data(tmp_path, key_dir):
    """bertpool-serve/bertpool-workers --worker-config-json: the template reaches the supervisor whole."""
    from bertpool.workers.supervisor import supervisor_config_from_args
    config = _every_field_set(key_dir)
    configdata.write_json(config, tmp_path / "w.json")
    args = _pool_parser().parse_args(["--worker-address", config.broker_address, "--parallel", "2",
                                      "--worker-config-json", str(tmp_path / "w.json")])
    supervisor = supervisor_config_from_args(args, args.worker_address)
    assert supervisor.worker == config and supervisor.parallel == 2


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "2"], "drop --batch-size"),
    (["--worker-address", "ipc:///tmp/elsewhere"], "is not --worker-address ipc:///tmp/elsewhere"),
])
def test_pool_refuses_worker_config_json_that_would_not_hold(tmp_path, flags, message):
    from bertpool.workers.supervisor import supervisor_config_from_args
    configdata.write_json(WorkerConfig(), tmp_path / "w.json")
    args = _pool_parser().parse_args(["--worker-config-json", str(tmp_path / "w.json"), *flags])
    with pytest.raises(ConfigError, match=message):
        supervisor_config_from_args(args, args.worker_address)
