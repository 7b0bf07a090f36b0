"""A plain, independent TF1 implementation of open-source BERT for classification.

This follows google-research/bert ``modeling.py`` + ``run_classifier.create_model``
closely on purpose: the standard [B,S,S] attention mask with -10000 adder, a
separate 1/sqrt(D) scaling of the scores, one-hot token types, LayerNorm via
moments, GELU as configured (exact erf by default), softmax in-graph. It is *not*
the rebuilt graph of :mod:`.rebuild`, so comparing the two is a real test.

Used to write demo models (:mod:`.demo_model`) and as "the original model" in
the equivalence proof for checkpoint and Hugging Face inputs, which carry
weights but no graph.

Dimension legend: B batch, S sequence, H hidden, N heads, D head size,
I intermediate, C labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .gelu import check_gelu
from .shape import BertShape


@dataclass
class ReferenceGraph:
    """Handles into a built reference graph (all in the graph it was built in)."""

    input_ids: object  # int32 [B,S] placeholder
    input_mask: object  # int32 [B,S] placeholder
    segment_ids: object  # int32 [B,S] placeholder
    label_ids: object  # int32 [B] placeholder; only there for the run_classifier signature
    is_real_example: object  # int32 [B] placeholder; idem
    pooled: object  # float32 [B,H], the pooler output
    logits: object  # float32 [B,C]
    probabilities: object  # float32 [B,C], softmax(logits)
    variables: dict  # google-research name -> tf.Variable


def gelu(x, kind: str):
    """GELU as open-source BERT variants define it (tf ops, graph mode).

    Written out here rather than taken from :func:`.gelu.gelu` on purpose: this is the
    independent model the rebuilt graph is proved against. Unknown kinds: ConfigError.
    """
    import tensorflow as tf

    check_gelu(kind)
    if kind == "erf":  # the exact definition (HF "gelu", early google-research)
        return x * 0.5 * (1.0 + tf.math.erf(x / math.sqrt(2.0)))
    if kind == "tanh":  # google-research modeling.py / HF "gelu_new"
        return x * 0.5 * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))
    return x * tf.sigmoid(1.702 * x)  # crude: the Neuron demo's --crude_gelu


def build_reference_graph(shape: BertShape, seq_length: int = 128, gelu_kind: str = "erf") -> ReferenceGraph:
    """Build the classifier in the current default (TF1) graph.

    Variables are created with zero initializers and google-research names;
    fill them with :func:`load_weights`. The batch dimension is dynamic.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    variables: dict = {}
    expected = shape.expected_shapes()

    def var(name: str):
        full = v1.get_variable_scope().name + "/" + name if v1.get_variable_scope().name else name
        v = v1.get_variable(name, shape=expected[full], dtype=tf.float32, initializer=v1.zeros_initializer())
        variables[full] = v
        return v

    def dense(x, scope, activation=None):
        with v1.variable_scope(scope):
            y = tf.matmul(x, var("kernel")) + var("bias")
        return activation(y) if activation else y

    def layer_norm(x, scope="LayerNorm"):
        with v1.variable_scope(scope):
            mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
            with tf.name_scope("batchnorm"):
                inv = tf.math.rsqrt(variance + shape.layer_norm_eps)
            return (x - mean) * inv * var("gamma") + var("beta")

    H = shape.hidden
    input_ids = v1.placeholder(tf.int32, [None, seq_length], name="input_ids")
    input_mask = v1.placeholder(tf.int32, [None, seq_length], name="input_mask")
    segment_ids = v1.placeholder(tf.int32, [None, seq_length], name="segment_ids")
    label_ids = v1.placeholder(tf.int32, [None], name="label_ids")
    is_real_example = v1.placeholder(tf.int32, [None], name="is_real_example")
    batch = tf.shape(input_ids)[0]

    with v1.variable_scope("bert"):
        with v1.variable_scope("embeddings"):
            x = tf.gather(var("word_embeddings"), input_ids)  # [B,S,H]
            one_hot = tf.one_hot(tf.reshape(segment_ids, [-1]), depth=shape.type_vocab_size)
            x += tf.reshape(tf.matmul(one_hot, var("token_type_embeddings")), [batch, seq_length, H])
            x += tf.reshape(tf.slice(var("position_embeddings"), [0, 0], [seq_length, -1]), [1, seq_length, H])
            x = layer_norm(x)
        # create_attention_mask_from_input_mask: [B,S,S], 1 where "to" is real.
        mask = tf.cast(tf.reshape(input_mask, [batch, 1, seq_length]), tf.float32) * tf.ones(
            [batch, seq_length, 1], tf.float32
        )
        adder = (1.0 - tf.expand_dims(mask, 1)) * -10000.0  # [B,1,S,S]
        x = tf.reshape(x, [-1, H])  # [B*S,H]
        with v1.variable_scope("encoder"):
            for k in range(shape.layers):
                with v1.variable_scope(f"layer_{k}"):
                    x = _block(x, adder, _Ops(batch, seq_length, shape, dense, layer_norm, gelu_kind))
        x = tf.reshape(x, [batch, seq_length, H])
        with v1.variable_scope("pooler"):
            first = tf.squeeze(x[:, 0:1, :], axis=1)  # [B,H]
            pooled = dense(first, "dense", activation=tf.tanh)
    output_weights = var("output_weights")
    output_bias = var("output_bias")
    with tf.name_scope("loss"):
        logits = tf.nn.bias_add(tf.matmul(pooled, output_weights, transpose_b=True), output_bias)
        probabilities = tf.nn.softmax(logits, axis=-1, name="probabilities")
    return ReferenceGraph(input_ids, input_mask, segment_ids, label_ids, is_real_example,
                          pooled, logits, probabilities, variables)


@dataclass(frozen=True)
class _Ops:
    """What every block of one reference graph shares: its sizes and its layer builders."""

    batch: object  # B: the dynamic batch size, a scalar int32 tensor
    seq_length: int  # S
    shape: BertShape
    dense: Callable  # dense(x, scope, activation=None): kernel + bias variables under ``scope``
    layer_norm: Callable  # layer_norm(x, scope="LayerNorm"): gamma + beta variables under ``scope``
    gelu_kind: str  # erf, tanh or crude


def _block(x, adder, ops: _Ops):
    """One transformer block on x [B*S,H] (post-LayerNorm, as in BERT); adder [B,1,S,S]."""
    import tensorflow as tf

    v1 = tf.compat.v1
    dense, layer_norm = ops.dense, ops.layer_norm
    H, N, D = ops.shape.hidden, ops.shape.heads, ops.shape.head_size

    def split_heads(t):
        t = tf.reshape(t, [ops.batch, ops.seq_length, N, D])  # [B,S,N,D]
        return tf.transpose(t, [0, 2, 1, 3])  # [B,N,S,D]

    with v1.variable_scope("attention"):
        with v1.variable_scope("self"):
            q = split_heads(dense(x, "query"))
            k = split_heads(dense(x, "key"))
            v = split_heads(dense(x, "value"))
            scores = tf.matmul(q, k, transpose_b=True)  # [B,N,S,S]
            scores = scores * (1.0 / math.sqrt(float(D))) + adder
            probs = tf.nn.softmax(scores)
            context = tf.matmul(probs, v)  # [B,N,S,D]
            context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [-1, H])  # [B*S,H]
        with v1.variable_scope("output"):
            attention = layer_norm(dense(context, "dense") + x)
    with v1.variable_scope("intermediate"):
        inner = dense(attention, "dense", activation=lambda t: gelu(t, ops.gelu_kind))
    with v1.variable_scope("output"):
        return layer_norm(dense(inner, "dense") + attention)


def load_weights(session, graph: ReferenceGraph, weights: dict[str, np.ndarray], names=None) -> None:
    """Assign numpy weights to the graph's variables by re-running their initializers.

    Feeding each variable's ``initial_value`` avoids adding assign ops (or huge
    constants) to the graph, so a SavedModel written afterwards stays clean.
    """
    names = list(graph.variables) if names is None else list(names)
    ops, feed = [], {}
    for name in names:
        variable = graph.variables[name]
        value = np.asarray(weights[name], dtype=np.float32)
        assert tuple(value.shape) == tuple(variable.shape), (name, value.shape, variable.shape)
        ops.append(variable.initializer)
        feed[variable.initial_value] = value
    session.run(ops, feed_dict=feed)


class ReferenceModel:
    """The reference graph in its own session, filled with the given weights.

    ``predict(features)`` returns float32 probabilities [N,C]; this is "the
    original model" for inputs that carry weights but no graph.
    """

    def __init__(self, shape: BertShape, weights: dict[str, np.ndarray], seq_length: int = 128,
                 gelu_kind: str = "erf") -> None:
        import tensorflow as tf

        self._graph = tf.Graph()
        with self._graph.as_default():
            self.handles = build_reference_graph(shape, seq_length, gelu_kind)
            self._session = tf.compat.v1.Session(graph=self._graph)
            load_weights(self._session, self.handles, weights)

    def predict(self, input_ids, input_mask, segment_ids) -> np.ndarray:
        h = self.handles
        n = len(input_ids)
        return self._session.run(h.probabilities, {
            h.input_ids: input_ids, h.input_mask: input_mask, h.segment_ids: segment_ids,
            h.label_ids: np.zeros([n], np.int32), h.is_real_example: np.ones([n], np.int32),
        })

    def close(self) -> None:
        self._session.close()
