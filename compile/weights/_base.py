"""What every weights format shares: the result types, the shape checks, config parsing.

Each format's reader and writer lives in its own module of this package.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np

from ...common.errors import ModelFormatError
from ..shape import EMBEDDINGS, BertShape

CLASSIFIER = ("output_weights", "output_bias")  # the head that fine-tuning creates
TRAINING_ONLY = re.compile(r"(^|/)(adam_[mv]|global_step|Momentum|AdamWeightDecay)")


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
    output: str  # tensor name of "probabilities" (or of "logits" when the export has no probabilities)
    seq_length: int | None  # fixed sequence length of input_ids, None if dynamic
    logits: bool = False  # output is logits: the proof applies the softmax the export left out


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
    # do_lower_case as the source's tokenizer config states it (HF tokenizer_config.json); None: unstated
    do_lower_case: bool | None = None

    def tokenizer(self, vocab: str | pathlib.Path, max_seq_length: int):
        """The BertTokenizer of ``vocab`` for this model; ModelFormatError when the casing its
        tokenizer config states contradicts the vocabulary's.

        bertpool decides do_lower_case from the vocabulary (lower-case unless it holds capitals), in
        fine-tuning and in the pool. A tokenizer_config.json that says otherwise means the model was
        trained on text cased differently from what it would be fed: wrong answers, which the
        equivalence proof cannot see (it feeds both models the same tokens)."""
        from ...common.tokenizer import BertTokenizer

        tokenizer = BertTokenizer(vocab, max_seq_length=max_seq_length)
        stated, lower = self.do_lower_case, tokenizer.do_lower_case
        if stated is not None and stated != lower:
            kind = "holds no capitals (an uncased vocabulary)" if lower else "holds capitals (a cased vocabulary)"
            raise ModelFormatError(
                f"tokenizer_config.json of {self.source.path} says do_lower_case={str(stated).lower()}, but {vocab} "
                f"{kind}, from which bertpool decides do_lower_case={str(lower).lower()}; pass the vocabulary the "
                f"model was trained with (--vocab) or correct tokenizer_config.json")
        return tokenizer


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
    """config[key] as an int; ModelFormatError saying the key is missing, or what it holds instead."""
    if key not in config:
        raise ModelFormatError(f"{where} lacks {key} (needed for the model's shape)")
    value = config[key]
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
    if not isinstance(act, str) or act not in table:  # (a list is unhashable: TypeError before)
        raise ModelFormatError(f"{where}: hidden_act {act!r} is not supported; expected one of {sorted(table)}")
    return table[act]


def _find_vocab(directory: pathlib.Path) -> pathlib.Path | None:
    """vocab.txt inside the directory, else beside it (in its parent)."""
    for candidate in (directory / "vocab.txt", directory.parent / "vocab.txt"):
        if candidate.is_file():
            return candidate
    return None


def _num_labels(head: np.ndarray | None, required: bool, key: str, where: pathlib.Path) -> int:
    """C from the classifier head, or 2 when there is none and none is required."""
    if head is not None:
        return int(head.shape[0])
    if required:
        raise ModelFormatError(f"missing tensor {key} (output_weights) in {where}: not a fine-tuned classifier")
    return 2


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
        try:
            value = reader.get_tensor(name)
        except Exception as exc:  # a truncated or corrupt data file: IndexError, OpError, checksum errors
            raise ModelFormatError(f"cannot read {name} from checkpoint {prefix} (truncated or corrupt?): "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            tensors[name] = value.astype(np.float32, copy=False)
    return tensors


def bert_config(shape: BertShape) -> dict:
    """The config keys google-research's bert_config.json and HF's config.json share."""
    return {
        "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "intermediate_size": shape.intermediate,
        "vocab_size": shape.vocab_size, "type_vocab_size": shape.type_vocab_size,
        "max_position_embeddings": shape.max_positions, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
    }
