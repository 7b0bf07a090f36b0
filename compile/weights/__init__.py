"""Read (and write) a BERT classifier's weights in any of three formats, one module each.

Formats, detected from the directory's content (:func:`detect_format`):

* ``savedmodel`` (:mod:`.savedmodel`): google-research/bert ``run_classifier`` export, a TF1
  SavedModel (``saved_model.pb`` + ``variables/``). Variables are read from its
  variables checkpoint; heads, LayerNorm epsilon, GELU and sequence length are
  read from the graph (a ``bert_config.json`` beside it fills in heads/eps, and must agree with it).
* ``checkpoint`` (:mod:`.checkpoint`): a google-research TF checkpoint directory (``bert_config.json``
  + ``bert_model.ckpt.*`` or any other checkpoint prefix), or the prefix itself.
* ``hf`` (:mod:`.hf`): a Hugging Face ``BertForSequenceClassification`` directory
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

import pathlib

from ...common.errors import ModelFormatError
from ..shape import BertShape
from ._base import CLASSIFIER, BertWeights, SavedModelSignature, Source, check_tensors, shape_from_tensors
from .checkpoint import GOOGLE_ACT, _read_checkpoint, write_checkpoint
from .hf import HF_ACT, _read_hf, hf_name, write_hf
from .savedmodel import _read_savedmodel

__all__ = ["FORMATS", "CLASSIFIER", "BertWeights", "SavedModelSignature", "Source", "check_tensors",
           "shape_from_tensors", "detect_format", "load_weights", "load_pretrained",
           "GOOGLE_ACT", "HF_ACT", "hf_name", "write_checkpoint", "write_hf", "check_pair_classifier"]

FORMATS = ("savedmodel", "checkpoint", "hf")  # what load_weights reads and the demo model writes
_READERS = {"savedmodel": _read_savedmodel, "checkpoint": _read_checkpoint, "hf": _read_hf}


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
    if "config.json" in names and _torch_or_keras_weights(names):
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


def _torch_or_keras_weights(names: set[str]) -> bool:
    """Whether a directory listing holds Hugging Face weights in a format not read here: torch
    (``pytorch_model.bin``, or sharded: ``pytorch_model-00001-of-00002.bin`` + its index) or Keras
    (``tf_model.h5``)."""
    return any(n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5") or
               (n.startswith("pytorch_model-") and n.endswith(".bin")) for n in names)


def load_weights(path, heads: int | None = None, source_gelu: str | None = None) -> BertWeights:
    """Read, shape-check and return the classifier at ``path`` (any of FORMATS).

    ``heads`` and ``source_gelu`` override what is read from the model (needed
    only for a SavedModel whose graph does not reveal them).
    """
    path = pathlib.Path(path)
    fmt = detect_format(path)
    weights = _READERS[fmt](path, heads)
    if source_gelu is not None:
        weights.gelu = source_gelu
    check_tensors(weights.shape, weights.tensors)
    check_pair_classifier(weights.shape, path)
    return weights


def check_pair_classifier(shape: BertShape, path: pathlib.Path) -> None:
    """ModelFormatError unless ``shape`` is a sentence-pair classifier bertpool can serve.

    Both would otherwise compile into something that fails or lies: the pool tokenizes every
    request as a pair (segment ids 0 and 1), which a model with one token type cannot embed
    (RoBERTa-style type_vocab_size 1); and it serves the softmax over the labels, which over a
    single output is always 1.0 (a regression or multiple-choice head, not a classifier).
    """
    if shape.type_vocab_size < 2:
        raise ModelFormatError(f"{path}: the model has {shape.type_vocab_size} token type "
                               f"(token_type_embeddings rows); bertpool serves sentence pairs, which need 2 "
                               f"(segment ids 0 and 1)")
    if shape.num_labels < 2:
        raise ModelFormatError(f"{path}: the classifier head has {shape.num_labels} output; bertpool serves "
                               f"classifiers with 2 or more labels (softmax), not a regression or "
                               f"multiple-choice head")


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
    weights = _READERS[fmt](path, None, classifier=False)
    check_tensors(weights.shape, weights.tensors, skip=() if CLASSIFIER[0] in weights.tensors else CLASSIFIER)
    check_pair_classifier(weights.shape, path)  # fine-tuned, it would be compiled and refused only then
    return weights
