"""Weight extraction checked against the source's own semantics, not against bertpool.

The equivalence proof of a checkpoint or Hugging Face input compares the rebuilt model with the
reference graph (compile/reference.py) fed the *same* extracted tensors, so a mistake in reading
them (a square kernel not transposed, query and key swapped, LayerNorm gamma and beta swapped,
token type rows in the wrong order) reaches both sides and passes. Here a plain numpy forward pass
reads each source file by the source's own tensor names, with the source framework's semantics:

* Hugging Face ``BertForSequenceClassification`` (transformers' modeling_bert): ``nn.Linear``
  weights are [out, in], y = x @ W.T + b; embeddings word + position + token type, then LayerNorm;
  heads are consecutive slices of the hidden size; activation per ``config.hidden_act``; pooler
  tanh on [CLS]; ``classifier``; softmax.
* google-research checkpoint (modeling.py + run_classifier.create_model): dense kernels are
  [in, out], y = x @ kernel + bias; LayerNorm epsilon 1e-12 (tf.contrib's, whatever the config);
  ``hidden_act: gelu`` is the tanh approximation; logits = pooled @ output_weights^T + output_bias.

Its probabilities must match, within the float32 bound, both bertpool's compiled model and the
proof's original. Weights are random, non-symmetric and spread (gamma far from beta, token type
rows far apart, a classifier with logits of a few units), and the last tests show each of those
extraction mistakes, made on purpose in the readers, is caught by a wide margin.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("safetensors")

from compile_fixtures import TINY, make_checkpoint, make_hf, quiet_compile  # noqa: E402

from bertpool.common.data import generate_pairs  # noqa: E402
from bertpool.common.tokenizer import BertTokenizer  # noqa: E402
from bertpool.compile import runtime  # noqa: E402
from bertpool.compile.demo_model import random_weights  # noqa: E402
from bertpool.compile.equivalence import TOLERANCES, open_original  # noqa: E402
from bertpool.compile.weights import checkpoint as ckpt_reader  # noqa: E402
from bertpool.compile.weights import hf as hf_reader  # noqa: E402
from bertpool.compile.weights import load_weights  # noqa: E402

pytestmark = pytest.mark.slow  # builds tiny BERTs with TensorFlow

TOLERANCE = TOLERANCES["float32"]  # 1e-5: the float32 rebuild's bound
CAUGHT = 100 * TOLERANCE  # a planted extraction mistake must move some probability by this much
SEQ = 128


# ------------------------------------------------------------------- independent forward passes

def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu_erf(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


# transformers.activations.ACT2FN, the entries a BERT config uses
HF_ACT2FN = {"gelu": _gelu_erf, "gelu_python": _gelu_erf, "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh,
             "gelu_pytorch_tanh": _gelu_tanh, "quick_gelu": _quick_gelu}
# google-research modeling.get_activation (its gelu has been the tanh approximation since 2019)
GOOGLE_ACT = {"gelu": _gelu_tanh}


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased, as torch and tf.nn.moments
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _attention(q, k, v, mask_bias, heads):
    """Multi-head attention on [B,S,H] projections; heads are consecutive slices of H."""
    B, S, H = q.shape
    split = lambda t: t.reshape(B, S, heads, H // heads).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    probs = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(H // heads) + mask_bias)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(B, S, H)


def read_hf_files(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of every .safetensors file in ``directory`` by its own name, as float64, with
    legacy LayerNorm.gamma/.beta renamed to .weight/.bias as transformers does on load."""
    from safetensors.numpy import load_file

    raw = {}
    for file in sorted(directory.glob("*.safetensors")):
        raw.update(load_file(str(file)))
    out = {}
    for key, value in raw.items():
        if value.dtype.kind != "f":
            continue  # buffers such as embeddings.position_ids
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value.astype(np.float64)
    return out


def hf_forward(directory: pathlib.Path, ids, mask, segments) -> np.ndarray:
    """transformers' BertForSequenceClassification (eval mode) on a config.json + safetensors dir."""
    config = json.loads((directory / "config.json").read_text())
    w = read_hf_files(directory)
    eps, heads = config.get("layer_norm_eps", 1e-12), config["num_attention_heads"]
    act = HF_ACT2FN[config.get("hidden_act", "gelu")]
    linear = lambda x, name: x @ w[name + ".weight"].T + w[name + ".bias"]  # noqa: E731  nn.Linear
    norm = lambda x, name: _layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps)  # noqa: E731
    S = ids.shape[1]
    e = "bert.embeddings."
    x = (w[e + "word_embeddings.weight"][ids] + w[e + "token_type_embeddings.weight"][segments]
         + w[e + "position_embeddings.weight"][np.arange(S)][None])
    x = norm(x, e + "LayerNorm")
    bias = (1.0 - mask[:, None, None, :].astype(np.float64)) * np.finfo(np.float32).min  # get_extended_attention_mask
    for k in range(config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{k}."
        q, kk, v = (linear(x, p + "attention.self." + n) for n in ("query", "key", "value"))
        context = _attention(q, kk, v, bias, heads)
        x = norm(linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inner = act(linear(x, p + "intermediate.dense"))
        x = norm(linear(inner, p + "output.dense") + x, p + "output.LayerNorm")
    pooled = np.tanh(linear(x[:, 0], "bert.pooler.dense"))
    return _softmax(linear(pooled, "classifier"))


def google_forward(prefix: str, ids, mask, segments, scope: str = "") -> np.ndarray:
    """google-research modeling.BertModel + run_classifier.create_model on a TF checkpoint."""
    import tensorflow as tf

    directory = pathlib.Path(prefix).parent
    config = json.loads((directory / "bert_config.json").read_text())
    reader = tf.train.load_checkpoint(prefix)
    get = lambda name: reader.get_tensor(scope + name).astype(np.float64)  # noqa: E731
    act = GOOGLE_ACT[config["hidden_act"]]
    dense = lambda x, name: x @ get(name + "/kernel") + get(name + "/bias")  # noqa: E731  kernel [in,out]
    norm = lambda x, name: _layer_norm(x, get(name + "/gamma"), get(name + "/beta"), 1e-12)  # noqa: E731
    S, T = ids.shape[1], config["type_vocab_size"]
    one_hot = np.eye(T)[segments]  # embedding_postprocessor: one-hot token types @ table
    x = (get("bert/embeddings/word_embeddings")[ids] + one_hot @ get("bert/embeddings/token_type_embeddings")
         + get("bert/embeddings/position_embeddings")[:S][None])
    x = norm(x, "bert/embeddings/LayerNorm")
    bias = (1.0 - mask[:, None, None, :].astype(np.float64)) * -10000.0
    for k in range(config["num_hidden_layers"]):
        p = f"bert/encoder/layer_{k}/"
        q, kk, v = (dense(x, p + "attention/self/" + n) for n in ("query", "key", "value"))
        context = _attention(q, kk, v, bias, config["num_attention_heads"])
        x = norm(dense(context, p + "attention/output/dense") + x, p + "attention/output/LayerNorm")
        inner = act(dense(x, p + "intermediate/dense"))
        x = norm(dense(inner, p + "output/dense") + x, p + "output/LayerNorm")
    pooled = np.tanh(dense(x[:, 0], "bert/pooler/dense"))
    logits = pooled @ get("output_weights").T + get("output_bias")
    return _softmax(logits)


# ------------------------------------------------------------------------------ models and inputs

def spread_weights(seed: int = 7) -> dict[str, np.ndarray]:
    """Random TINY weights (google-research names) in which every extraction mistake shows: generic
    (non-symmetric) kernels, gamma far from beta, token type rows as large as word rows, and a
    classifier whose logits spread over a few units (not ~0.5/0.5 everywhere)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dims in TINY.expected_shapes().items():
        if name.endswith("/gamma"):
            value = 1.0 + 0.3 * rng.standard_normal(dims)
        elif name.endswith("/beta"):
            value = 0.3 * rng.standard_normal(dims)
        elif name.endswith("bias"):
            value = 0.1 * rng.standard_normal(dims)
        elif name.endswith("/kernel"):
            gain = 1.5 if "/self/query/" in name or "/self/key/" in name else 1.0
            value = gain * rng.standard_normal(dims) / math.sqrt(dims[0])
        elif name == "output_weights":
            value = 3.0 * rng.standard_normal(dims) / math.sqrt(dims[1])
        else:  # embedding tables
            value = 0.5 * rng.standard_normal(dims)
        out[name] = value.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("independent")
    tensors = spread_weights()
    return {"hf": make_hf(root / "hf", tensors, gelu="erf"),
            "checkpoint": make_checkpoint(root / "ckpt", tensors, gelu="tanh")}


@pytest.fixture(scope="module")
def features(sources):
    """Tokenized sentence pairs (both segments, some truncated at SEQ) and two rows of random ids."""
    f = BertTokenizer(sources["hf"] / "vocab.txt").encode_pairs(
        [(p.text_a, p.text_b) for p in generate_pairs(14, seed=5)])
    rng = np.random.default_rng(1)
    ids, mask, segments = (np.asarray(a, np.int32) for a in (f.input_ids, f.input_mask, f.segment_ids))
    extra_ids = rng.integers(0, TINY.vocab_size, [2, SEQ]).astype(np.int32)
    extra_mask = np.zeros([2, SEQ], np.int32)
    extra_mask[0, :SEQ], extra_mask[1, :40] = 1, 1
    extra_segments = (np.arange(SEQ)[None] >= np.array([[70], [17]])).astype(np.int32) * extra_mask
    return (np.concatenate([ids, extra_ids]), np.concatenate([mask, extra_mask]),
            np.concatenate([segments, extra_segments]))


def _original_probs(path, features) -> np.ndarray:
    """The proof's original model on ``features``, from bertpool's reading of ``path``."""
    weights = load_weights(path)
    original = open_original(weights, SEQ)
    try:
        return original.predict(*features)
    finally:
        original.close()


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _independent(fmt: str, path: pathlib.Path, features) -> np.ndarray:
    if fmt == "hf":
        return hf_forward(path, *features)
    return google_forward(str(path / "bert_model.ckpt"), *features)


# ------------------------------------------------------------------------------------- the checks

def test_inputs_discriminate(sources, features):
    """The check means something only if the model's answers vary with the input."""
    probs = hf_forward(sources["hf"], *features)
    assert probs[:, 1].max() - probs[:, 1].min() > 0.3
    assert np.isin(features[2], [0, 1]).all() and features[2].any()


@pytest.mark.parametrize("fmt", ["hf", "checkpoint"])
def test_compiled_model_matches_an_independent_forward_pass(fmt, sources, features, tmp_path):
    """bertpool's compiled model and the proof's original both answer what the source file means."""
    expected = _independent(fmt, sources[fmt], features)
    out = tmp_path / "compiled"
    manifest = quiet_compile(sources[fmt], out, target="cpu", dtype="float32", pairs=8)
    assert manifest["equivalence"]["passed"]
    model = runtime.load_compiled(out)
    assert _max_diff(model.predict(*features), expected) <= TOLERANCE
    assert _max_diff(_original_probs(sources[fmt], features), expected) <= TOLERANCE


@pytest.mark.parametrize("hidden_act", sorted(HF_ACT2FN))
def test_hf_activation_is_read_as_transformers_runs_it(hidden_act, sources, features, tmp_path):
    src = make_hf(tmp_path / "hf", spread_weights(), with_vocab=False)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, hidden_act=hidden_act)))
    assert _max_diff(_original_probs(src, features), hf_forward(src, *features)) <= TOLERANCE


def _hf_rewrite(src: pathlib.Path, layout: str) -> None:
    """Re-store src's model.safetensors as real exports have it (same values, other layout)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    if layout == "legacy_gamma_beta":
        tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                   for k, v in tensors.items()}
    elif layout == "float16":
        tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
    elif layout == "position_ids_buffer":
        tensors["bert.embeddings.position_ids"] = np.arange(TINY.max_positions, dtype=np.int64)[None]
    if layout != "sharded":
        save_file(tensors, str(src / "model.safetensors"))
        return
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(src / file))
    (src / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("layout", ["legacy_gamma_beta", "float16", "position_ids_buffer", "sharded"])
def test_hf_layouts_are_read_as_transformers_loads_them(layout, features, tmp_path):
    src = make_hf(tmp_path / "hf", spread_weights(), with_vocab=False)
    _hf_rewrite(src, layout)
    assert _max_diff(_original_probs(src, features), hf_forward(src, *features)) <= TOLERANCE


def test_checkpoint_under_a_scope_with_optimizer_slots(features, tmp_path):
    """A checkpoint saved inside tf.variable_scope("model"), with Adam slots holding other values."""
    tensors = spread_weights()
    rng = np.random.default_rng(3)
    saved = {"model/" + k: v for k, v in tensors.items()}
    saved.update({f"model/{k}/adam_{m}": rng.standard_normal(v.shape).astype(np.float32)
                  for k, v in tensors.items() if k.endswith("kernel") for m in "mv"})
    src = make_checkpoint(tmp_path / "ckpt", saved, with_vocab=False)
    expected = google_forward(str(src / "bert_model.ckpt"), *features, scope="model/")
    assert _max_diff(_original_probs(src, features), expected) <= TOLERANCE


def test_checkpoint_written_at_another_epsilon_reads_back_as_trained(features, tmp_path):
    """bertpool-finetune from a Hugging Face base with layer_norm_eps 1e-5 writes OUTPUT/checkpoint
    with write_checkpoint. Its bert_config.json lacked the epsilon, so the checkpoint compiled at
    google's 1e-12: ~3e-4 off in probability (demo-like embeddings, std 0.02), and the proof passed,
    its original being fed the same 1e-12. The same model as a Hugging Face directory is the truth."""
    shape = dataclasses.replace(TINY, layer_norm_eps=1e-5)
    tensors = random_weights(shape, seed=2)
    hf = make_hf(tmp_path / "hf", tensors, gelu="tanh", with_vocab=False, shape=shape)
    ckpt = make_checkpoint(tmp_path / "ckpt", tensors, gelu="tanh", with_vocab=False, shape=shape)
    assert load_weights(ckpt).shape.layer_norm_eps == 1e-5
    assert _max_diff(_original_probs(ckpt, features), hf_forward(hf, *features)) <= TOLERANCE


# ------------------------------------------------- planted extraction mistakes are caught by the check

SQUARE = ("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense")


def _swap_qk(name: str) -> str:
    return (name.replace("/self/query/", "/self/@/").replace("/self/key/", "/self/query/")
            .replace("/self/@/", "/self/key/"))


def _swap_gamma_beta(name: str) -> str:
    if not name.startswith("bert/embeddings/LayerNorm/"):
        return name
    return name.replace("/gamma", "/@").replace("/beta", "/gamma").replace("/@", "/beta")


def _plant_hf(monkeypatch, mistake: str) -> None:
    real_name, real_read = hf_reader.hf_name, hf_reader._read_safetensors
    if mistake == "square_kernel_not_transposed":
        monkeypatch.setattr(hf_reader, "hf_name", lambda n: (real_name(n)[0], real_name(n)[1] and not any(
            n.endswith(s + "/kernel") for s in SQUARE)))
    elif mistake == "query_key_swapped":
        monkeypatch.setattr(hf_reader, "hf_name", lambda n: real_name(_swap_qk(n)))
    elif mistake == "gamma_beta_swapped":
        monkeypatch.setattr(hf_reader, "hf_name", lambda n: real_name(_swap_gamma_beta(n)))
    else:  # token_type_rows_swapped
        def read(file):
            raw = real_read(file)
            key = "bert.embeddings.token_type_embeddings.weight"
            return {**raw, key: raw[key][::-1]}
        monkeypatch.setattr(hf_reader, "_read_safetensors", read)


def _plant_checkpoint(monkeypatch, mistake: str) -> None:
    real = ckpt_reader._checkpoint_tensors

    def read(prefix):
        t = real(prefix)
        if mistake == "square_kernel_not_transposed":
            return {k: (v.T if any(k.endswith(s + "/kernel") for s in SQUARE) else v) for k, v in t.items()}
        if mistake == "query_key_swapped":
            return {_swap_qk(k): v for k, v in t.items()}
        if mistake == "gamma_beta_swapped":
            return {_swap_gamma_beta(k): v for k, v in t.items()}
        return {k: (v[::-1] if k.endswith("token_type_embeddings") else v) for k, v in t.items()}

    monkeypatch.setattr(ckpt_reader, "_checkpoint_tensors", read)


MISTAKES = ["square_kernel_not_transposed", "query_key_swapped", "gamma_beta_swapped", "token_type_rows_swapped"]


@pytest.mark.parametrize("mistake", MISTAKES)
@pytest.mark.parametrize("fmt", ["hf", "checkpoint"])
def test_a_planted_extraction_mistake_is_caught(fmt, mistake, sources, features, monkeypatch):
    """Each mistake passes bertpool's own checks (shapes fit) yet moves the proof's original far
    from what the file means: the independent forward pass is what catches it."""
    expected = _independent(fmt, sources[fmt], features)
    (_plant_hf if fmt == "hf" else _plant_checkpoint)(monkeypatch, mistake)
    assert _max_diff(_original_probs(sources[fmt], features), expected) > CAUGHT
