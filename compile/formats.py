"""Write a classifier's weights as a google-research checkpoint or a Hugging Face directory.

The inverse of :mod:`.weights` for the two weights-only formats; used by the
demo model (``bertpool-demo-model --format``) and the round-trip tests.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from ..common.errors import ConfigError
from .shape import BertShape
from .weights import hf_name

# GELU -> hidden_act, per format (see weights.GOOGLE_ACTIVATIONS / HF_ACTIVATIONS)
GOOGLE_ACT = {"tanh": "gelu", "erf": "gelu_erf"}
HF_ACT = {"erf": "gelu", "tanh": "gelu_new", "crude": "quick_gelu"}


def _config(shape: BertShape) -> dict:
    return {
        "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "intermediate_size": shape.intermediate,
        "vocab_size": shape.vocab_size, "type_vocab_size": shape.type_vocab_size,
        "max_position_embeddings": shape.max_positions, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
    }


def write_checkpoint(directory, shape: BertShape, tensors: dict[str, np.ndarray], gelu: str = "tanh",
                     prefix: str = "bert_model.ckpt") -> pathlib.Path:
    """bert_config.json + a TF checkpoint with google-research variable names; returns the directory."""
    import tensorflow as tf

    if gelu not in GOOGLE_ACT:
        raise ConfigError(f"a google-research bert_config.json cannot express GELU {gelu!r}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(_config(shape), hidden_act=GOOGLE_ACT[gelu])
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


def write_hf(directory, shape: BertShape, tensors: dict[str, np.ndarray], gelu: str = "erf") -> pathlib.Path:
    """config.json + model.safetensors of a BertForSequenceClassification; returns the directory."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(_config(shape), hidden_act=HF_ACT[gelu], layer_norm_eps=shape.layer_norm_eps,
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
    save_file(out, str(directory / "model.safetensors"))
    return directory
