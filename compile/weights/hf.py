"""Hugging Face BERT directories: ``config.json`` + ``model.safetensors`` (or a sharded index).

Read with ``safetensors`` (no torch); names are mapped to google-research names and
``nn.Linear`` weights ([out,in]) transposed to kernels ([in,out]). Written by the demo
model and the round-trip tests.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct

import numpy as np

from ...common.errors import ModelFormatError
from ._base import (CLASSIFIER, BertWeights, Source, _activation, _find_vocab, _num_labels, _read_json,
                    _shape_from_config, bert_config)
from ..shape import BertShape

# hidden_act -> our GELU name. "gelu" in HF is the exact erf GELU.
HF_ACTIVATIONS = {"gelu": "erf", "gelu_python": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
                  "gelu_fast": "tanh", "quick_gelu": "crude"}
HF_ACT = {"erf": "gelu", "tanh": "gelu_new", "crude": "quick_gelu"}  # GELU -> hidden_act written
# transformers' BertConfig defaults for the keys that fix the shape: transformers loads a config.json
# that leaves one out with this value (and save_pretrained may leave out what equals its default), so
# that value is what the model is.
HF_BERT_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2}
CLASSIFIER_ARCHITECTURE = "BertForSequenceClassification"
# problem_type values whose logits are served as a softmax over the labels (None: the single-label default)
SOFTMAX_PROBLEMS = (None, "single_label_classification")


def hf_name(name: str) -> tuple[str, bool]:
    """google-research name -> (HF BertForSequenceClassification name, transpose?)."""
    if name == "output_weights":
        return "classifier.weight", False  # already [C,H]
    if name == "output_bias":
        return "classifier.bias", False
    hf = re.sub(r"layer_(\d+)", r"layer.\1", name).replace("/", ".")
    if hf.endswith(".kernel"):
        return hf[: -len("kernel")] + "weight", True  # nn.Linear stores [out,in]
    if hf.endswith(".gamma"):
        return hf[: -len("gamma")] + "weight", False
    if hf.endswith(".beta"):
        return hf[: -len("beta")] + "bias", False
    if hf.endswith("_embeddings"):
        return hf + ".weight", False
    return hf, False  # biases keep their name


def _hf_key(raw: dict, key: str) -> str:
    """The key under which ``raw`` holds ``key``: as is, with TF's gamma/beta names, or without "bert.".

    Older HF checkpoints kept TF's gamma/beta LayerNorm names; a bare ``BertModel``
    (e.g. a sentence-transformers encoder) has no ``bert.`` prefix.
    """
    candidates = [key]
    if key.endswith("LayerNorm.weight"):
        candidates.append(key[: -len("weight")] + "gamma")
    elif key.endswith("LayerNorm.bias"):
        candidates.append(key[: -len("bias")] + "beta")
    candidates += [c[len("bert."):] for c in candidates if c.startswith("bert.")]
    return next((c for c in candidates if c in raw), key)


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as float32 (bfloat16 widened by hand)."""
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                if f.get_slice(key).get_dtype() == "BF16":
                    tensors[key] = _read_bf16(file, key)
                else:
                    tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors' own SafetensorError too (a truncated file), not an OSError
        raise ModelFormatError(f"cannot read {file}: {type(exc).__name__}: {exc}") from None
    return {k: v.astype(np.float32, copy=False) if v.dtype.kind == "f" else v for k, v in tensors.items()}


def _read_bf16(file: pathlib.Path, key: str) -> np.ndarray:
    """numpy has no bfloat16: read the raw bytes and widen to float32 (exact)."""
    with open(file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        info = json.loads(fh.read(header_len))[key]
        start, end = info["data_offsets"]
        fh.seek(8 + header_len + start)
        raw = np.frombuffer(fh.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])




def _with_defaults(config: dict, notes: list[str]) -> dict:
    """``config`` with HF_BERT_DEFAULTS filled in for the shape keys it lacks (each named in ``notes``)."""
    missing = [key for key in HF_BERT_DEFAULTS if key not in config]
    if missing:
        notes.append("config.json lacks " + ", ".join(f"{k} (transformers' default {HF_BERT_DEFAULTS[k]} used)"
                                                      for k in missing))
    return {**{k: HF_BERT_DEFAULTS[k] for k in missing}, **config}


def _check_classifier_config(config: dict, config_path: pathlib.Path) -> None:
    """ModelFormatError unless config.json describes a single-label BertForSequenceClassification.

    The tensors alone cannot tell: a RoBERTa whose config lost its model_type has BERT's tensor names
    (but offset positions), a multi-label or regression head has the same classifier.weight (but its
    logits mean a sigmoid or a value, not a softmax), a token-classification head the same name too.
    """
    arch = config.get("architectures")
    if isinstance(arch, list) and arch and not any(
            isinstance(a, str) and a.removeprefix("TF").removeprefix("Flax") == CLASSIFIER_ARCHITECTURE for a in arch):
        raise ModelFormatError(f"{config_path}: architectures {arch} is not {CLASSIFIER_ARCHITECTURE}; "
                               f"bertpool compiles BERT sentence(-pair) classifiers")
    problem = config.get("problem_type")
    if problem not in SOFTMAX_PROBLEMS:
        raise ModelFormatError(f"{config_path}: problem_type {problem!r} is not supported; bertpool serves a "
                               f"softmax over the labels (single_label_classification)")


def _tokenizer_lower_case(path: pathlib.Path) -> bool | None:
    """do_lower_case as tokenizer_config.json states it, or None (no file, or no boolean there)."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return None
    value = _read_json(file).get("do_lower_case")
    return value if isinstance(value, bool) else None


def _read_hf(path: pathlib.Path, heads: int | None, classifier: bool = True) -> BertWeights:
    """``classifier=False``: a BertModel / BertForPreTraining directory (no head) is accepted."""
    config_path = path / "config.json"
    notes: list[str] = []
    config = _with_defaults(_read_json(config_path), notes)
    if config.get("model_type", "bert") != "bert":
        raise ModelFormatError(f"{config_path}: model_type {config.get('model_type')!r} is not 'bert'")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelFormatError(f"{config_path}: only absolute position embeddings are supported")
    if classifier:
        _check_classifier_config(config, config_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ModelFormatError(f"{index}: weight_map must map tensor names to file names")
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = [path / "model.safetensors"]
    raw: dict[str, np.ndarray] = {}
    for file in files:
        raw.update(_read_safetensors(file))
    if "classifier.weight" not in raw and classifier:
        raise ModelFormatError(f"missing tensor classifier.weight (output_weights) in {path}: "
                               f"not a BertForSequenceClassification")
    try:
        shape = _shape_from_config(config, config_path,
                                   _num_labels(raw.get("classifier.weight"), classifier, "classifier.weight", path))
    except ModelFormatError as exc:
        if not notes:
            raise
        # a default that does not fit (12 heads for a 64-wide model): say where it came from
        raise ModelFormatError(f"{exc} ({notes[0]})") from exc
    if heads is not None and heads != shape.heads:
        raise ModelFormatError(f"--heads {heads} contradicts {config_path} (num_attention_heads={shape.heads})")
    tensors = {}
    for name in shape.expected_shapes():
        if name in CLASSIFIER and "classifier.weight" not in raw:
            continue  # a pretrained encoder: fine-tuning creates the head
        key, transpose = hf_name(name)
        key = _hf_key(raw, key)
        if key not in raw:
            raise ModelFormatError(f"missing tensor {key} ({name}) in {path}")
        value = raw[key]
        if transpose:
            if value.ndim != 2:
                raise ModelFormatError(f"tensor {key} ({name}) has shape {list(value.shape)}, expected a matrix")
            value = np.ascontiguousarray(value.T)
        tensors[name] = value
    return BertWeights(shape, tensors, Source(path, "hf", [config_path] + files + ([index] if index.is_file() else [])),
                       _activation(config, HF_ACTIVATIONS, config_path), _find_vocab(path), notes=notes,
                       do_lower_case=_tokenizer_lower_case(path))


def write_hf(directory, shape: BertShape, tensors: dict[str, np.ndarray], gelu: str = "erf") -> pathlib.Path:
    """config.json + model.safetensors of a BertForSequenceClassification; returns the directory.
    A failed write is an OSError naming the file (safetensors' own writer raises its SafetensorError)."""
    from safetensors.numpy import save

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(bert_config(shape), hidden_act=HF_ACT[gelu], layer_norm_eps=shape.layer_norm_eps,
                  model_type="bert", architectures=["BertForSequenceClassification"],
                  id2label={str(i): f"LABEL_{i}" for i in range(shape.num_labels)},
                  label2id={f"LABEL_{i}": i for i in range(shape.num_labels)},
                  position_embedding_type="absolute", pad_token_id=0)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    out = {}
    for name, value in tensors.items():
        key, transpose = hf_name(name)
        value = np.asarray(value, np.float32)
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    (directory / "model.safetensors").write_bytes(save(out))
    return directory
