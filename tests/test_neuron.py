"""The Neuron path, compile -> save -> load -> warm-up -> serve, against the test double.

tests/fake_neuron/ holds doubles of tensorflow-neuron (inf1) and tensorflow-neuronx
(inf2/trn1) that reproduce their documented trace contract (see its
_fake_neuron.py), and of the neuron-cc / neuronx-cc executables. The
``fake_neuron`` fixture puts them on sys.path, PYTHONPATH (for worker processes)
and PATH; the product never looks for them itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("safetensors")

from compile_fixtures import make_hf, quiet_compile, tiny_weights  # noqa: E402

from bertpool.clients.client import Client  # noqa: E402
from bertpool.common.data import generate_pairs  # noqa: E402
from bertpool.common.errors import (BackendUnavailable, BinaryMismatchError, ConfigError,  # noqa: E402
                                    ModelFormatError, PlacementError)
from bertpool.compile import neuron, runtime  # noqa: E402
from bertpool.compile.reference import ReferenceModel  # noqa: E402
from bertpool.compile.weights import load_weights  # noqa: E402
from bertpool.workers import neuron_cores  # noqa: E402
from bertpool.workers.backends import BackendConfig, load_backend  # noqa: E402
from bertpool.workers.neuron_cores import check_cores, parse_core_list, visible_cores  # noqa: E402
from bertpool.workers.supervisor import worker_env  # noqa: E402

pytestmark = pytest.mark.slow
FAKE = Path(__file__).parent / "fake_neuron"
FAKE_MODULES = ("tensorflow_neuron", "tensorflow_neuronx", "_fake_neuron")
COMPILERS = {"inf1": "neuron-cc", "inf2": "neuronx-cc"}


@pytest.fixture
def fake_neuron(monkeypatch, tmp_path):
    """install(*compilers): the package doubles importable here and in child processes, and only
    the named compiler doubles on PATH. Undone at teardown."""

    def install(*compilers: str) -> None:
        bin_dir = tmp_path / "fake-bin"
        bin_dir.mkdir(exist_ok=True)
        for name in compilers:
            shutil.copy2(FAKE / "bin" / name, bin_dir / name)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE), os.environ.get("PYTHONPATH")])))
        monkeypatch.syspath_prepend(str(FAKE))

    yield install
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Two tiny HF models with different weights (a compiled binary of one is a wrong binary for the other)."""
    root = tmp_path_factory.mktemp("neuron-models")
    return make_hf(root / "a", tiny_weights(seed=0)), make_hf(root / "b", tiny_weights(seed=1))


def neuron_compile(src, out, **kwargs) -> dict:
    return quiet_compile(src, out, target="neuron", pairs=8, **kwargs)


def fake_sysfs(root: Path, cores_per_device: list[int], device_name: str | None = None) -> Path:
    """A Neuron driver sysfs tree with one neuronN/core_count per device, and each device's
    info/architecture/device_name when given (the driver writes Inferentia, Inferentia2, Trainium1...)."""
    for index, cores in enumerate(cores_per_device):
        (root / f"neuron{index}").mkdir(parents=True)
        (root / f"neuron{index}" / "core_count").write_text(f"{cores}\n")
        if device_name is not None:
            (root / f"neuron{index}" / "info" / "architecture").mkdir(parents=True)
            (root / f"neuron{index}" / "info" / "architecture" / "device_name").write_text(f"{device_name}\n")
    return root


def original_probabilities(src, pairs) -> np.ndarray:
    from bertpool.common.tokenizer import BertTokenizer

    weights = load_weights(src)
    f = BertTokenizer(src / "vocab.txt").encode_pairs(pairs)
    return ReferenceModel(weights.shape, weights.tensors, 128, weights.gelu).predict(
        f.input_ids, f.input_mask, f.segment_ids)


# ---------------------------------------------------------------- the double's contract

def test_double_reproduces_the_trace_contract(fake_neuron, tmp_path):
    fake_neuron("neuron-cc")
    import tensorflow_neuron as tfn

    w = tf.Variable(tf.ones([3, 2]))

    def func(inputs):
        a, b = inputs
        return tf.matmul(a, w) + b

    example = [tf.ones([2, 3]), tf.zeros([2, 2])]
    traced = tfn.trace(func, example)
    assert isinstance(traced, tf.keras.Model)
    assert [n.op for n in traced.aws_neuron_function.graph.as_graph_def().node].count("NeuronOp") == 1
    assert 0 < traced.on_neuron_ratio <= 1  # tensorflow-neuron counts the output Identity against it
    np.testing.assert_allclose(np.asarray(traced(example)), np.full([2, 2], 3.0))
    traced.save(str(tmp_path / "saved"))
    reloaded = neuron.load_traced(tf, str(tmp_path / "saved"))
    np.testing.assert_allclose(np.asarray(reloaded(example)), np.full([2, 2], 3.0))
    with pytest.raises((TypeError, ValueError)):  # two tensors are not the recorded structure
        reloaded(example[0], example[1])


def test_double_runs_only_the_compiled_shapes(fake_neuron, monkeypatch):
    # A NeuronOp runs the shapes and dtypes it was traced with; --dynamic-batch-size frees dimension 0
    # alone (the tracing API's "Special Flags"), and AwsNeuronModel does not autocast its inputs.
    fake_neuron("neuron-cc")
    import tensorflow_neuron as tfn

    def func(inputs):
        return inputs[0] + inputs[1]

    fixed = tfn.trace(func, [tf.ones([2, 3]), tf.zeros([2, 3])])
    for other in ([tf.ones([5, 3]), tf.zeros([5, 3])], [tf.ones([2, 3], tf.float64), tf.zeros([2, 3], tf.float64)]):
        with pytest.raises(tf.errors.InvalidArgumentError):
            fixed(other)
    monkeypatch.setenv("NEURON_CC_FLAGS", "--dynamic-batch-size")
    dynamic = tfn.trace(func, [tf.ones([2, 3]), tf.zeros([2, 3])])
    assert np.asarray(dynamic([tf.ones([5, 3]), tf.zeros([5, 3])])).shape == (5, 3)
    with pytest.raises(tf.errors.InvalidArgumentError):
        dynamic([tf.ones([2, 4]), tf.zeros([2, 4])])


def test_double_exits_mid_trace_on_a_value_its_parser_refuses(fake_neuron, monkeypatch):
    # tensorflow-neuron's parse_neuron_cc_flags is an argparse parser: an invalid choice exits
    fake_neuron("neuron-cc")
    import tensorflow_neuron as tfn

    monkeypatch.setenv("NEURON_CC_FLAGS", "--verbose loud")
    with pytest.raises(SystemExit):
        tfn.trace(lambda x: x * 2.0, tf.ones([2, 2]))


def test_double_falls_back_to_cpu_for_unsupported_ops_and_failed_compiles(fake_neuron, monkeypatch):
    fake_neuron("neuron-cc")
    import tensorflow_neuron as tfn

    def func(x):
        return tf.matmul(x, x) + 1.0

    monkeypatch.setenv("FAKE_NEURON_CPU_OPS", "MatMul")
    where = neuron.placement(tfn.trace(func, tf.ones([2, 2])))
    assert where.cpu_ops == {"MatMul": 1} and where.neuron_ops == 1
    monkeypatch.delenv("FAKE_NEURON_CPU_OPS")
    monkeypatch.setenv("NEURON_CC_FLAGS", "--auto-cast none")  # not a neuron-cc flag: the compile fails
    where = neuron.placement(tfn.trace(func, tf.ones([2, 2])))
    assert where.neuron_ops == 0 and where.on_neuron_ratio == 0 and "MatMul" in where.cpu_ops


# ----------------------------------------------------- compile -> save -> load -> serve

@pytest.mark.parametrize("family", ["inf1", "inf2"])
def test_compile_save_load_for_each_toolchain(fake_neuron, hf_models, tmp_path, family, monkeypatch):
    fake_neuron(COMPILERS[family])  # auto-detected from the one compiler installed
    monkeypatch.setenv("NEURON_CC_FLAGS", "--enable-fast-context-switch")
    manifest = neuron_compile(hf_models[0], tmp_path / "out")
    assert os.environ["NEURON_CC_FLAGS"] == "--enable-fast-context-switch"  # restored, not appended to
    n = manifest["neuron"]
    assert (n["family"], n["target"], n["compiler"]) == (family, "auto", COMPILERS[family])
    assert n["package"] == {"inf1": "tensorflow_neuron", "inf2": "tensorflow_neuronx"}[family]
    cast = {"inf1": "--fp32-cast=matmult-fp16", "inf2": "--auto-cast=none"}[family]
    assert n["compiler_flags"] == f"{cast} --enable-fast-context-switch"
    assert n["placement"]["neuron_ops"] >= 1 and n["placement"]["cpu_ops"] == {}
    assert n["placement"]["on_neuron_ratio"] > 0.9
    # what the compiler itself was given, recorded by the double during trace
    seen = json.loads((tmp_path / "out" / "accelerated" / "fake_neuron.json").read_text())
    assert seen["compiled"] and seen["family"] == family
    assert cast in seen["compiler_command"] and "--fp32-cast=matmult" not in seen["compiler_command"]
    assert manifest["reference"]["pairs"] == 8 and manifest["reference"]["tolerance"] == 5e-3
    assert manifest["equivalence"]["passed"] and manifest["dtype"] == "float16"
    model = runtime.load_compiled(tmp_path / "out")  # checks the binary against the reference pairs
    pairs = [(p.text_a, p.text_b) for p in generate_pairs(6, seed=5)]
    from bertpool.common.tokenizer import BertTokenizer

    f = BertTokenizer(model.vocab_path).encode_pairs(pairs)
    np.testing.assert_allclose(model.predict(f.input_ids, f.input_mask, f.segment_ids),
                               original_probabilities(hf_models[0], pairs), atol=5e-3)


def test_neuron_model_served_end_to_end(fake_neuron, hf_models, tmp_path, start_pool):
    fake_neuron("neuron-cc")
    neuron_compile(hf_models[0], tmp_path / "inf1", neuron_target="inf1")
    sysfs = fake_sysfs(tmp_path / "sysfs", [2])
    pool = start_pool("--backend", "neuron", "--model", str(tmp_path / "inf1"), "--neuron-sysfs", str(sysfs),
                      "--batch-timeout-ms", "5", parallel=2)
    pairs = [(p.text_a, p.text_b) for p in generate_pairs(12, seed=6)]
    with Client(pool.address, timeout_s=60) as client:
        got = np.stack([r.probabilities for r in client.predict_many(pairs)])
    np.testing.assert_allclose(got, original_probabilities(hf_models[0], pairs), atol=5e-3)
    assert pool.stop() == 0


# --------------------------------------------------------------------- compiler flags

def test_compiler_flags_per_toolchain():
    assert neuron.compiler_flags(neuron.INF1, "float16", "", {}) == "--fp32-cast=matmult-fp16"
    assert neuron.compiler_flags(neuron.INF1, "bfloat16", "", {}) == "--fp32-cast=matmult-bf16"
    for dtype in ("float32", "float16", "bfloat16"):
        assert neuron.compiler_flags(neuron.INF2, dtype, "", {}) == "--auto-cast=none"
    with pytest.raises(ConfigError, match="float16 or bfloat16 only"):
        neuron.compiler_flags(neuron.INF1, "float32", "", {})
    # ours first, then --compiler-args, then the user's own $NEURON_CC_FLAGS (later flags win)
    flags = neuron.compiler_flags(neuron.INF2, "float16", "--model-type transformer",
                                  {"NEURON_CC_FLAGS": "--auto-cast-type fp16 --workdir /tmp/w"})
    assert flags == "--auto-cast=none --model-type transformer --auto-cast-type fp16 --workdir /tmp/w"
    with pytest.raises(ConfigError, match="--fp32-cast is not a neuronx-cc flag.*--auto-cast"):
        neuron.compiler_flags(neuron.INF2, "float16", "--fp32-cast matmult", {})
    with pytest.raises(ConfigError, match="--fast-math is not a neuronx-cc flag"):
        neuron.compiler_flags(neuron.INF2, "float16", "", {"NEURON_CC_FLAGS": "--fast-math fp32-cast-matmult"})
    with pytest.raises(ConfigError, match="--auto-cast is not a neuron-cc flag"):
        neuron.compiler_flags(neuron.INF1, "float16", "--auto-cast=matmult", {})


def test_compiler_flags_refuse_what_would_fail_later():
    # text that does not split as a shell would: the package's own shlex.split raised mid-trace
    with pytest.raises(ConfigError, match="--compiler-args .* does not split into flags .*closing quotation"):
        neuron.compiler_flags(neuron.INF1, "float16", "--workdir '/tmp/w", {})
    with pytest.raises(ConfigError, match=r"\$NEURON_CC_FLAGS .* does not split into flags"):
        neuron.compiler_flags(neuron.INF2, "float16", "", {"NEURON_CC_FLAGS": '--logfile "x'})
    # a pipelined model needs N NeuronCores per copy; each worker owns one
    for flags in ("--neuroncore-pipeline-cores=4", "--neuroncore-pipeline-cores 2"):
        with pytest.raises(ConfigError, match="needs that many NeuronCores per copy.*one worker per NeuronCore"):
            neuron.compiler_flags(neuron.INF1, "float16", flags, {})
    assert neuron.compiler_flags(neuron.INF1, "float16", "--neuroncore-pipeline-cores=1", {}).endswith("=1")
    # tensorflow-neuron's own parser exits (SystemExit 2) on a value outside its choices
    for flags in ("--verbose loud", "--verbose", "--extract-weights=inf1.huge"):
        with pytest.raises(ConfigError, match="tensorflow-neuron takes one of"):
            neuron.compiler_flags(neuron.INF1, "float16", "", {"NEURON_CC_FLAGS": flags})
    assert neuron.compiler_flags(neuron.INF1, "float16", "--verbose=INFO --workdir /tmp/w", {}) == \
        "--fp32-cast=matmult-fp16 --verbose=INFO --workdir /tmp/w"


@pytest.mark.parametrize("flags", ["--verbose loud", "--neuroncore-pipeline-cores=4", "--workdir '/tmp/w"])
def test_bad_compiler_flags_are_refused_before_any_work(fake_neuron, hf_models, tmp_path, monkeypatch, flags):
    # Each of these compiled (or exited from inside tensorflow-neuron's trace) only after the rebuild
    fake_neuron("neuron-cc")
    monkeypatch.setenv("NEURON_CC_FLAGS", flags)
    with pytest.raises(ConfigError, match=r"\$NEURON_CC_FLAGS"):
        neuron_compile(hf_models[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_float32_on_inf1_is_refused_before_any_work(fake_neuron, hf_models, tmp_path):
    fake_neuron("neuron-cc")
    with pytest.raises(ConfigError, match="float16 or bfloat16 only"):
        neuron_compile(hf_models[0], tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ toolchain choice

def test_toolchain_is_chosen_by_compiler_never_by_import_order(fake_neuron, monkeypatch):
    fake_neuron("neuronx-cc")  # an inf2 host where tensorflow_neuron imports too (neuronx reuses its code)
    assert neuron.choose_toolchain("auto") is neuron.INF2
    assert neuron.import_package(neuron.choose_toolchain("auto")).__name__ == "tensorflow_neuronx"
    assert neuron.choose_toolchain("trn1") is neuron.INF2 and neuron.choose_toolchain("inf1") is neuron.INF1
    fake_neuron("neuron-cc")
    with pytest.raises(ConfigError, match="both neuron-cc .* and neuronx-cc"):
        neuron.choose_toolchain("auto")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(BackendUnavailable, match="neuron-cc .* or neuronx-cc"):
        neuron.choose_toolchain("auto")


def test_package_that_does_not_import_is_a_clear_error():
    # tests/fake_neuron is not on sys.path here: the product finds no package and says which one
    with pytest.raises(BackendUnavailable, match="needs tensorflow-neuronx"):
        neuron.import_package(neuron.INF2)


# ------------------------------------------------------------------- CPU fallback

def test_encoder_falling_back_to_cpu_fails_the_compile(fake_neuron, hf_models, tmp_path, monkeypatch):
    fake_neuron("neuron-cc")
    monkeypatch.setenv("FAKE_NEURON_CPU_OPS", "BatchMatMulV2")
    with pytest.raises(PlacementError, match="BatchMatMulV2 ops fell back to the CPU"):
        neuron_compile(hf_models[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("FAKE_NEURON_CPU_OPS", "Erf")  # a small part on the CPU: fine above the threshold
    manifest = neuron_compile(hf_models[0], tmp_path / "out", min_on_neuron=0.5)
    assert manifest["neuron"]["placement"]["cpu_ops"] == {"Erf": 2}  # one GELU per layer
    monkeypatch.delenv("FAKE_NEURON_CPU_OPS")
    with pytest.raises(PlacementError, match="compiled nothing"):  # the compiler rejects a flag: all on CPU
        neuron_compile(hf_models[0], tmp_path / "out2", compiler_args="--no-such-flag")


# ------------------------------------------------------ refusing a bad binary, stopping

@pytest.fixture
def swapped_binary(fake_neuron, hf_models, tmp_path):
    """Model A's directory holding model B's compiled binary: it loads, but computes the wrong function."""
    fake_neuron("neuron-cc")
    neuron_compile(hf_models[0], tmp_path / "a")
    neuron_compile(hf_models[1], tmp_path / "b")
    shutil.rmtree(tmp_path / "a" / "accelerated")
    shutil.copytree(tmp_path / "b" / "accelerated", tmp_path / "a" / "accelerated")
    return tmp_path / "a"


def test_binary_that_disagrees_with_its_reference_pairs_is_refused(swapped_binary):
    with pytest.raises(BinaryMismatchError, match=r"disagrees with its 8 reference pairs .*float16 bound"):
        runtime.load_compiled(swapped_binary)


def test_load_failure_stops_the_pool_with_its_reason(swapped_binary, tmp_path, start_pool):
    sysfs = fake_sysfs(tmp_path / "sysfs", [2])
    pool = start_pool("--backend", "neuron", "--model", str(swapped_binary), "--neuron-sysfs", str(sysfs),
                      parallel=2, wait=False)
    assert pool.process.wait(120) == 1
    log = pool.log()
    assert "bertpool-serve: error: worker" in log and "disagrees with its 8 reference pairs" in log
    assert log.count("started ") == 2  # no restart loop


def test_a_broken_neuron_install_stops_the_pool_saying_so(fake_neuron, hf_models, tmp_path, start_pool, monkeypatch):
    # The package is there but raises on import (its native library does not load): a typed error
    # naming the package, not an untyped RuntimeError.
    fake_neuron("neuron-cc")
    neuron_compile(hf_models[0], tmp_path / "m")
    monkeypatch.setenv("FAKE_NEURON_BROKEN_RUNTIME", "libnrt.so.1: cannot open shared object file")
    sysfs = fake_sysfs(tmp_path / "sysfs", [4])
    pool = start_pool("--backend", "neuron", "--model", str(tmp_path / "m"), "--neuron-sysfs", str(sysfs),
                      parallel=1, wait=False)
    assert pool.process.wait(120) == 1
    log = pool.log()
    assert ("could not load its model or configuration: tensorflow-neuron is installed but does not import "
            "(import tensorflow_neuron: RuntimeError: libnrt.so.1") in log, log
    assert log.count("started ") == 1 and "Traceback" not in log


def test_a_broken_neuron_install_is_a_clear_error_at_compile(fake_neuron, hf_models, tmp_path, monkeypatch, capsys):
    # It was a traceback and "unexpected error (a bug in bertpool-compile)", exit 3.
    fake_neuron("neuron-cc")
    monkeypatch.setenv("FAKE_NEURON_BROKEN_RUNTIME", "libnrt.so.1: cannot open shared object file")
    with pytest.raises(BackendUnavailable, match="tensorflow-neuron is installed but does not import .*reinstall"):
        neuron_compile(hf_models[0], tmp_path / "out")


def test_backends_refuse_the_other_targets_model(fake_neuron, hf_models, tmp_path):
    fake_neuron("neuron-cc")
    neuron_compile(hf_models[0], tmp_path / "n")
    with pytest.raises(ConfigError, match="compiled for Neuron; serve it with --backend neuron"):
        load_backend(BackendConfig(name="tf", model_dir=str(tmp_path / "n")))
    manifest = json.loads((tmp_path / "n" / "manifest.json").read_text())
    manifest["neuron"], manifest["reference"] = None, None
    (tmp_path / "n" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="must carry reference pairs"):
        runtime.load_compiled(tmp_path / "n")


# ------------------------------------------------------ a model for another NeuronCore generation

HOST_DEVICE = {"inf1": "Inferentia", "inf2": "Inferentia2"}  # what the driver writes in device_name
OTHER = {"inf1": "inf2", "inf2": "inf1"}


@pytest.mark.parametrize("family", ["inf1", "inf2"])
def test_a_model_for_another_neuroncore_generation_is_refused_at_load(fake_neuron, hf_models, tmp_path, family,
                                                                      monkeypatch):
    # It loaded, and failed only at the warm-up batch with the runtime's untyped OpError.
    fake_neuron(COMPILERS[family])
    neuron_compile(hf_models[0], tmp_path / "m")
    host = OTHER[family]
    sysfs = fake_sysfs(tmp_path / "sysfs", [2], device_name=HOST_DEVICE[host])
    monkeypatch.setattr(neuron_cores, "NEURON_SYSFS", str(sysfs))
    compiled_for = {"inf1": "inf1 (NeuronCore v1, tensorflow-neuron)",
                    "inf2": "inf2/trn1 (NeuronCore v2, tensorflow-neuronx)"}[family]
    message = (f"{tmp_path / 'm'} was compiled for {compiled_for}, but this host is {host} (NeuronCore "
               f"v{1 if host == 'inf1' else 2}; {sysfs}/neuron0/info/architecture/device_name: {HOST_DEVICE[host]}); "
               f"a Neuron binary runs only on the NeuronCore generation it was compiled for. Recompile it for this "
               f"host: bertpool-compile --target neuron --neuron-target {host}")
    with pytest.raises(ModelFormatError) as refused:
        load_backend(BackendConfig(name="neuron", model_dir=str(tmp_path / "m")))
    assert str(refused.value).startswith(message), str(refused.value)


@pytest.mark.parametrize("family", ["inf1", "inf2"])
def test_a_model_for_the_hosts_generation_loads(fake_neuron, hf_models, tmp_path, family, monkeypatch, caplog):
    fake_neuron(COMPILERS[family])
    neuron_compile(hf_models[0], tmp_path / "m")
    monkeypatch.setattr(neuron_cores, "NEURON_SYSFS",
                        str(fake_sysfs(tmp_path / "sysfs", [2, 2], device_name=HOST_DEVICE[family])))
    with caplog.at_level(logging.DEBUG, logger="bertpool.neuron"):
        backend = load_backend(BackendConfig(name="neuron", model_dir=str(tmp_path / "m")))  # warm-up included
    assert backend.model_info()["target"] == "neuron"
    assert f"compiled for {family}, and this host is {family}" in caplog.text


def test_a_host_whose_generation_is_unknown_loads_as_before_saying_so(fake_neuron, hf_models, tmp_path, monkeypatch,
                                                                     caplog):
    # No architecture files (no driver here, an older one, or a layout that moved them): nothing is guessed.
    fake_neuron("neuron-cc")
    neuron_compile(hf_models[0], tmp_path / "m")
    sysfs = fake_sysfs(tmp_path / "sysfs", [4])  # core_count only
    monkeypatch.setattr(neuron_cores, "NEURON_SYSFS", str(sysfs))
    with caplog.at_level(logging.INFO, logger="bertpool.neuron"):
        backend = load_backend(BackendConfig(name="neuron", model_dir=str(tmp_path / "m")))
    assert backend.model_info()["target"] == "neuron"
    assert (f"cannot check that {tmp_path / 'm'} (compiled for inf1) suits this host's NeuronCores: "
            f"{sysfs}/neuron0/info/architecture has no device_name or instance_type") in caplog.text


# --------------------------------------------------------------------- NeuronCores

def test_too_many_workers_for_the_visible_cores_is_a_clear_error(tmp_path):
    sysfs = fake_sysfs(tmp_path / "sysfs", [2])  # inf2.xlarge: one device, 2 NeuronCores
    result = subprocess.run(
        [sys.executable, "-m", "bertpool.pool.serve", "--address", f"ipc://{tmp_path}/f.ipc",
         "--worker-address", f"ipc://{tmp_path}/b.ipc", "--backend", "neuron", "--model", str(tmp_path),
         "--parallel", "4", "--neuron-sysfs", str(sysfs)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--parallel 4 --first-core 0 needs NeuronCores 0-3, but the Neuron runtime can see 2: 0-1" in result.stderr
    assert "started" not in result.stderr  # refused before any worker ran


def test_visible_cores():
    assert parse_core_list("0-3,5") == {0, 1, 2, 3, 5} and parse_core_list("2") == {2}
    with pytest.raises(ConfigError, match="not a list of cores"):
        parse_core_list("3-1")


def test_visible_cores_from_sysfs_and_environment(tmp_path):
    sysfs = fake_sysfs(tmp_path / "sysfs", [4, 4])  # inf1.6xlarge-like: 2 devices x 4 cores
    assert visible_cores(sysfs, {}) == set(range(8))
    assert visible_cores(sysfs, {"NEURON_RT_VISIBLE_CORES": "6-9"}) == {6, 7}
    check_cores(8, 0, sysfs, {})
    check_cores(2, 6, sysfs, {"NEURON_RT_VISIBLE_CORES": "6-7"})
    with pytest.raises(ConfigError, match="can see 2: 6-7 \\(NEURON_RT_VISIBLE_CORES=6-7\\)"):
        check_cores(2, 0, sysfs, {"NEURON_RT_VISIBLE_CORES": "6-7"})
    with pytest.raises(ConfigError, match="can see none"):
        check_cores(1, 0, tmp_path / "no-driver", {})


def test_worker_env_names_one_core_and_no_deprecated_group_sizes(monkeypatch):
    monkeypatch.delenv("NEURONCORE_GROUP_SIZES", raising=False)
    env = worker_env(3)
    assert env["NEURON_RT_VISIBLE_CORES"] == "3"
    assert "NEURONCORE_GROUP_SIZES" not in env

