"""bertpool.compile: weight extraction, rebuild, equivalence, manifest, runtime, errors.

Tiny models only (2 layers x 64 hidden, built from seeded random weights in a
second or two); the whole file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("safetensors")

from compile_fixtures import (TINY, copy_tree, edit_hf_config, make_checkpoint, make_hf, make_savedmodel,  # noqa: E402
                              quiet_compile, tiny_weights)

from bertpool.common.data import generate_pairs  # noqa: E402
from bertpool.common.errors import (BackendUnavailable, ConfigError, EquivalenceError,  # noqa: E402
                                    ModelFormatError)
from bertpool.common.tokenizer import BertTokenizer  # noqa: E402
from bertpool.compile import cli, runtime  # noqa: E402
from bertpool.compile.build import default_target  # noqa: E402
from bertpool.compile.equivalence import TOLERANCES, SavedModelOriginal, tolerance_for  # noqa: E402
from bertpool.compile.shape import BertShape  # noqa: E402
from bertpool.compile.weights import detect_format, load_weights  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_TSV = REPO / "common" / "sample_pairs.tsv"  # 64 MRPC-format pairs
pytestmark = pytest.mark.slow  # everything here builds a (tiny) BERT with TensorFlow


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny source models, built once: SavedModels per GELU, a checkpoint and an HF dir."""
    root = tmp_path_factory.mktemp("compile-models")
    built = {f"savedmodel-{g}": make_savedmodel(root / f"sm-{g}", gelu=g) for g in ("erf", "tanh", "crude")}
    built["checkpoint"] = make_checkpoint(root / "ckpt", gelu="tanh")
    built["hf"] = make_hf(root / "hf", gelu="erf")
    return built


@pytest.fixture(scope="module")
def compiled(models, tmp_path_factory):
    """The erf SavedModel compiled for cpu at float32 (shared by the runtime tests)."""
    out = tmp_path_factory.mktemp("compiled") / "cpu-fp32"
    quiet_compile(models["savedmodel-erf"], out, target="cpu", pairs=16)
    return out


def features_for(vocab, n=12, seed=3):
    pairs = [(p.text_a, p.text_b) for p in generate_pairs(n, seed=seed)]
    return BertTokenizer(vocab).encode_pairs(pairs)


# ---------------------------------------------------------------------- the demo model

def test_demo_model_is_a_run_classifier_export(models):
    path = models["savedmodel-erf"]
    assert (path / "saved_model.pb").is_file() and (path / "vocab.txt").is_file()
    vocab = (path / "vocab.txt").read_text().splitlines()
    assert len(vocab) == TINY.vocab_size
    assert vocab[0] == "[PAD]" and vocab[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    weights = load_weights(path)
    sig = weights.signature
    assert set(sig.inputs) == {"input_ids", "input_mask", "segment_ids", "label_ids", "is_real_example"}
    assert sig.seq_length == 128
    # probabilities spread and labels vary, so label agreement means something
    original = SavedModelOriginal(path, weights)
    f = features_for(path / "vocab.txt", n=32)
    probs = original.predict(f.input_ids, f.input_mask, f.segment_ids)
    original.close()
    assert probs.shape == (32, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    labels = probs.argmax(-1)
    assert 0.15 < labels.mean() < 0.85
    assert probs[:, 1].std() > 0.1


def test_demo_model_is_deterministic(tmp_path):
    a = load_weights(make_savedmodel(tmp_path / "a", seed=7))
    b = load_weights(make_savedmodel(tmp_path / "b", seed=7))
    for name, value in a.tensors.items():
        np.testing.assert_array_equal(value, b.tensors[name], err_msg=name)
    assert (tmp_path / "a" / "vocab.txt").read_bytes() == (tmp_path / "b" / "vocab.txt").read_bytes()


def test_demo_model_cli_refuses_non_empty_output(tmp_path, capsys):
    from bertpool.compile.demo_model import main

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    assert main(["--size", "tiny", "--output", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "file").read_text() == "keep me"


def test_demo_model_force_keeps_the_old_output_until_the_new_one_is_whole(tmp_path, monkeypatch):
    """--force deleted the old directory first: Ctrl-C a few seconds into a base model lost it."""
    from bertpool.compile import demo_model

    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("keep me")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "_write_demo_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_model.build_demo_model(tmp_path / "keep", overwrite=True)
    assert (tmp_path / "keep" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no staging directory left


def test_demo_model_sigterm_cleans_up_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """SIGTERM (timeout, kill) killed bertpool-demo-model mid-build and left its staging directory; it
    now cleans up as Ctrl-C does, says "terminated", and exits 143."""
    import signal

    from bertpool.compile import demo_model

    def not_handled(signum, frame):  # without the fix, SIGTERM would kill pytest itself
        raise AssertionError("SIGTERM was not turned into a clean stop")

    def killed_mid_build(out, *args):
        out.mkdir()
        (out / "half-written").write_text("x")
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at the next bytecode
        raise AssertionError("SIGTERM did not stop the build")

    monkeypatch.setattr(demo_model, "_write_demo_model", killed_mid_build)
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        assert demo_model.main(["--size", "tiny", "--output", str(tmp_path / "out")]) == 143
        assert signal.getsignal(signal.SIGTERM) is not_handled  # restored after the build
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging directory
    assert capsys.readouterr().err.strip().endswith(f"terminated; {tmp_path / 'out'} is as it was")


@pytest.mark.parametrize("case, message", [
    ("output is a file", "is not a directory"),
    ("negative seed", "seed must be an integer >= 0"),
    ("output under a file", "cannot write"),
])
def test_demo_model_cli_says_what_is_wrong_with_its_arguments(tmp_path, capsys, case, message):
    """One line and exit 2 for each, never a traceback, and the file in the way is untouched."""
    from bertpool.compile.demo_model import main

    (tmp_path / "file").write_text("keep me")
    output = {"output is a file": tmp_path / "file", "negative seed": tmp_path / "out",
              "output under a file": tmp_path / "file" / "out"}[case]
    seed = ["--seed", "-1"] if case == "negative seed" else []
    assert main(["--size", "tiny", "--output", str(output), *seed]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "keep me"


def test_demo_model_says_cannot_write_when_tensorflow_cannot_write_the_savedmodel(tmp_path, monkeypatch, capsys):
    """A write that fails inside TensorFlow (a full disk, a permission lost mid-run) raised its own
    NotFoundError/PermissionDeniedError: a traceback and exit 1. It is "cannot write OUTPUT", exit 2,
    and nothing is left behind."""
    import tensorflow as tf

    from bertpool.compile import demo_model

    class Unwritable:
        def __init__(self, export_dir):
            raise tf.errors.PermissionDeniedError(None, None, f"{export_dir}; Permission denied")

    monkeypatch.setattr(tf.compat.v1.saved_model, "Builder", Unwritable)
    out = tmp_path / "out"
    assert demo_model.main(["--size", "tiny", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {out}: " in err and "Permission denied" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging directory


# ------------------------------------------------------------------- weight extraction

def test_detect_format(models, tmp_path):
    assert detect_format(models["savedmodel-erf"]) == "savedmodel"
    assert detect_format(models["checkpoint"]) == "checkpoint"
    assert detect_format(models["checkpoint"] / "bert_model.ckpt") == "checkpoint"  # a prefix
    assert detect_format(models["hf"]) == "hf"


def test_extraction_round_trip_through_every_format(models, tmp_path):
    """SavedModel -> numpy -> checkpoint -> numpy -> HF -> numpy: identical tensors."""
    from bertpool.compile.weights import write_checkpoint, write_hf

    import tensorflow as tf

    src = load_weights(models["savedmodel-erf"])
    assert src.shape == TINY and src.gelu == "erf"
    # the SavedModel's variables, read independently through a TF1 session
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        tf.compat.v1.saved_model.loader.load(session, ["serve"], str(models["savedmodel-erf"]))
        live = {v.op.name: session.run(v) for v in tf.compat.v1.global_variables()}
    assert set(live) == set(src.tensors)
    for name, value in live.items():
        np.testing.assert_array_equal(src.tensors[name], value, err_msg=name)

    ckpt = load_weights(write_checkpoint(tmp_path / "ckpt", src.shape, src.tensors, gelu="tanh"))
    hf = load_weights(write_hf(tmp_path / "hf", src.shape, src.tensors, gelu="crude"))
    assert (ckpt.shape, ckpt.gelu, ckpt.source.format) == (TINY, "tanh", "checkpoint")
    assert (hf.shape, hf.gelu, hf.source.format) == (TINY, "crude", "hf")
    for name, value in src.tensors.items():
        np.testing.assert_array_equal(ckpt.tensors[name], value, err_msg=name)
        np.testing.assert_array_equal(hf.tensors[name], value, err_msg=name)


def test_hf_names_and_orientation(models):
    """HF nn.Linear weights are [out,in]: kernels must come out transposed."""
    from safetensors.numpy import load_file

    raw = load_file(str(models["hf"] / "model.safetensors"))
    w = load_weights(models["hf"])
    np.testing.assert_array_equal(w.tensors["bert/encoder/layer_1/intermediate/dense/kernel"],
                                  raw["bert.encoder.layer.1.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(w.tensors["output_weights"], raw["classifier.weight"])
    np.testing.assert_array_equal(w.tensors["bert/embeddings/LayerNorm/gamma"], raw["bert.embeddings.LayerNorm.weight"])


def test_hf_bfloat16_and_old_gamma_beta_names(tmp_path):
    """bfloat16 safetensors (numpy has no bf16) and TF-era LayerNorm.gamma/beta names."""
    import struct

    from bertpool.compile.weights import hf_name

    tensors = tiny_weights()
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        key, transpose = hf_name(name)
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        value = np.ascontiguousarray(value.T if transpose else value)
        raw = (value.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncate to bfloat16
        header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    make_hf(tmp_path, tensors)  # config.json + vocab, then replace the weights
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(blobs))
    w = load_weights(tmp_path)
    for name, value in tensors.items():
        expected = ((value.view(np.uint32) >> 16) << 16).view(np.float32)
        np.testing.assert_array_equal(w.tensors[name], expected, err_msg=name)


# ------------------------------------------------------------------------ bad inputs

def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match="is not a SavedModel"):
        load_weights(tmp_path)
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_weights(tmp_path / "nope")


def test_corrupt_saved_model_pb(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"\x08\x96\x01garbage" * 10)
    (tmp_path / "variables").mkdir()
    with pytest.raises(ModelFormatError, match="is not a SavedModel"):
        load_weights(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    tensors = tiny_weights()
    del tensors["bert/encoder/layer_1/attention/output/dense/kernel"]
    make_checkpoint(tmp_path / "ckpt", tensors)
    with pytest.raises(ModelFormatError, match="missing tensor bert/encoder/layer_1/attention/output/dense/kernel"):
        load_weights(tmp_path / "ckpt")
    tensors = tiny_weights()
    del tensors["bert/pooler/dense/bias"]
    make_hf(tmp_path / "hf", tensors)
    with pytest.raises(ModelFormatError, match=r"missing tensor bert\.pooler\.dense\.bias"):
        load_weights(tmp_path / "hf")


def test_wrong_shape_is_named(tmp_path):
    tensors = tiny_weights()
    tensors["bert/encoder/layer_0/intermediate/dense/bias"] = np.zeros([255], np.float32)
    make_hf(tmp_path / "hf", tensors)
    name = "bert/encoder/layer_0/intermediate/dense/bias"
    with pytest.raises(ModelFormatError, match=rf"tensor {name} has shape \[255\], expected \[256\]"):
        load_weights(tmp_path / "hf")


def test_config_contradicting_weights(tmp_path):
    make_hf(tmp_path, tiny_weights())
    edit_hf_config(tmp_path, hidden_size=128)
    with pytest.raises(ModelFormatError, match="word_embeddings has shape"):
        load_weights(tmp_path)
    edit_hf_config(tmp_path, hidden_size=64, num_attention_heads=5)
    with pytest.raises(ModelFormatError, match="does not divide"):
        load_weights(tmp_path)
    edit_hf_config(tmp_path, num_attention_heads=4, hidden_act="relu")
    with pytest.raises(ModelFormatError, match="hidden_act 'relu' is not supported"):
        load_weights(tmp_path)


def test_vocab_size_mismatch(models, tmp_path):
    src = copy_tree(models["hf"], tmp_path / "hf")
    lines = (src / "vocab.txt").read_text().splitlines()
    (src / "vocab.txt").write_text("\n".join(lines[:-5]) + "\n")
    with pytest.raises(ModelFormatError, match="has 2043 tokens but bert/embeddings/word_embeddings has 2048 rows"):
        quiet_compile(src, tmp_path / "out", target="cpu", verify=False)
    assert not (tmp_path / "out").exists()


def test_savedmodel_without_vocab_needs_flag(models, tmp_path):
    src = copy_tree(models["savedmodel-erf"], tmp_path / "nested" / "sm")
    (src / "vocab.txt").unlink()
    with pytest.raises(ModelFormatError, match="pass --vocab"):
        quiet_compile(src, tmp_path / "out", target="cpu", verify=False)
    # --vocab, or a vocab.txt beside the directory, both work
    manifest = quiet_compile(src, tmp_path / "out", target="cpu", verify=False,
                             vocab=models["savedmodel-erf"] / "vocab.txt")
    assert manifest["equivalence"] is None
    (tmp_path / "nested" / "vocab.txt").write_bytes((models["savedmodel-erf"] / "vocab.txt").read_bytes())
    quiet_compile(src, tmp_path / "out2", target="cpu", verify=False)
    assert (tmp_path / "out2" / "vocab.txt").is_file()


# ---------------------------------------------------------- rebuilt vs original model

def assert_labels_agree_but_near_ties(eq: dict) -> None:
    """The documented contract (compile/equivalence.py): only a near tie may change its label."""
    flipped = round((1.0 - eq["label_agreement"]) * eq["pairs"])
    assert 0 <= eq["near_ties"] <= eq["pairs"]
    assert flipped <= eq["near_ties"], eq
    if eq["near_ties"] == 0:
        assert eq["label_agreement"] == 1.0


def test_only_near_ties_may_flip_and_are_counted():
    """measure() counts the pairs whose label the measured error could flip."""
    from types import SimpleNamespace

    from bertpool.compile.equivalence import measure, run_original

    original = np.array([[0.5004, 0.4996], [0.9, 0.1], [0.2, 0.8]], np.float32)
    rebuilt = np.array([[0.4996, 0.5004], [0.9, 0.1], [0.2, 0.8]], np.float32)  # the near tie flips
    ids = np.arange(3, dtype=np.int32)[:, None]
    model = lambda probs: SimpleNamespace(predict=lambda i, m, s: probs[i[:, 0]])  # noqa: E731
    answers = run_original(model(original), SimpleNamespace(input_ids=ids, input_mask=ids, segment_ids=ids), [],
                           data="t", original_name="o", progress=False)
    report = measure(answers, model(rebuilt), tolerance=1e-3, rebuilt_name="r", progress=False)
    assert report.near_ties == 1 and report.label_agreement == pytest.approx(2 / 3)
    assert_labels_agree_but_near_ties(report.to_dict())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("gelu", ["erf", "tanh", "crude"])
def test_rebuilt_matches_original(models, tmp_path, gelu, dtype):
    manifest = quiet_compile(models[f"savedmodel-{gelu}"], tmp_path / "out", target="cpu", dtype=dtype, pairs=24)
    eq = manifest["equivalence"]
    assert manifest["gelu"] == gelu and manifest["source"]["gelu"] == gelu
    assert eq["passed"] and eq["tolerance"] == TOLERANCES[dtype]
    assert eq["max_abs_diff"] <= TOLERANCES[dtype]
    assert_labels_agree_but_near_ties(eq)
    assert "SavedModel" in eq["original"] and "loaded from disk" in eq["rebuilt"]
    twin = eq["float32_twin"]  # below float32, the same graph at float32 is held to the float32 bound first
    assert twin is None if dtype == "float32" else (twin["passed"] and twin["tolerance"] == TOLERANCES["float32"])


@pytest.mark.parametrize("fmt", ["checkpoint", "hf"])
def test_rebuilt_matches_reference_for_weight_formats(models, tmp_path, fmt):
    manifest = quiet_compile(models[fmt], tmp_path / "out", target="cpu", pairs=16)
    eq = manifest["equivalence"]
    assert eq["passed"] and eq["max_abs_diff"] <= 1e-5 and eq["label_agreement"] == 1.0
    assert "reference BERT graph" in eq["original"] and manifest["source"]["format"] == fmt


def test_crude_gelu_on_erf_model_uses_the_approximation_allowance(models, tmp_path):
    manifest = quiet_compile(models["savedmodel-erf"], tmp_path / "out", target="cpu", gelu="crude", pairs=24)
    eq = manifest["equivalence"]
    assert manifest["gelu"] == "crude" and manifest["source"]["gelu"] == "erf"
    assert eq["tolerance"] == tolerance_for("float32", "crude", "erf") > 1e-5
    assert eq["passed"] and eq["max_abs_diff"] > 1e-5  # a different function, measurably


def _fakes(*probabilities):
    """Models answering each row ``i`` (its input_ids[i, 0]) with row i of each array; and the features."""
    from types import SimpleNamespace

    ids = np.arange(len(probabilities[0]), dtype=np.int32)[:, None]
    models = [SimpleNamespace(predict=lambda i, m, s, p=np.asarray(p, np.float32): p[i[:, 0]]) for p in probabilities]
    return models, SimpleNamespace(input_ids=ids, input_mask=ids, segment_ids=ids)


def test_a_proof_below_float32_runs_the_original_once_and_names_the_failing_stage():
    """prove(): the twin is held to its own bound, the model to its own; both must pass, and the
    failure says which, the graph (twin) or the rounding (model)."""
    from types import SimpleNamespace

    from bertpool.compile.equivalence import prove, run_original

    base = np.array([[0.9, 0.1], [0.3, 0.7]])
    (original, exact, off_by_1e3), features = _fakes(base, base + [[1e-7, -1e-7]] * 2, base + [[1e-3, -1e-3]] * 2)
    calls = []
    counted = SimpleNamespace(predict=lambda *a: calls.append(len(a[0])) or original.predict(*a))
    answers = run_original(counted, features, [], "t", "o", progress=False)
    assert calls == [2]
    graph_wrong = prove(answers, off_by_1e3, 5e-3, "r", "float16", (off_by_1e3, 1e-5, "twin"), progress=False)
    assert not graph_wrong.passed and graph_wrong.max_abs_diff <= graph_wrong.tolerance  # the model alone passes
    assert "not by rounding" in graph_wrong.failure() and "FAILED: the graph differs" in graph_wrong.summary()
    rounding = prove(answers, off_by_1e3, 1e-4, "r", "float16", (exact, 1e-5, "twin"), progress=False)
    assert not rounding.passed and "its float32 twin passed" in rounding.failure()
    assert prove(answers, off_by_1e3, 5e-3, "r", "float16", (exact, 1e-5, "twin"), progress=False).passed
    assert calls == [2]  # three proofs, one run of the original
    with pytest.raises(ValueError):
        prove(answers, exact, 1e-5, "r", "float32", (exact, 1e-5, "twin"), progress=False)


def _tanh_where_the_source_says_erf(monkeypatch):
    """Plant a graph mistake within float16's bound: the rebuilt graph computes the tanh GELU whatever
    its configuration says (tiny erf model: 2.8e-4 off at float32, 1.3e-3 at float16, bound 5e-3)."""
    from bertpool.compile import gelu, lean_bert

    monkeypatch.setattr(lean_bert, "gelu", lambda x, kind: gelu.gelu(x, "tanh"))


def test_a_graph_mistake_hidden_by_float16_rounding_fails_at_its_float32_twin(models, tmp_path, monkeypatch,
                                                                                capsys):
    """At float16 alone (bound 5e-3) a graph computing the wrong GELU passed the proof: its float32
    twin, the same graph computed in float32, is held to 1e-5 first, and fails it (exit 1, as any
    failed proof; the output is kept, marked failed, and does not load)."""
    _tanh_where_the_source_says_erf(monkeypatch)
    code = cli.main(["--input_saved_model", str(models["savedmodel-erf"]), "--output_saved_model",
                     str(tmp_path / "out"), "--target", "cpu", "--dtype", "float16", "--pairs", "8", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "the rebuilt graph differs from the original, not by rounding: its float32 twin" in err, err
    eq = json.loads((tmp_path / "out" / "manifest.json").read_text())["equivalence"]
    assert eq["float32_twin"]["passed"] is False and eq["float32_twin"]["max_abs_diff"] > TOLERANCES["float32"]
    assert eq["max_abs_diff"] <= eq["tolerance"] == TOLERANCES["float16"]  # what the float16 proof alone passed
    assert eq["passed"] is False
    with pytest.raises(ModelFormatError, match="failed its equivalence proof") as refused:
        runtime.load_compiled(tmp_path / "out")
    # The stage that failed, not the float16 numbers, which were within their bound.
    assert "its float32 twin, the same graph computed in float32, is off by" in str(refused.value)
    assert "the rebuilt graph differs from the original, not by rounding" in str(refused.value)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_proof_runs_the_original_once_and_a_twin_only_below_float32(models, tmp_path, monkeypatch, capsys,
                                                                       dtype):
    """A float16 proof states both stages (the status line, the stdout summary, the manifest) and
    builds the graph twice (the model and its float32 twin); a float32 proof builds it once. Either
    way the original answers each row once."""
    from bertpool.compile import build

    built, rows = [], []
    build_module, open_original = build.build_module, build.open_original

    def counting_open(weights, seq_length):
        original = open_original(weights, seq_length)
        predict = original.predict
        original.predict = lambda ids, *a: rows.append(len(ids)) or predict(ids, *a)
        return original

    monkeypatch.setattr(build, "build_module", lambda s, t, config: built.append(config.dtype) or
                        build_module(s, t, config))
    monkeypatch.setattr(build, "open_original", counting_open)
    code = cli.main(["--input_saved_model", str(models["savedmodel-erf"]), "--output_saved_model",
                     str(tmp_path / "out"), "--target", "cpu", "--dtype", dtype, "--pairs", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    eq = json.loads((tmp_path / "out" / "manifest.json").read_text())["equivalence"]
    assert sum(rows) == eq["pairs"] + eq["probe_rows"] == 8 + 5
    line = next(x for x in err.splitlines() if x.startswith("equivalence PASSED"))
    if dtype == "float32":
        assert built == ["float32"] and eq["float32_twin"] is None
        assert "twin" not in line and "twin" not in out, (line, out)
        return
    assert built == ["float16", "float32"]
    twin = eq["float32_twin"]
    assert twin["passed"] and twin["max_abs_diff"] <= twin["tolerance"] == TOLERANCES["float32"]
    assert eq["passed"] and eq["max_abs_diff"] <= eq["tolerance"] == TOLERANCES["float16"]
    assert (f"float32 twin of the graph: max |dp| = {twin['max_abs_diff']:.3g} (tolerance 1e-05); then the "
            f"float16 model: max |dp| = {eq['max_abs_diff']:.3g} (tolerance 0.005)") in line, line
    assert f"float32 twin max |dp| {twin['max_abs_diff']:.3g}, then max |dp| {eq['max_abs_diff']:.3g}" in out


def test_tolerances():
    assert tolerance_for("float32", "erf", "erf") == 1e-5
    assert tolerance_for("float16", "tanh", "tanh") == TOLERANCES["float16"]
    assert tolerance_for("float32", "tanh", "erf") == tolerance_for("float32", "erf", "tanh") > 1e-5
    assert tolerance_for("float32", "crude", "tanh") > tolerance_for("float32", "tanh", "erf")
    assert TOLERANCES["float32"] < TOLERANCES["float16"] < TOLERANCES["bfloat16"]


def test_bfloat16_and_mrpc_tsv(models, tmp_path):
    tsv = SAMPLE_TSV
    manifest = quiet_compile(models["hf"], tmp_path / "out", target="cpu", dtype="bfloat16", pairs=8, tsv=tsv)
    eq = manifest["equivalence"]
    assert manifest["xla"] is False  # measured slower for bf16 on CPU
    assert eq["passed"] and eq["max_abs_diff"] <= TOLERANCES["bfloat16"] and eq["data"] == str(tsv)
    assert eq["pairs"] == 8


def test_equivalence_failure_exits_1_and_output_will_not_load(models, tmp_path):
    with pytest.raises(EquivalenceError, match="differs from the original"):
        quiet_compile(models["savedmodel-erf"], tmp_path / "out", target="cpu", gelu="crude", tolerance=1e-9,
                      pairs=8)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["equivalence"]["passed"] is False
    with pytest.raises(ModelFormatError, match="failed its equivalence proof"):
        runtime.load_compiled(tmp_path / "out")


def _bucket_cut_one_token_short(self, input_mask):
    real = np.flatnonzero(input_mask.any(axis=0))
    return next(b for b in self.seq_buckets if b >= (int(real[-1]) if len(real) else 1))  # the mistake: no + 1


def _wrong_at_bucket_32(monkeypatch):
    """The graph compiled for sequence length 32 alone answers wrongly (any one bucket's export gone wrong)."""
    init = runtime.CompiledModel.__init__

    def patched(self, model_dir, manifest, embeddings, accelerated):
        def wrong(x, bias):
            logits = accelerated(x, bias)
            return logits + np.eye(logits.shape[1])[0] * (x.shape[1] == 32)  # class 0's logit + 1 at 32
        init(self, model_dir, manifest, embeddings, wrong)

    monkeypatch.setattr(runtime.CompiledModel, "__init__", patched)


def _short_batch_rows_reversed(monkeypatch):
    """A short batch padded so that its real rows land at the end (the runtime reads the front)."""
    pad = runtime._pad_rows
    monkeypatch.setattr(runtime, "_pad_rows", lambda a, rows: pad(a, rows) if len(a) == rows else pad(a, rows)[::-1])


@pytest.mark.parametrize("mistake", [
    lambda mp: mp.setattr(runtime.CompiledModel, "bucket_for", _bucket_cut_one_token_short),
    _wrong_at_bucket_32,  # 8 generated pairs never run at 32: each batch has one over 32 tokens
    _short_batch_rows_reversed,  # 8 pairs at batch 4: no short batch, unless the proof makes them
], ids=["bucket cuts the last real token", "one bucket's graph wrong", "short batch rows misplaced"])
def test_the_proof_catches_a_mistake_at_a_bucket_edge_or_in_a_short_batch(models, tmp_path, monkeypatch, mistake):
    """The proof runs a row just past every bucket's end and short batches, not only the pairs' own
    lengths and full batches: a rebuilt model wrong only there must fail it (mutations found passing)."""
    mistake(monkeypatch)
    with pytest.raises(EquivalenceError, match="differs from the original"):
        quiet_compile(models["savedmodel-erf"], tmp_path / "out", target="cpu", pairs=8)
    eq = json.loads((tmp_path / "out" / "manifest.json").read_text())["equivalence"]
    assert eq["pairs"] == 8 and eq["probe_rows"] == 5  # buckets 32, 64, 96, 128: rows of 32, 33, 65, 97, 128


def test_a_rebuilt_model_answering_nan_fails_its_proof_saying_so(models, tmp_path, monkeypatch, capsys):
    """A rebuilt graph giving NaN (an fp16 overflow, a -inf mask times 0) was refused as a binary that
    disagrees with its reference pairs (exit 2, "recompile it", naming the staging directory)."""
    predict = runtime.CompiledModel.predict
    monkeypatch.setattr(runtime.CompiledModel, "predict", lambda self, *a: predict(self, *a) * np.float32("nan"))
    code = cli.main(["--input_saved_model", str(models["savedmodel-erf"]), "--output_saved_model",
                     str(tmp_path / "out"), "--target", "cpu", "--pairs", "8", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "gives non-finite probabilities (NaN or inf) on the reference pairs" in err and "recompile" not in err, err
    assert not (tmp_path / "out").exists()


def test_probe_rows_reach_each_bucket_edge_from_the_longest_pair(models):
    from bertpool.compile.equivalence import probe_features, probe_lengths

    assert probe_lengths([128, 32, 64, 96]) == [32, 33, 65, 97, 128] and probe_lengths([64]) == [64]
    f = features_for(models["savedmodel-erf"] / "vocab.txt", n=3)  # no truncated pair: all under 128 tokens
    probes = probe_features(f, [32, 64, 96, 128])
    longest = int(np.argmax(f.input_mask.sum(axis=1)))
    real = int(f.input_mask[longest].sum())
    assert real < 128 and list(probes.input_mask.sum(axis=1)) == [32, 33, 65, 97, 128]
    for row, length in enumerate([32, 33, 65, 97, 128]):
        assert not probes.input_mask[row, length:].any() and not probes.input_ids[row, length:].any()
        assert probes.input_ids[row, length - 1] == f.input_ids[longest, real - 1]  # ends in its [SEP]
        cut = min(length, real) - 1  # a prefix of the pair, then its tokens repeated
        np.testing.assert_array_equal(probes.input_ids[row, :cut], f.input_ids[longest, :cut])
        np.testing.assert_array_equal(probes.segment_ids[row, :cut], f.segment_ids[longest, :cut])
    assert set(np.unique(probes.segment_ids[-1, :128])) == {0, 1}  # both segments

# --------------------------------------------------------------------- the manifest

def test_manifest(models, compiled):
    manifest = json.loads((compiled / "manifest.json").read_text())
    assert manifest["format_version"] == runtime.MANIFEST_VERSION
    src = models["savedmodel-erf"]
    assert manifest["source"]["format"] == "savedmodel"
    assert pathlib.Path(manifest["source"]["path"]) == src.resolve()
    # sha256 over the SavedModel's files in sorted order, names included
    digest = hashlib.sha256()
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.name != "vocab.txt"):
        digest.update(str(f.relative_to(src)).encode() + b"\0")
        digest.update(f.read_bytes())
    assert manifest["source"]["sha256"] == digest.hexdigest()
    assert BertShape.from_dict(manifest["model"]) == TINY
    assert manifest["model"] == {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 256, "vocab_size": 2048,
                                 "type_vocab_size": 2, "max_positions": 512, "layer_norm_eps": 1e-12,
                                 "num_labels": 2}
    assert (manifest["dtype"], manifest["gelu"], manifest["batch_size"], manifest["seq_length"],
            manifest["target"]) == ("float32", "erf", 4, 128, "cpu")
    assert manifest["do_lower_case"] is True
    assert set(manifest["equivalence"]) >= {"pairs", "max_abs_diff", "label_agreement", "tolerance", "passed"}
    assert manifest["equivalence"]["pairs"] == 16
    assert "T" in manifest["created"]
    assert (compiled / "vocab.txt").read_bytes() == (src / "vocab.txt").read_bytes()
    assert sorted(p.name for p in compiled.iterdir()) == ["accelerated", "embeddings.npz", "manifest.json",
                                                          "reference.npz", "vocab.txt"]
    assert manifest["neuron"] is None
    assert manifest["reference"] == {"file": "reference.npz", "pairs": 8, "tolerance": 1e-5,
                                     "from": "the rebuilt graph on the CPU at float32"}


# ----------------------------------------------------------------------- the runtime

@pytest.mark.parametrize("damage", ["checkpoint data cut short", "safetensors cut short", "hidden_act a list",
                                    "weight_map a list"])
def test_damaged_source_models_are_model_format_errors(models, tmp_path, damage):
    """Each was a traceback (IndexError, SafetensorError, TypeError, AttributeError) and exit 1, which
    bertpool-compile documents as a failed equivalence proof."""
    from bertpool.compile.weights import load_weights

    if damage == "checkpoint data cut short":
        # (The copy's `checkpoint` file names the original's absolute prefix: its own files must be read.)
        src = copy_tree(models["checkpoint"], tmp_path / "src")
        data = next(src.glob("bert_model.ckpt.data-*"))
        data.write_bytes(data.read_bytes()[:1000])
    else:
        src = copy_tree(models["hf"], tmp_path / "src")
        if damage == "safetensors cut short":
            weights = src / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "hidden_act a list":
            edit_hf_config(src, hidden_act=["gelu"])
        else:
            (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(ModelFormatError):
        load_weights(src)


def test_heads_that_contradict_a_savedmodels_graph_are_refused(models, tmp_path):
    """--heads (or a bert_config.json beside the SavedModel) overrode the graph's head count: another
    model, compiled without a word (caught only by the proof, or not at all with --no-verify)."""
    import shutil

    from bertpool.compile.weights import load_weights

    source = models["savedmodel-erf"]
    assert load_weights(source).shape.heads == 4  # from the graph
    for heads in (8, 0):
        with pytest.raises(ModelFormatError, match="attention heads"):
            load_weights(source, heads=heads)
    beside = shutil.copytree(source, tmp_path / "sm")
    (beside / "bert_config.json").write_text(json.dumps({"num_attention_heads": 2}))
    with pytest.raises(ModelFormatError, match="contradicts the graph"):
        load_weights(beside)
    (beside / "bert_config.json").write_text(json.dumps({"num_attention_heads": 4, "layer_norm_eps": "tiny"}))
    with pytest.raises(ModelFormatError, match="layer_norm_eps must be a small number"):
        load_weights(beside)
    # The epsilon likewise (it overrode the graph's unchecked: another model, proved only at float32).
    graph_eps = load_weights(source).shape.layer_norm_eps
    (beside / "bert_config.json").write_text(json.dumps({"num_attention_heads": 4, "layer_norm_eps": 1e-5}))
    with pytest.raises(ModelFormatError, match=r"layer_norm_eps 1e-05 contradicts the graph of .*epsilon is 1e-12"):
        load_weights(beside)
    (beside / "bert_config.json").write_text(json.dumps({"num_attention_heads": 4, "layer_norm_eps": graph_eps}))
    assert load_weights(beside).shape.layer_norm_eps == pytest.approx(graph_eps)


def test_a_compiled_model_with_a_damaged_vocabulary_does_not_load(compiled, tmp_path):
    """A vocab.txt cut short (a partial copy) tokenized to other ids: every answer silently wrong."""
    import shutil

    damaged = shutil.copytree(compiled, tmp_path / "damaged")
    lines = (damaged / "vocab.txt").read_text().splitlines(keepends=True)
    (damaged / "vocab.txt").write_text("".join(lines[: len(lines) // 2]))
    with pytest.raises(ModelFormatError, match="the model directory is damaged"):
        runtime.load_compiled(damaged)


# A manifest number that is valid but not what was compiled: the load names the signatures there are.
SIGNATURE_MISMATCH = (r"seq_length .* seq_buckets .* do not match the model's compiled signatures: "
                      r"serving_s32 \(batch 4 x seq 32\), .*serving_default \(batch 4 x seq 128\)")


@pytest.mark.parametrize("damage, changes, message", [
    ("embeddings.npz cut short", None, None),
    ("reference.npz cut short", None, None),
    ("seq_length text", {"seq_length": "128"}, "seq_length must be a whole number"),
    ("batch_size 0", {"batch_size": 0}, "batch_size must be a whole number >= 1"),
    ("model null", {"model": None}, "model must be an object"),
    ("passed as text", {"equivalence": {"passed": "false"}}, "equivalence must be null or an object"),
    ("format_version true", {"format_version": True}, "format_version True is not supported"),
    ("seq_length 64", {"seq_length": 64}, SIGNATURE_MISMATCH),
    ("seq_length 256", {"seq_length": 256}, SIGNATURE_MISMATCH),
    ("bucket -1", {"seq_buckets": [-1, 32, 64, 96, 128]}, SIGNATURE_MISMATCH),
    ("batch_size 8", {"batch_size": 8}, SIGNATURE_MISMATCH),
    ("seq_buckets a number", {"seq_buckets": 128}, "seq_buckets must be a list of whole numbers"),
    # Hand-edited or damaged values that loaded: a tolerance as text was a traceback (ValueError), the
    # others were taken as they came (a float64 label, "no" read as true, a reference file elsewhere).
    ("dtype float64", {"dtype": "float64"}, "dtype must be one of float32, float16, bfloat16, got 'float64'"),
    ("gelu relu", {"gelu": "relu"}, "gelu must be one of erf, tanh, crude"),
    ("do_lower_case text", {"do_lower_case": "no"}, "do_lower_case must be true, false or null, got 'no'"),
    ("tolerance text", {"reference": {"file": "reference.npz", "pairs": 8, "tolerance": "abc"}},
     "reference.tolerance must be a finite number > 0, got 'abc'"),
    ("tolerance inf", {"reference": {"file": "reference.npz", "pairs": 8, "tolerance": float("inf")}},
     "reference.tolerance must be a finite number > 0"),
    ("reference elsewhere", {"reference": {"file": "/etc/passwd", "pairs": 8, "tolerance": 0.01}},
     "reference.file must be a file name in the model directory, got '/etc/passwd'"),
    ("model without keys", {"model": {}}, "model shape: lacks heads, hidden, intermediate"),  # was a TypeError's text
    ("neuron with buckets", {"target": "neuron", "neuron": {"family": "inf1"}},
     "a neuron model runs at its seq_length 128 alone"),
])
def test_a_damaged_compiled_model_is_a_model_format_error(compiled, tmp_path, damage, changes, message):
    """Each was a traceback in the worker (BadZipFile, TypeError, ...), for "passed": "false" a failed
    model that loaded, and for a seq_length/seq_buckets/batch_size other than compiled an unclear
    "cannot load DIR/accelerated: 'serving_s128'" (a KeyError) or a BackendUnavailable."""
    import shutil

    damaged = shutil.copytree(compiled, tmp_path / "damaged")
    manifest = json.loads((damaged / "manifest.json").read_text())
    if changes is None:
        path = damaged / damage.split()[0]
        path.write_bytes(path.read_bytes()[:200])
    else:
        manifest.update(changes)
        (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match=message):
        runtime.load_compiled(damaged)


def test_target_gpu_without_a_gpu_is_refused(models, tmp_path, monkeypatch):
    """Built and proven on the CPU, a model would say gpu in its manifest and be something else."""
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    with pytest.raises(BackendUnavailable, match="TensorFlow sees no GPU"):
        quiet_compile(models["hf"], tmp_path / "out", target="gpu", verify=False)
    assert not (tmp_path / "out").exists()


def test_runtime_predict_matches_original(models, compiled):
    assert runtime.is_compiled_model(compiled) and not runtime.is_compiled_model(models["savedmodel-erf"])
    model = runtime.load_compiled(compiled)
    assert (model.batch_size, model.seq_length, model.target) == (4, 128, "cpu")
    assert model.vocab_path == compiled / "vocab.txt" and model.manifest["gelu"] == "erf"
    f = features_for(model.vocab_path, n=4)
    probs = model.predict(f.input_ids, f.input_mask, f.segment_ids)
    assert probs.shape == (4, 2) and probs.dtype == np.float32
    weights = load_weights(models["savedmodel-erf"])
    original = SavedModelOriginal(models["savedmodel-erf"], weights)
    expected = original.predict(f.input_ids, f.input_mask, f.segment_ids)
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    # any number of rows: chunked by 4, the short last chunk padded and dropped
    f7 = features_for(model.vocab_path, n=7, seed=11)
    np.testing.assert_allclose(model.predict(f7.input_ids, f7.input_mask, f7.segment_ids),
                               original.predict(f7.input_ids, f7.input_mask, f7.segment_ids), atol=1e-5, rtol=0)
    original.close()
    with pytest.raises(ValueError, match=r"must have shape \[N, 128\]"):
        model.predict(f.input_ids[:, :64], f.input_mask[:, :64], f.segment_ids[:, :64])


def test_an_unexpected_error_exits_3_not_1(models, tmp_path, monkeypatch, capsys):
    """Exit 1 means "the equivalence proof failed": a crash (a bug) must not read as one."""
    from bertpool.compile import cli

    def crash(options):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "compile_model", crash)
    code = cli.main(["--input_saved_model", str(models["hf"]), "--output_saved_model", str(tmp_path / "out"),
                     "--target", "cpu", "--quiet"])
    assert code == cli.EXIT_INTERNAL == 3
    assert "unexpected error" in capsys.readouterr().err


def test_runtime_rejects_bad_directories(compiled, tmp_path):
    with pytest.raises(ModelFormatError, match="no manifest.json"):
        runtime.load_compiled(tmp_path)
    broken = copy_tree(compiled, tmp_path / "broken")
    (broken / "embeddings.npz").unlink()
    with pytest.raises(ModelFormatError, match="no embeddings.npz"):
        runtime.load_compiled(broken)
    bad = copy_tree(compiled, tmp_path / "bad")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="cannot read"):
        runtime.load_compiled(bad)
    (bad / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ModelFormatError, match="lacks"):
        runtime.load_compiled(bad)


def test_runtime_neuron_target_without_tensorflow_neuron(compiled, tmp_path):
    fake = copy_tree(compiled, tmp_path / "neuron")
    manifest = json.loads((fake / "manifest.json").read_text())
    manifest["target"], manifest["neuron"] = "neuron", {"family": "inf1"}
    manifest["seq_buckets"] = [manifest["seq_length"]]  # a neuron build's one fixed length
    (fake / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable, match="the inf1 toolchain needs tensorflow-neuron "):
        runtime.load_compiled(fake)


def test_runtime_refuses_a_binary_that_disagrees_with_its_reference_pairs(compiled, tmp_path):
    from bertpool.common.errors import BinaryMismatchError

    bad = copy_tree(compiled, tmp_path / "bad")
    with np.load(bad / "reference.npz") as data:
        arrays = dict(data)
    arrays["probabilities"] = arrays["probabilities"][:, ::-1].copy()  # as if the binary computed 1 - p
    np.savez(bad / "reference.npz", **arrays)
    with pytest.raises(BinaryMismatchError, match="disagrees with its 8 reference pairs"):
        runtime.load_compiled(bad)


def test_runtime_import_does_not_import_tensorflow():
    code = ("import sys, bertpool.compile.runtime as r; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; print(r.is_compiled_model('/'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_quiet_tensorflow_sets_the_cpp_level_once_and_keeps_a_chosen_one(monkeypatch):
    """The one home of TensorFlow's log settings (five commands each set them by hand): level 2 where
    none is set, a level the user chose kept; a child's environment gets only the variable."""
    import logging

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "")  # so that teardown restores it, whatever it was
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.NOTSET)
    try:
        child: dict[str, str] = {}
        runtime.quiet_tensorflow(child)
        assert child == {"TF_CPP_MIN_LOG_LEVEL": "2"} and "TF_CPP_MIN_LOG_LEVEL" not in os.environ
        assert tf_log.level == logging.NOTSET
        chosen = {"TF_CPP_MIN_LOG_LEVEL": "0"}
        runtime.quiet_tensorflow(chosen)
        assert chosen == {"TF_CPP_MIN_LOG_LEVEL": "0"}
        runtime.quiet_tensorflow()
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2" and tf_log.level == logging.ERROR
    finally:
        tf_log.setLevel(level)


# ------------------------------------------------------------------------------ CLI

def run_cli(*args, timeout=240):
    # The wrapper script runs the interpreter it is told to: this test's own.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", BERTPOOL_PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "scripts" / "compile"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_help_lists_every_flag():
    from bertpool.compile.cli import build_parser

    text = build_parser().format_help()
    for flag in ("--input_saved_model", "--output_saved_model", "--crude_gelu", "--gelu", "--target", "--dtype",
                 "--batch-size", "--seq-length", "--vocab", "--tsv", "--pairs", "--tolerance", "--compiler-args",
                 "--neuron-target", "--min-on-neuron", "--no-verify", "--force", "--xla"):
        assert flag in text, flag


def test_cli_compiles_with_demo_flags(models, tmp_path):
    result = run_cli("--input_saved_model", models["savedmodel-erf"], "--output_saved_model", tmp_path / "out",
                     "--crude_gelu", "--target", "cpu", "--pairs", "8")
    assert result.returncode == 0, result.stderr
    assert "equivalence PASSED" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["gelu"] == "crude"
    # an existing output needs --force
    again = run_cli("--input_saved_model", models["savedmodel-erf"], "--output_saved_model", tmp_path / "out",
                    "--target", "cpu", "--no-verify")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("bertpool-compile: error: ")
    assert "--force" in again.stderr and "Traceback" not in again.stderr


def test_cli_default_target_is_announced(models, tmp_path):
    if default_target()[0] == "neuron":
        pytest.skip("a Neuron toolchain is installed here")
    result = run_cli("--input_saved_model", models["hf"], "--output_saved_model", tmp_path / "out", "--no-verify")
    assert result.returncode == 0, result.stderr
    assert "target: cpu" in result.stderr


@pytest.mark.parametrize("case", ["not-a-model", "missing-tensor", "neuron-unavailable", "equivalence",
                                  "tsv-too-short"])
def test_cli_errors_are_one_line(models, tmp_path, case):
    src, extra, code = models["hf"], ["--target", "cpu", "--pairs", "4"], 2
    if case == "not-a-model":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "missing-tensor":
        tensors = tiny_weights()
        del tensors["output_bias"]
        src = make_hf(tmp_path / "hf", tensors)
    elif case == "neuron-unavailable":
        if default_target()[0] == "neuron":
            pytest.skip("a Neuron toolchain is installed here")
        extra = ["--target", "neuron"]
    elif case == "tsv-too-short":  # proved on 64 pairs, it said nothing (and no --seed: not refused)
        extra = ["--target", "cpu", "--pairs", "100", "--tsv", SAMPLE_TSV]
    else:
        extra += ["--gelu", "crude", "--tolerance", "1e-9"]
        code = 1
    result = run_cli("--input_saved_model", src, "--output_saved_model", tmp_path / "out", *extra)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bertpool-compile: error: "), result.stderr
    expected = {"not-a-model": "is not a SavedModel", "missing-tensor": "missing tensor classifier.bias",
                "neuron-unavailable": "tensorflow-neuron", "equivalence": "differs from the original",
                "tsv-too-short": "holds only 64 pairs, fewer than --pairs 100"}[case]
    assert expected in last


def test_sigterm_cleans_up_as_ctrl_c_does(models, tmp_path):
    """Killed by SIGTERM (timeout, kill, systemd), bertpool-compile left its hidden .OUT.partial-PID
    staging directory beside the output; Ctrl-C's cleanup now runs for SIGTERM too, and it exits 143."""
    import signal
    import time

    from bertpool.common.cli import EXIT_TERMINATED

    work, log = tmp_path / "work", tmp_path / "stderr.txt"
    args = ["--input_saved_model", models["hf"], "--output_saved_model", work / "out", "--target", "cpu",
            "--pairs", "1000", "--quiet"]  # 1000 pairs: the staging directory lives for seconds
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "bertpool.compile.cli", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        staging, deadline = work / f".out.partial-{proc.pid}", time.monotonic() + 180
        while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert staging.exists(), log.read_text()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == EXIT_TERMINATED == 143, log.read_text()
    assert log.read_text().strip().splitlines()[-1] == "bertpool-compile: terminated"
    assert list(work.iterdir()) == []  # neither the output nor the staging directory


def test_config_errors_before_any_work(models, tmp_path):
    with pytest.raises(ConfigError, match="exceeds the model's 512 position embeddings"):
        quiet_compile(models["hf"], tmp_path / "out", target="cpu", seq_length=600, verify=False)
    with pytest.raises(ConfigError, match="needs --seq-length 128"):
        quiet_compile(models["savedmodel-erf"], tmp_path / "out", target="cpu", seq_length=64)
    # --force replaces the output: never the input, a directory inside it, or one holding it.
    for output in (models["hf"], pathlib.Path(models["hf"]) / "variables", pathlib.Path(models["hf"]).parent):
        with pytest.raises(ConfigError, match="must lie outside --input_saved_model"):
            quiet_compile(models["hf"], output, target="cpu", force=True)
    assert any(pathlib.Path(models["hf"]).iterdir())
    # Nor the directory of a checkpoint given by its prefix (no such path exists: it was deleted).
    prefix = pathlib.Path(models["checkpoint"]) / "bert_model.ckpt"
    with pytest.raises(ConfigError, match="must lie outside --input_saved_model"):
        quiet_compile(prefix, models["checkpoint"], target="cpu", force=True)
    assert (pathlib.Path(models["checkpoint"]) / "bert_model.ckpt.index").is_file()
    with pytest.raises(ConfigError, match="must be a finite number > 0"):  # a proof that could not fail
        quiet_compile(models["hf"], tmp_path / "out", target="cpu", tolerance=float("inf"))


def test_the_current_directory_is_never_an_output_to_replace(models, tmp_path, monkeypatch):
    """--output_saved_model . with --force emptied the current directory (the user's files with it)."""
    (tmp_path / "thesis.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    for output in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(ConfigError, match="is the current directory or holds it"):
            quiet_compile(models["hf"], output, target="cpu", force=True)
    assert (tmp_path / "thesis.txt").read_text() == "keep me"


def test_other_batch_and_sequence_length(models, tmp_path):
    manifest = quiet_compile(models["hf"], tmp_path / "out", target="cpu", batch_size=2, seq_length=64, pairs=6)
    assert manifest["equivalence"]["passed"]
    model = runtime.load_compiled(tmp_path / "out")
    assert (model.batch_size, model.seq_length) == (2, 64)


def test_sequence_buckets_answer_as_the_full_length_does(models, tmp_path):
    """cpu: each batch runs at the shortest compiled length its longest pair fits; answers are unchanged."""
    src = models["savedmodel-erf"]
    bucketed = quiet_compile(src, tmp_path / "b", target="cpu")
    assert bucketed["seq_buckets"] == [32, 64, 96, 128] and bucketed["equivalence"]["passed"]
    single = quiet_compile(src, tmp_path / "s", target="cpu", seq_buckets=())
    assert single["seq_buckets"] == [128]
    a, b = runtime.load_compiled(tmp_path / "b"), runtime.load_compiled(tmp_path / "s")
    pairs = [(p.text_a, p.text_b) for p in generate_pairs(22, seed=9)] + [("Hello there.", "Hi."), ("Yes", "No")]
    f = BertTokenizer(src / "vocab.txt").encode_pairs(pairs)
    lengths = f.input_mask.sum(axis=1)
    assert lengths.min() < 32 and lengths.max() == 128  # short pairs and a truncated long one
    np.testing.assert_allclose(a.predict(f.input_ids, f.input_mask, f.segment_ids),
                               b.predict(f.input_ids, f.input_mask, f.segment_ids), atol=1e-6)


@pytest.mark.parametrize("real, bucket", [(0, 32), (1, 32), (32, 32), (33, 64), (97, 128), (128, 128)])
def test_bucket_is_the_shortest_that_holds_every_real_token(models, tmp_path, real, bucket):
    if not (tmp_path / "b").exists():
        quiet_compile(models["savedmodel-erf"], tmp_path / "b", target="cpu", verify=False)
    model = runtime.load_compiled(tmp_path / "b", warm_up=False)
    mask = np.zeros([2, 128], np.int32)
    mask[1, :real] = 1
    assert model.bucket_for(mask) == bucket


@pytest.mark.parametrize("options, message", [
    ({"target": "cpu", "seq_buckets": (64, 128)}, "between 3 and --seq-length 128"),
    ({"target": "cpu", "seq_buckets": (2,)}, "between 3"),
    ({"batch_size": 0}, "--batch-size must be between 1 and 1024, got 0"),
    ({"batch_size": 1_000_000_000}, "--batch-size must be between 1 and 1024"),  # a MemoryError after the rebuild
    ({"pairs": 1_000_000_000}, "--pairs must be between 1 and 100000"),  # ran until killed
    ({"pairs": 100, "tsv": SAMPLE_TSV}, "--tsv .* holds only 64 pairs, fewer than --pairs 100"),  # proved 64
    ({"seed": -1}, "--seed must be an integer >= 0, got -1"),  # as bertpool-demo-model and -finetune say
    ({"seed": 3, "tsv": SAMPLE_TSV}, "--seed seeds generated pairs; with --tsv"),  # silently ignored
    ({"seed": 0, "tsv": SAMPLE_TSV}, "--seed seeds generated pairs; with --tsv"),  # explicit, even the default
])
def test_bad_options_are_config_errors_before_any_work(models, tmp_path, monkeypatch, options, message):
    from bertpool.compile import build

    def work(*args, **kwargs):
        raise AssertionError("the model was read before the options were checked")

    monkeypatch.setattr(build, "load_weights", work)
    with pytest.raises(ConfigError, match=message):
        quiet_compile(models["savedmodel-erf"], tmp_path / "x", **options)
    assert not any(tmp_path.iterdir())  # no output, no staging directory


@pytest.mark.parametrize("case, message", [
    ("--vocab a directory", "--vocab {tmp}/adir is a directory, not a file"),  # said "no such file"
    ("--tsv a directory", "--tsv {tmp}/adir is a directory, not a file"),
    ("--vocab missing", "--vocab {tmp}/missing.txt: no such file"),
    ("--tsv with an empty text", "{tmp}/empty.tsv:2: #1 String: empty text"),  # the proof ran on it
    ("output under a file", "cannot write --output_saved_model {tmp}/file/out: {tmp}/file is a file, not a directory"),
    ("output in /proc", "cannot write --output_saved_model /proc/bertpool-out: cannot create a directory in /proc"),
])
def test_bad_paths_are_one_line_errors_before_any_work(tmp_path, monkeypatch, capsys, case, message):
    """--output_saved_model /proc/x was an "unexpected error (a bug)", exit 3, after all the work; a
    directory given as --vocab was "no such file". Exit 2, one line, before the model is read."""
    from bertpool.compile import build
    from bertpool.compile.cli import main

    def work(*args, **kwargs):
        raise AssertionError("the model was read before the paths were checked")

    if case == "output in /proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    monkeypatch.setattr(build, "load_weights", work)
    (tmp_path / "adir").mkdir()
    (tmp_path / "file").write_text("keep me")
    if case == "--tsv with an empty text":
        tsv = tmp_path / "adir" / "empty.tsv"
        tsv.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\ta\tb\t\tsome text\n")
        message = message.replace("{tmp}", "{tmp}/adir")
    flags = {"--vocab a directory": ["--vocab", tmp_path / "adir"], "--tsv a directory": ["--tsv", tmp_path / "adir"],
             "--vocab missing": ["--vocab", tmp_path / "missing.txt"],
             "--tsv with an empty text": ["--tsv", tmp_path / "adir" / "empty.tsv", "--pairs", "1"]}.get(case, [])
    output = {"output under a file": tmp_path / "file" / "out",
              "output in /proc": pathlib.Path("/proc/bertpool-out")}.get(case, tmp_path / "out")
    argv = ["--input_saved_model", tmp_path / "in", "--output_saved_model", output, "--target", "cpu", *flags]
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert err.startswith("bertpool-compile: error: " + message.format(tmp=tmp_path)) and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file"]  # nothing written, no probe left


def test_a_vocabulary_with_a_repeated_token_is_warned_about(tmp_path, caplog):
    """tiny's vocabulary with its last line overwritten by a second "the" compiled without a word, "the"
    then being id 2047, not 208 (google's load_vocab: the last one wins). The size check cannot see such
    damage; a warning names the repeat and its ids. A clean vocabulary warns of nothing."""
    import logging

    from bertpool.common.vocab import write_vocab
    from bertpool.compile.vocab import check_vocab, generate_vocab

    tokens = generate_vocab(TINY.vocab_size)
    clean = write_vocab(tmp_path / "clean.txt", tokens)
    damaged = write_vocab(tmp_path / "damaged.txt", tokens[:-1] + ["the"])
    with caplog.at_level(logging.WARNING):
        assert check_vocab(clean, TINY.vocab_size) == tokens
        assert caplog.records == []
        assert check_vocab(damaged, TINY.vocab_size)[-1] == "the"
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"vocabulary {damaged} repeats 1 token ('the' at ids {tokens.index('the')}, 2047)" in record.getMessage()


def test_compile_options_are_frozen_and_validated_into_a_copy(tmp_path):
    import dataclasses

    from bertpool.compile.build import CompileOptions

    options = CompileOptions(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    checked = options.validated()
    assert checked is not options and options.input == str(tmp_path / "in")  # the caller's object is untouched
    assert checked.input == tmp_path / "in" and isinstance(checked.output, pathlib.Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.target = "neuron"
    for bad, message in (({"gelu": "relu"}, "unknown gelu"), ({"source_gelu": "x"}, "unknown source gelu"),
                         ({"xla": "maybe"}, "unknown xla")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(options, **bad).validated()


@pytest.mark.parametrize("build", ["reference", "rebuild", "finetune", "demo"])
def test_an_unknown_gelu_is_the_same_config_error_everywhere(build):
    import tensorflow as tf

    from bertpool.compile import reference
    from bertpool.compile.demo_model import build_demo_model
    from bertpool.compile.finetune import TrainableBert
    from bertpool.compile.rebuild import RebuildConfig

    make = {"reference": lambda: reference.gelu(tf.constant([1.0]), "relu"),
            "rebuild": lambda: RebuildConfig(gelu="relu"),
            "finetune": lambda: TrainableBert(TINY, {}, "relu", 0.1),
            "demo": lambda: build_demo_model("/nonexistent/never-written", gelu="relu")}[build]
    with pytest.raises(ConfigError, match="unknown GELU 'relu'; expected one of erf, tanh, crude"):
        make()
