"""google-research TF checkpoints: ``bert_config.json`` + ``bert_model.ckpt.*`` (or any prefix).

Read for compiling (a fine-tuned classifier) and fine-tuning (a pre-training checkpoint,
no head); written by the demo model, fine-tuning and the round-trip tests.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from ...common.errors import ConfigError, ModelFormatError
from ._base import (BertWeights, Source, _activation, _checkpoint_tensors, _find_vocab, _num_labels, _read_json,
                    _shape_from_config, bert_config)
from ..shape import EMBEDDINGS, BertShape

# bert_config.json hidden_act -> GELU. Its modeling.py "gelu" is the tanh
# approximation (since 2019; the first release used erf).
GOOGLE_ACTIVATIONS = {"gelu": "tanh", "gelu_erf": "erf"}
GOOGLE_ACT = {gelu: act for act, gelu in GOOGLE_ACTIVATIONS.items()}  # GELU -> hidden_act written


def _checkpoint_prefix(path: pathlib.Path) -> str:
    """The checkpoint prefix in a directory: the `checkpoint` file's (by name, in this directory),
    bert_model.ckpt, or the only one.

    TensorFlow records an absolute path there: in a copied or moved directory it names the original's
    files, whose weights would then be read beside this directory's bert_config.json and vocabulary."""
    if not path.is_dir():
        return str(path)
    state = path / "checkpoint"
    if state.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"), re.M)
        if m:
            prefix = path / pathlib.Path(m.group(1)).name
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
    tensors, scope = _without_scope(_checkpoint_tensors(prefix), prefix)
    notes = [f"checkpoint prefix {prefix}"] + ([f"variables read without their scope {scope!r}"] if scope else [])
    num_labels = _num_labels(tensors.get("output_weights"), classifier, "output_weights", directory)
    shape = _shape_from_config(config, config_path, num_labels)
    if heads is not None and heads != shape.heads:
        raise ModelFormatError(f"--heads {heads} contradicts {config_path} (num_attention_heads={shape.heads})")
    files = [config_path] + [p for p in directory.iterdir() if p.name.startswith(pathlib.Path(prefix).name + ".")]
    return BertWeights(shape, tensors, Source(path, "checkpoint", files),
                       _activation(config, GOOGLE_ACTIVATIONS, config_path), _find_vocab(directory), notes=notes)


def _without_scope(tensors: dict[str, np.ndarray], prefix: str) -> tuple[dict[str, np.ndarray], str]:
    """(tensors under google-research names, the scope taken off them, or "").

    A model built inside an outer variable scope (``tf.variable_scope("model")`` around
    modeling.BertModel and the run_classifier head) saves ``model/bert/embeddings/...`` and
    ``model/output_weights``: the same model, so the scope is taken off every name under it.
    Several candidate scopes are ambiguous, and no BERT variable at all is another model's
    checkpoint: ModelFormatError naming what was found.
    """
    anchor = f"{EMBEDDINGS}/word_embeddings"
    if anchor in tensors:
        return tensors, ""
    scopes = sorted(name[: -len(anchor)] for name in tensors if name.endswith("/" + anchor))
    if len(scopes) != 1:
        shown = ", ".join(scopes or sorted(tensors)[:4]) or "no float variables"
        raise ModelFormatError(f"checkpoint {prefix} has no {anchor} variable"
                               f"{' under one scope' if scopes else ''} (found {shown}): "
                               f"not a google-research BERT checkpoint")
    scope = scopes[0]
    outside = {name: value for name, value in tensors.items() if not name.startswith(scope)}
    return {**outside, **{name[len(scope):]: value for name, value in tensors.items() if name.startswith(scope)}}, scope


def write_checkpoint(directory, shape: BertShape, tensors: dict[str, np.ndarray], gelu: str = "tanh",
                     prefix: str = "bert_model.ckpt") -> pathlib.Path:
    """bert_config.json + a TF checkpoint with google-research variable names; returns the directory."""
    import tensorflow as tf

    if gelu not in GOOGLE_ACT:
        raise ConfigError(f"a google-research bert_config.json cannot express GELU {gelu!r}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # layer_norm_eps too, though google's modeling.py always uses 1e-12 (its BertConfig keeps unknown keys):
    # a model fine-tuned from a Hugging Face base at another epsilon must read back as it was trained.
    config = dict(bert_config(shape), hidden_act=GOOGLE_ACT[gelu], layer_norm_eps=shape.layer_norm_eps)
    (directory / "bert_config.json").write_text(json.dumps(config, indent=2) + "\n")
    graph = tf.Graph()
    with graph.as_default():
        variables = {name: tf.compat.v1.get_variable(name, shape=value.shape, dtype=tf.float32,
                                                     initializer=tf.compat.v1.zeros_initializer())
                     for name, value in tensors.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run([v.initializer for v in variables.values()],
                        {v.initial_value: np.asarray(tensors[n], np.float32) for n, v in variables.items()})
            saver.save(session, str(directory / prefix), write_meta_graph=False)
    return directory
