"""Read a fine-tuned BERT classifier from any of three formats into numpy.

Formats, detected from the directory's content (:func:`detect_format`):

* ``savedmodel``: google-research/bert ``run_classifier`` export, a TF1
  SavedModel (``saved_model.pb`` + ``variables/``). Variables are read from its
  variables checkpoint; heads, LayerNorm epsilon, GELU and sequence length are
  read from the graph (a ``bert_config.json`` beside it wins for heads/eps).
* ``checkpoint``: a google-research TF checkpoint directory (``bert_config.json``
  + ``bert_model.ckpt.*`` or any other checkpoint prefix), or the prefix itself.
* ``hf``: a Hugging Face ``BertForSequenceClassification`` directory
  (``config.json`` + ``model.safetensors`` or a sharded index), read with
  ``safetensors`` (no torch); names are mapped to google-research names and
  ``nn.Linear`` weights ([out,in]) transposed to kernels ([in,out]).

Every tensor of :meth:`BertShape.expected_shapes` must be present with exactly
its shape; otherwise :class:`ModelFormatError` names the tensor.

:func:`load_pretrained` reads a *pretrained* encoder instead (a Hugging Face
``BertModel`` / ``BertForPreTraining`` directory or a google-research
pre-training checkpoint): the same checks, but the classifier head
(``output_weights``, ``output_bias``) may be absent, since fine-tuning makes it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from ..common.errors import ModelFormatError
from .shape import EMBEDDINGS, BertShape

FORMATS = ("savedmodel", "checkpoint", "hf")
CLASSIFIER = ("output_weights", "output_bias")  # the head that fine-tuning creates
TRAINING_ONLY = re.compile(r"(^|/)(adam_[mv]|global_step|Momentum|AdamWeightDecay)")

# Hugging Face hidden_act -> our GELU name. "gelu" in HF is the exact erf GELU.
HF_ACTIVATIONS = {"gelu": "erf", "gelu_python": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
                  "gelu_fast": "tanh", "quick_gelu": "crude"}
# google-research bert_config.json hidden_act -> GELU. Its modeling.py "gelu"
# is the tanh approximation (since 2019; the first release used erf).
GOOGLE_ACTIVATIONS = {"gelu": "tanh", "gelu_erf": "erf"}


@dataclass
class Source:
    """Where the weights came from (the manifest's ``source`` section)."""

    path: pathlib.Path  # the directory (or checkpoint prefix) given by the user
    format: str  # one of FORMATS
    files: list[pathlib.Path] = field(default_factory=list)  # files hashed into sha256

    def sha256(self) -> str:
        """Hash of the source files' relative names and contents, in sorted order."""
        digest = hashlib.sha256()
        base = self.path if self.path.is_dir() else self.path.parent
        for file in sorted(self.files):
            digest.update(str(file.relative_to(base)).encode() + b"\0")
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
        return digest.hexdigest()


@dataclass
class SavedModelSignature:
    """What the run_classifier serving signature needs fed and returns (tensor names)."""

    inputs: dict[str, str]  # input key -> tensor name, e.g. "input_ids" -> "input_ids:0"
    output: str  # tensor name of "probabilities"
    seq_length: int | None  # fixed sequence length of input_ids, None if dynamic


@dataclass
class BertWeights:
    """A classifier's shape and float32 tensors under google-research names."""

    shape: BertShape  # checked against every tensor
    tensors: dict[str, np.ndarray]  # google-research name -> float32 array
    source: Source  # where it came from
    gelu: str  # the source's activation: erf, tanh or crude
    vocab_path: pathlib.Path | None  # vocab.txt found inside/beside the source, if any
    signature: SavedModelSignature | None = None  # only for the savedmodel format
    notes: list[str] = field(default_factory=list)  # assumptions made while reading


def detect_format(path) -> str:
    """Which of FORMATS the path holds; ModelFormatError when none."""
    path = pathlib.Path(path)
    if not path.exists():
        if pathlib.Path(str(path) + ".index").exists():
            return "checkpoint"  # a checkpoint prefix
        raise ModelFormatError(f"input {path} does not exist")
    if not path.is_dir():
        raise ModelFormatError(
            f"input {path} is a file; expected a SavedModel directory, a google-research checkpoint "
            f"directory (or prefix) or a Hugging Face directory"
        )
    names = {p.name for p in path.iterdir()}
    if names & {"saved_model.pb", "saved_model.pbtxt"}:
        return "savedmodel"
    if "config.json" in names and names & {"model.safetensors", "model.safetensors.index.json"}:
        return "hf"
    if "config.json" in names and names & {"pytorch_model.bin", "tf_model.h5"}:
        raise ModelFormatError(
            f"{path} is a Hugging Face directory without model.safetensors; re-save it with "
            f"save_pretrained(..., safe_serialization=True) (torch weights are not read)"
        )
    if any(n.endswith(".index") for n in names):
        return "checkpoint"
    shown = ", ".join(sorted(names)[:8]) or "nothing"
    raise ModelFormatError(
        f"{path} is not a SavedModel (no saved_model.pb), a google-research checkpoint directory "
        f"(no bert_config.json + *.index) or a Hugging Face directory (no config.json + "
        f"model.safetensors); it holds: {shown}"
    )


def load_weights(path, heads: int | None = None, source_gelu: str | None = None) -> BertWeights:
    """Read, shape-check and return the classifier at ``path`` (any of FORMATS).

    ``heads`` and ``source_gelu`` override what is read from the model (needed
    only for a SavedModel whose graph does not reveal them).
    """
    path = pathlib.Path(path)
    fmt = detect_format(path)
    reader = {"savedmodel": _read_savedmodel, "checkpoint": _read_checkpoint, "hf": _read_hf}[fmt]
    weights = reader(path, heads)
    if source_gelu is not None:
        weights.gelu = source_gelu
    check_tensors(weights.shape, weights.tensors)
    return weights


def load_pretrained(path) -> BertWeights:
    """Read and shape-check a pretrained encoder (hf or checkpoint format) for fine-tuning.

    Like :func:`load_weights`, except that the classifier head is optional:
    ``tensors`` holds it only when the source has one. ``shape.num_labels`` is
    then the source's, else 2 (a sentence-pair classifier).
    """
    path = pathlib.Path(path)
    fmt = detect_format(path)
    if fmt == "savedmodel":
        raise ModelFormatError(f"{path} is a SavedModel; fine-tuning starts from a pretrained checkpoint "
                               f"directory or a Hugging Face BERT directory")
    reader = {"checkpoint": _read_checkpoint, "hf": _read_hf}[fmt]
    weights = reader(path, None, classifier=False)
    check_tensors(weights.shape, weights.tensors, skip=() if CLASSIFIER[0] in weights.tensors else CLASSIFIER)
    return weights


def check_tensors(shape: BertShape, tensors: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> None:
    """Assert every expected tensor (but those in ``skip``) is present with exactly its shape and is finite."""
    for name, dims in shape.expected_shapes().items():
        if name in skip:
            continue
        if name not in tensors:
            raise ModelFormatError(f"missing tensor {name} (expected shape {list(dims)})")
        got = tuple(tensors[name].shape)
        if got != dims:
            raise ModelFormatError(f"tensor {name} has shape {list(got)}, expected {list(dims)} "
                                   f"for a model of shape {_describe(shape)}")
        if not np.all(np.isfinite(tensors[name])):
            raise ModelFormatError(f"tensor {name} has NaN or infinite values")


def _describe(shape: BertShape) -> str:
    return (f"L={shape.layers} H={shape.hidden} N={shape.heads} I={shape.intermediate} "
            f"V={shape.vocab_size} T={shape.type_vocab_size} P={shape.max_positions} C={shape.num_labels}")


def _need(tensors: dict, name: str) -> np.ndarray:
    try:
        return tensors[name]
    except KeyError:
        raise ModelFormatError(f"missing tensor {name}") from None


def shape_from_tensors(tensors: dict[str, np.ndarray], heads: int, layer_norm_eps: float) -> BertShape:
    """Infer the shape from the tensors themselves (heads and eps are not in them)."""
    word = _need(tensors, f"{EMBEDDINGS}/word_embeddings")
    if word.ndim != 2:
        raise ModelFormatError(f"tensor {EMBEDDINGS}/word_embeddings has shape {list(word.shape)}, expected [V,H]")
    layer_ids = {int(m.group(1)) for n in tensors if (m := re.match(r"bert/encoder/layer_(\d+)/", n))}
    if not layer_ids:
        raise ModelFormatError("missing tensor bert/encoder/layer_0/attention/self/query/kernel (no encoder layers)")
    inner = _need(tensors, "bert/encoder/layer_0/intermediate/dense/kernel")
    return BertShape(
        layers=max(layer_ids) + 1,  # a gap shows up as a missing tensor in check_tensors
        hidden=int(word.shape[1]),
        heads=heads,
        intermediate=int(inner.shape[-1]),
        vocab_size=int(word.shape[0]),
        type_vocab_size=int(_need(tensors, f"{EMBEDDINGS}/token_type_embeddings").shape[0]),
        max_positions=int(_need(tensors, f"{EMBEDDINGS}/position_embeddings").shape[0]),
        layer_norm_eps=layer_norm_eps,
        num_labels=int(_need(tensors, "output_weights").shape[0]),
    )


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    return data


def _config_int(config: dict, key: str, where: pathlib.Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _shape_from_config(config: dict, where: pathlib.Path, num_labels: int) -> BertShape:
    """BertShape from a bert_config.json / HF config.json (same key names)."""
    eps = config.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ModelFormatError(f"{where}: layer_norm_eps must be a number, got {eps!r}")
    return BertShape(
        layers=_config_int(config, "num_hidden_layers", where),
        hidden=_config_int(config, "hidden_size", where),
        heads=_config_int(config, "num_attention_heads", where),
        intermediate=_config_int(config, "intermediate_size", where),
        vocab_size=_config_int(config, "vocab_size", where),
        type_vocab_size=_config_int(config, "type_vocab_size", where),
        max_positions=_config_int(config, "max_position_embeddings", where),
        layer_norm_eps=float(eps),
        num_labels=num_labels,
    )


def _activation(config: dict, table: dict, where: pathlib.Path) -> str:
    act = config.get("hidden_act", "gelu")
    if act not in table:
        raise ModelFormatError(f"{where}: hidden_act {act!r} is not supported; expected one of {sorted(table)}")
    return table[act]


def _find_vocab(directory: pathlib.Path) -> pathlib.Path | None:
    """vocab.txt inside the directory, else beside it (in its parent)."""
    for candidate in (directory / "vocab.txt", directory.parent / "vocab.txt"):
        if candidate.is_file():
            return candidate
    return None


def _checkpoint_tensors(prefix: str) -> dict[str, np.ndarray]:
    """All non-training variables of a TF checkpoint, as float32 numpy arrays."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(prefix)
        names = reader.get_variable_to_shape_map()
    except Exception as exc:  # tf raises several types for a corrupt checkpoint
        raise ModelFormatError(f"cannot read checkpoint {prefix}: {str(exc).splitlines()[0]}") from None
    tensors = {}
    for name in sorted(names):
        if TRAINING_ONLY.search(name):
            continue  # optimizer slots and step counters: training-only
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            tensors[name] = value.astype(np.float32, copy=False)
    return tensors


# --- google-research checkpoint -------------------------------------------------------------

def _checkpoint_prefix(path: pathlib.Path) -> str:
    """The checkpoint prefix in a directory: the `checkpoint` file's, bert_model.ckpt, or the only one."""
    if not path.is_dir():
        return str(path)
    state = path / "checkpoint"
    if state.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"), re.M)
        if m:
            prefix = pathlib.Path(m.group(1))
            prefix = prefix if prefix.is_absolute() else path / prefix
            if pathlib.Path(str(prefix) + ".index").exists():
                return str(prefix)
    prefixes = sorted(str(p)[: -len(".index")] for p in path.glob("*.index"))
    preferred = [p for p in prefixes if pathlib.Path(p).name == "bert_model.ckpt"]
    if preferred:
        return preferred[0]
    if len(prefixes) == 1:
        return prefixes[0]
    if not prefixes:
        raise ModelFormatError(f"{path} holds no checkpoint (no *.index file)")
    raise ModelFormatError(f"{path} holds several checkpoints ({', '.join(pathlib.Path(p).name for p in prefixes)}); "
                           f"pass the prefix itself, e.g. --input_saved_model {prefixes[-1]}")


def _read_checkpoint(path: pathlib.Path, heads: int | None, classifier: bool = True) -> BertWeights:
    """``classifier=False``: a pre-training checkpoint without output_weights is accepted."""
    prefix = _checkpoint_prefix(path)
    directory = pathlib.Path(prefix).parent
    config_path = directory / "bert_config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{directory} has no bert_config.json (needed for the number of heads and "
                               f"the activation of a google-research checkpoint)")
    config = _read_json(config_path)
    tensors = _checkpoint_tensors(prefix)
    num_labels = _num_labels(tensors.get("output_weights"), classifier, "output_weights", directory)
    shape = _shape_from_config(config, config_path, num_labels)
    if heads is not None and heads != shape.heads:
        raise ModelFormatError(f"--heads {heads} contradicts {config_path} (num_attention_heads={shape.heads})")
    files = [config_path] + [p for p in directory.iterdir() if p.name.startswith(pathlib.Path(prefix).name + ".")]
    return BertWeights(shape, tensors, Source(path, "checkpoint", files),
                       _activation(config, GOOGLE_ACTIVATIONS, config_path), _find_vocab(directory),
                       notes=[f"checkpoint prefix {prefix}"])


# --- Hugging Face ---------------------------------------------------------------------------

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
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelFormatError(f"cannot read {file}: {exc}") from None
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


def _num_labels(head: np.ndarray | None, required: bool, key: str, where: pathlib.Path) -> int:
    """C from the classifier head, or 2 when there is none and none is required."""
    if head is not None:
        return int(head.shape[0])
    if required:
        raise ModelFormatError(f"missing tensor {key} (output_weights) in {where}: not a fine-tuned classifier")
    return 2


def _read_hf(path: pathlib.Path, heads: int | None, classifier: bool = True) -> BertWeights:
    """``classifier=False``: a BertModel / BertForPreTraining directory (no head) is accepted."""
    config_path = path / "config.json"
    config = _read_json(config_path)
    if config.get("model_type", "bert") != "bert":
        raise ModelFormatError(f"{config_path}: model_type {config.get('model_type')!r} is not 'bert'")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelFormatError(f"{config_path}: only absolute position embeddings are supported")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = [path / "model.safetensors"]
    raw: dict[str, np.ndarray] = {}
    for file in files:
        raw.update(_read_safetensors(file))
    if "classifier.weight" not in raw and classifier:
        raise ModelFormatError(f"missing tensor classifier.weight (output_weights) in {path}: "
                               f"not a BertForSequenceClassification")
    shape = _shape_from_config(config, config_path,
                               _num_labels(raw.get("classifier.weight"), classifier, "classifier.weight", path))
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
                       _activation(config, HF_ACTIVATIONS, config_path), _find_vocab(path))


# --- SavedModel -----------------------------------------------------------------------------

def _read_savedmodel(path: pathlib.Path, heads: int | None) -> BertWeights:
    meta = _serve_meta_graph(path)
    signature = _classifier_signature(meta, path)
    nodes = {n.name: n for n in meta.graph_def.node}
    notes = []
    prefix = path / "variables" / "variables"
    if not pathlib.Path(str(prefix) + ".index").exists():
        raise ModelFormatError(f"{path} has no variables/variables.index (an incomplete SavedModel)")
    tensors = _checkpoint_tensors(str(prefix))
    if f"{EMBEDDINGS}/word_embeddings" not in tensors and any(
            ".ATTRIBUTES" in name for name in _checkpoint_keys(str(prefix))):
        raise ModelFormatError(f"{path} is a TF2 object-based SavedModel; expected a TF1 run_classifier export "
                               f"(variables named bert/embeddings/word_embeddings, ...)")
    config = {}
    for candidate in (path / "bert_config.json", path.parent / "bert_config.json"):
        if candidate.is_file():
            config = _read_json(candidate)
            notes.append(f"heads and epsilon from {candidate}")
            break
    word = _need(tensors, f"{EMBEDDINGS}/word_embeddings")
    graph_heads = _heads_from_graph(nodes, int(word.shape[1]))
    heads = heads or config.get("num_attention_heads") or graph_heads
    if not heads:
        raise ModelFormatError(f"cannot tell the number of attention heads of {path} from its graph; "
                               f"pass --heads N or put its bert_config.json beside it")
    eps = config.get("layer_norm_eps") or _eps_from_graph(nodes)
    if eps is None:
        eps = 1e-12  # google-research's fixed LayerNorm epsilon
        notes.append("LayerNorm epsilon not found in the graph; assumed 1e-12 (google-research)")
    shape = shape_from_tensors(tensors, int(heads), float(eps))
    gelu = _gelu_from_graph(nodes, path)
    files = [p for p in path.rglob("*") if p.is_file() and (p.name.startswith("saved_model.") or
                                                             p.parent.name == "variables")]
    return BertWeights(shape, tensors, Source(path, "savedmodel", files), gelu, _find_vocab(path),
                       signature=signature, notes=notes)


def _checkpoint_keys(prefix: str) -> list[str]:
    import tensorflow as tf

    return list(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())


def _serve_meta_graph(path: pathlib.Path):
    """The MetaGraphDef tagged 'serve' (parsed from saved_model.pb, nothing executed)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    pb, pbtxt = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if pb.exists():
            model.ParseFromString(pb.read_bytes())
        else:
            text_format.Parse(pbtxt.read_text(), model)
    except Exception as exc:  # DecodeError, ParseError, OSError
        raise ModelFormatError(f"{path} is not a SavedModel: cannot parse {pb.name}: {exc}") from None
    for meta in model.meta_graphs:
        if "serve" in meta.meta_info_def.tags:
            return meta
    raise ModelFormatError(f"{path} is not a SavedModel for serving: no meta graph tagged 'serve'")


def _classifier_signature(meta, path: pathlib.Path) -> SavedModelSignature:
    sigs = meta.signature_def
    if "serving_default" in sigs:
        sig = sigs["serving_default"]
    elif len(sigs) == 1:
        sig = next(iter(sigs.values()))
    else:
        raise ModelFormatError(f"{path}: no 'serving_default' signature (has {sorted(sigs)})")
    for key in ("input_ids", "input_mask", "segment_ids"):
        if key not in sig.inputs:
            raise ModelFormatError(f"{path}: the serving signature lacks input {key!r} (has {sorted(sig.inputs)}); "
                                   f"expected a run_classifier export")
    if "probabilities" not in sig.outputs:
        raise ModelFormatError(f"{path}: the serving signature lacks output 'probabilities' "
                               f"(has {sorted(sig.outputs)}); expected a run_classifier export")
    dims = [d.size for d in sig.inputs["input_ids"].tensor_shape.dim]
    seq = dims[1] if len(dims) == 2 and dims[1] > 0 else None
    return SavedModelSignature({k: v.name for k, v in sig.inputs.items()}, sig.outputs["probabilities"].name, seq)


def _const_value(node):
    from tensorflow.python.framework import tensor_util

    if node is None or node.op != "Const":
        return None
    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def _heads_from_graph(nodes: dict, hidden: int) -> int | None:
    """N from a [.., S, N, D] Reshape in layer_0's self-attention (google's transpose_for_scores)."""
    for node in nodes.values():
        if node.op != "Reshape" or not node.name.startswith("bert/encoder/layer_0/attention/self/"):
            continue
        target = nodes.get(node.input[1].split(":")[0].lstrip("^"))
        dims = None
        if target is not None and target.op == "Const":
            dims = [int(v) for v in np.ravel(_const_value(target))]
        elif target is not None and target.op == "Pack":
            values = [_const_value(nodes.get(i.split(":")[0])) for i in target.input]
            dims = [int(v) if v is not None and np.ndim(v) == 0 else -1 for v in values]
        if dims and len(dims) == 4 and dims[2] > 0 and dims[3] > 0 and dims[2] * dims[3] == hidden:
            return dims[2]
    return None


def _eps_from_graph(nodes: dict) -> float | None:
    """The variance epsilon: a small float constant inside the embeddings' LayerNorm scope."""
    for node in nodes.values():
        if node.op == "Const" and node.name.startswith(f"{EMBEDDINGS}/LayerNorm/"):
            value = _const_value(node)
            if value is not None and value.dtype.kind == "f" and value.size == 1 and 0 < float(value) < 1e-2:
                return float(f"{float(value):.6g}")  # 1e-12 stored as float32 reads 9.9999998e-13
    return None


def _gelu_from_graph(nodes: dict, path: pathlib.Path) -> str:
    """Which GELU layer_0's intermediate dense uses, from its op types."""
    ops = {n.op for n in nodes.values() if n.name.startswith("bert/encoder/layer_0/intermediate/")}
    if "Erf" in ops:
        return "erf"
    if "Tanh" in ops:
        return "tanh"
    if "Sigmoid" in ops:
        return "crude"
    raise ModelFormatError(f"{path}: cannot recognise the activation of bert/encoder/layer_0/intermediate "
                           f"(ops {sorted(ops)}); pass --source-gelu erf|tanh|crude")
