"""bertpool-compile (and bertpool-demo-model) when writing the output fails partway.

A write that fails after the up-front "cannot write OUTPUT" probe (a full disk, a permission
lost, a file-size limit) is the environment, not a bug: one line "cannot write OUTPUT: reason",
exit 2, no traceback, and nothing left that looks like a model (with --force, the old output
as it was). TensorFlow's SavedModel write raised its own OpError, and a write() that failed
with an errno replacing_dir did not know (EIO, EFBIG) an OSError naming no file: both were
"unexpected error (a bug)", exit 3.

Tiny models only; the file-size-limit tests fail real writes, in a child process.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("safetensors")

from compile_fixtures import TINY, copy_tree, make_hf, quiet_compile  # noqa: E402

from bertpool.compile import cli, demo_model, runtime  # noqa: E402
from bertpool.compile.demo_model import random_weights  # noqa: E402
from bertpool.compile.writing import writing  # noqa: E402

pytestmark = pytest.mark.slow  # everything here builds a (tiny) BERT with TensorFlow
FAKE_NEURON = pathlib.Path(__file__).parent / "fake_neuron"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("write-source") / "hf")


@pytest.fixture(scope="module")
def old_model(source, tmp_path_factory):
    """A compiled model that --force would replace."""
    out = tmp_path_factory.mktemp("write-old") / "old"
    quiet_compile(source, out, target="cpu", pairs=4)
    return out


def compile_main(src, out, *extra) -> int:
    return cli.main(["--input_saved_model", str(src), "--output_saved_model", str(out), "--target", "cpu",
                     "--pairs", "4", "--quiet", *map(str, extra)])


def assert_cannot_write(err: str, out, reason: str, prog: str = "bertpool-compile") -> None:
    """``err`` ends with the one line "PROG: error: cannot write OUT: ...REASON..." and has no traceback."""
    assert "Traceback" not in err and "unexpected error" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: cannot write {out}: ") and reason in last, err


def patch_saved_model_save(monkeypatch, error) -> None:
    """tf.saved_model.save writes part of the SavedModel, then fails with ``error``."""
    def save(obj, export_dir, *args, **kwargs):
        pathlib.Path(export_dir, "variables").mkdir(parents=True)
        pathlib.Path(export_dir, "saved_model.pb").write_bytes(b"half a graph")
        raise error

    monkeypatch.setattr(tf.saved_model, "save", save)


# --------------------------------------------------------------- TensorFlow's write errors

TF_WRITE_ERRORS = {  # what TensorFlow raises for a failed file write, with the errno's reason
    "disk full": (tf.errors.ResourceExhaustedError, "No space left on device"),
    "permission lost": (tf.errors.PermissionDeniedError, "Permission denied"),
    "read-only": (tf.errors.PermissionDeniedError, "Read-only file system"),
    "directory gone": (tf.errors.NotFoundError, "No such file or directory"),
    "file too large": (tf.errors.OutOfRangeError, "File too large"),
}


@pytest.mark.parametrize("case", sorted(TF_WRITE_ERRORS))
def test_a_savedmodel_write_that_fails_is_one_line_exit_2_and_leaves_nothing(source, tmp_path, monkeypatch,
                                                                              capsys, case):
    cls, reason = TF_WRITE_ERRORS[case]
    message = f"{tmp_path}/.out.partial-1/accelerated/variables/variables.data-00000-of-00001; {reason}"
    patch_saved_model_save(monkeypatch, cls(None, None, message))
    out = tmp_path / "out"
    assert compile_main(source, out) == 2
    assert_cannot_write(capsys.readouterr().err, out, reason)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging directory
    assert not runtime.is_compiled_model(out)


def test_tensorflows_op_context_and_further_lines_stay_out_of_the_one_line(source, tmp_path, monkeypatch, capsys):
    """An eager op's message as TensorFlow words it: "{{function_node ...}} PATH; reason [Op:SaveV2]"."""
    message = ("{{function_node __wrapped__SaveV2_dtypes_31_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
               f"{tmp_path}/v.data; No space left on device [Op:SaveV2]\n\t [[{{node SaveV2}}]]")
    patch_saved_model_save(monkeypatch, tf.errors.ResourceExhaustedError(None, None, message))
    out = tmp_path / "out"
    assert compile_main(source, out) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"bertpool-compile: error: cannot write {out}: {tmp_path}/v.data; No space left on device"


def test_a_failed_write_keeps_the_old_output_with_force(source, old_model, tmp_path, monkeypatch, capsys):
    old = copy_tree(old_model, tmp_path / "out")
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    patch_saved_model_save(monkeypatch, tf.errors.ResourceExhaustedError(None, None, "x; No space left on device"))
    assert compile_main(source, old, "--force") == 2
    assert_cannot_write(capsys.readouterr().err, old, "No space left on device")
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or set-aside directory
    runtime.load_compiled(old)  # still the whole, proven model


@pytest.fixture
def fake_inf1(monkeypatch, tmp_path):
    """tests/fake_neuron's tensorflow-neuron double importable and its neuron-cc on PATH (as
    test_neuron.py's fake_neuron fixture); the double's modules are dropped at teardown."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    shutil.copy2(FAKE_NEURON / "bin" / "neuron-cc", bin_dir / "neuron-cc")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.syspath_prepend(str(FAKE_NEURON))
    yield
    for name in ("tensorflow_neuron", "tensorflow_neuronx", "_fake_neuron"):
        sys.modules.pop(name, None)


def test_a_traced_neuron_model_whose_save_fails_is_one_line_exit_2(source, tmp_path, monkeypatch, capsys,
                                                                    fake_inf1):
    """The Neuron path saves the traced model itself."""
    import _fake_neuron

    def save(self, filepath, *args, **kwargs):
        pathlib.Path(filepath).mkdir(parents=True)
        raise tf.errors.PermissionDeniedError(None, None, f"{filepath}/saved_model.pb; Permission denied")

    monkeypatch.setattr(_fake_neuron.FakeNeuronModel, "save", save)
    work, out = tmp_path / "work", tmp_path / "work" / "out"
    code = cli.main(["--input_saved_model", str(source), "--output_saved_model", str(out), "--target", "neuron",
                     "--pairs", "4", "--quiet"])
    assert code == 2
    assert_cannot_write(capsys.readouterr().err, out, "Permission denied")
    assert list(work.iterdir()) == []


# ------------------------------------------------------------- OSErrors of a plain write()

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG], ids=errno.errorcode.get)
def test_a_manifest_write_that_fails_is_one_line_exit_2_and_leaves_nothing(source, tmp_path, monkeypatch,
                                                                           capsys, code):
    """The manifest is written after the model's files; a write() to it fails as the kernel says,
    with an errno and no file name (half the text already written)."""
    real_write_text = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name != runtime.MANIFEST:
            return real_write_text(self, data, *args, **kwargs)
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    out = tmp_path / "out"
    assert compile_main(source, out) == 2
    assert_cannot_write(capsys.readouterr().err, out, os.strerror(code))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def heavy_encoder(tmp_path_factory):
    """A model whose encoder (intermediate 4096: ~4 MB of variables) outweighs its embeddings (256
    words, 128 positions: ~100 KB), so a file-size limit between them fails TensorFlow's write."""
    shape = dataclasses.replace(TINY, intermediate=4096, vocab_size=256, max_positions=128)
    return make_hf(tmp_path_factory.mktemp("write-heavy") / "hf", random_weights(shape), shape=shape)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as Linux has them")
@pytest.mark.parametrize("limit,failing", [(64_000, "numpy's embeddings.npz"), (1_000_000, "TensorFlow's SaveV2")])
def test_a_real_write_beyond_a_file_size_limit_is_one_line_exit_2(heavy_encoder, tmp_path, limit, failing):
    """No mocks: a child under RLIMIT_FSIZE (SIGXFSZ ignored, so write() fails with EFBIG) fails
    ``failing`` partway, as a full disk would."""
    import resource

    def cap_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "work" / "out"
    args = ["--input_saved_model", heavy_encoder, "--output_saved_model", out, "--target", "cpu", "--pairs", "4",
            "--quiet"]
    result = subprocess.run([sys.executable, "-m", "bertpool.compile.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=240, preexec_fn=cap_file_size,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 2, result.stderr
    assert_cannot_write(result.stderr, out, "File too large")
    assert ("SaveV2" in failing) == (".partial-" in result.stderr)  # TensorFlow names the file it wrote
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------- bertpool-demo-model

def test_demo_model_checkpoint_write_that_fails_is_cannot_write(tmp_path, monkeypatch, capsys):
    """--format checkpoint writes through TensorFlow's Saver: its OpError was a traceback, exit 1."""
    def save(self, sess, save_path, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, f"{save_path}.index; No space left on device")

    monkeypatch.setattr(tf.compat.v1.train.Saver, "save", save)
    out = tmp_path / "out"
    assert demo_model.main(["--size", "tiny", "--format", "checkpoint", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"bertpool-demo-model: error: cannot write {out}: " in err and "No space left on device" in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as Linux has them")
@pytest.mark.parametrize("fmt", ["hf", "savedmodel"])
def test_demo_model_write_beyond_a_file_size_limit_is_cannot_write_and_why(tmp_path, fmt):
    """No mocks. --format hf: safetensors' writer raised its own SafetensorError, a traceback and "a bug"
    (exit 3). --format savedmodel (saved from a Session): the reason was lost, "cannot write OUT: Graph
    execution error:", since a graph-mode error gives it lines below that header."""
    import resource

    def cap_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "work" / "out"
    result = subprocess.run([sys.executable, "-m", "bertpool.compile.demo_model", "--size", "tiny", "--format", fmt,
                             "--output", str(out)], capture_output=True, text=True, timeout=240,
                            preexec_fn=cap_file_size, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 2, result.stderr
    assert f"bertpool-demo-model: error: cannot write {out}: " in result.stderr, result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(out.parent.iterdir()) == []


# ------------------------------------------------------------------------------ writing()

def test_writing_names_the_path_and_passes_everything_else_unchanged(tmp_path):
    target = tmp_path / "file"
    with pytest.raises(OSError) as caught, writing(target):
        raise OSError(errno.EIO, "Input/output error")
    assert (caught.value.errno, caught.value.strerror, caught.value.filename) == (errno.EIO, "Input/output error",
                                                                                   str(target))
    reading = OSError(errno.EIO, "Input/output error", "/some/input")  # names its file: not ours to rename
    with pytest.raises(OSError) as caught, writing(target):
        raise reading
    assert caught.value is reading
    bug = tf.errors.InvalidArgumentError(None, None, "a graph that does not fit")  # not a write's error
    with pytest.raises(tf.errors.InvalidArgumentError) as caught, writing(target):
        raise bug
    assert caught.value is bug
    with pytest.raises(OSError) as caught, writing(target):
        raise tf.errors.NotFoundError(None, None, "x; No such file or directory")
    assert (caught.value.errno, caught.value.strerror, caught.value.filename) == (
        None, "x; No such file or directory", str(target))
