"""The rebuilt graph as a tf.Module (the design and its reasons: :mod:`.rebuild`).

Imports TensorFlow at import time; :func:`.rebuild.build_module` imports this module
only when a graph is built, so the rest of the compile package stays cheap to import.

Dimension legend: B batch, S sequence, H hidden, N heads, D head size (H/N),
I intermediate, C labels, M rows, R query rows.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .gelu import gelu
from .rebuild import OUTPUT_KEY
from .shape import BertShape


class LeanBert(tf.Module):
    """Encoder + pooler + classifier of one BERT at a fixed batch B and sequence S.

    ``__call__(embeddings [B,S,H] f32, mask_bias [B,1,1,S] f32) -> {"logits": [B,C] f32}``
    is a tf.function with that fixed input signature; ``call_at`` is the same for a
    shorter S' (one trace per S'); ``forward`` is the graph as plain Python.
    ``folded`` are the weights :func:`.rebuild.fold_weights` prepared; ``config`` a
    :class:`.rebuild.RebuildConfig`.
    """

    def __init__(self, shape: BertShape, folded: dict[str, np.ndarray], config) -> None:
        super().__init__(name="lean_bert")
        self._dt = tf.as_dtype(config.dtype)
        self._batch, self._layers, self._gelu = config.batch_size, shape.layers, config.gelu
        self._hidden, self._heads, self._head_size = shape.hidden, shape.heads, shape.head_size
        self._eps = float(shape.layer_norm_eps)
        # kernels live in the matmul dtype; biases and LayerNorm parameters in fp32
        self.w = {name: tf.Variable(tf.cast(value, self._dt) if name.endswith("/kernel") else value,
                                    trainable=False, name=name.replace("/", "_"))
                  for name, value in folded.items()}
        B, S, H = config.batch_size, config.seq_length, shape.hidden
        self.__call__ = tf.function(
            self.forward, jit_compile=config.jit_compile,
            input_signature=[tf.TensorSpec([B, S, H], tf.float32, name="embeddings"),
                             tf.TensorSpec([B, 1, 1, S], tf.float32, name="mask_bias")])
        # ``__call__`` for a shorter sequence S' (embeddings [B,S',H], mask_bias [B,1,1,S']): one
        # trace per S'. Exact: past its last real token a row's positions only ever get
        # exp(-10000) = 0 attention, so cutting them off changes nothing but the work.
        self.call_at = tf.function(self.forward, jit_compile=config.jit_compile)

    def dense(self, x, name):
        """x [M,K] fp32 -> x @ kernel + bias, matmul in dt, result fp32 [M,O]."""
        y = tf.matmul(tf.cast(x, self._dt), self.w[f"{name}/kernel"])
        return tf.cast(y, tf.float32) + self.w[f"{name}/bias"]

    def layer_norm(self, x, name):
        """LayerNorm over the last axis, fp32."""
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        centred = x - mean
        variance = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
        return centred * tf.math.rsqrt(variance + self._eps) * self.w[f"{name}/gamma"] + self.w[f"{name}/beta"]

    def attention(self, q, key, v, bias, rows):
        """Scaled dot-product attention; q [B,N,R,D] (already scaled), key/v [B,N,S,D]
        -> context [B*R,H] fp32, R = rows (S, or 1 for [CLS] only)."""
        dt, B, H = self._dt, self._batch, self._hidden
        scores = tf.cast(tf.matmul(q, key, transpose_b=True), tf.float32) + bias  # [B,N,R,S]
        probs = tf.nn.softmax(scores, axis=-1)  # fp32: exp of fp16 scores loses digits
        context = tf.matmul(tf.cast(probs, dt), v)  # [B,N,R,D]
        return tf.cast(tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [B * rows, H]), tf.float32)  # [B*R,H]

    def block(self, x, bias, k):
        """One transformer block on the fp32 residual stream x [B*S,H] -> [B*S,H]."""
        B, N, D = self._batch, self._heads, self._head_size
        qkv = tf.cast(self.dense(x, f"layer_{k}/qkv"), self._dt)  # [B*S,3H]
        S = bias.shape[-1]  # static in every traced function: the full S or a bucket
        qkv = tf.reshape(qkv, [B, S, 3, N, D])  # [B,S,3,N,D]
        qkv = tf.transpose(qkv, [2, 0, 3, 1, 4])  # [3,B,N,S,D]
        context = self.attention(qkv[0], qkv[1], qkv[2], bias, S)  # [B*S,H]
        return self.feed_forward(context, x, k)

    def last_block(self, x, bias, k):
        """The last block for the [CLS] rows only: x [B*S,H] -> [B,H]."""
        B, H, N, D = self._batch, self._hidden, self._heads, self._head_size
        S = bias.shape[-1]
        kv = tf.cast(self.dense(x, f"layer_{k}/kv"), self._dt)  # [B*S,2H]
        kv = tf.transpose(tf.reshape(kv, [B, S, 2, N, D]), [2, 0, 3, 1, 4])  # [2,B,N,S,D]
        first = tf.reshape(x, [B, S, H])[:, 0, :]  # [B,H], the [CLS] rows
        q = tf.cast(self.dense(first, f"layer_{k}/q"), self._dt)  # [B,H]
        q = tf.transpose(tf.reshape(q, [B, 1, N, D]), [0, 2, 1, 3])  # [B,N,1,D]
        context = self.attention(q, kv[0], kv[1], bias, 1)  # [B,H]
        return self.feed_forward(context, first, k)

    def feed_forward(self, context, x, k):
        """Attention output + LayerNorm, then GELU feed-forward + LayerNorm; rows of x [M,H]."""
        x = self.layer_norm(self.dense(context, f"layer_{k}/attention_output") + x, f"layer_{k}/attention_ln")
        inner = gelu(self.dense(x, f"layer_{k}/intermediate"), self._gelu)  # [M,I]
        return self.layer_norm(self.dense(inner, f"layer_{k}/output") + x, f"layer_{k}/output_ln")

    def forward(self, embeddings, mask_bias):
        """The graph itself, as plain Python: a tracer that wraps it (tensorflow-neuron) gets one flat
        graph, not a call into __call__'s function (whose ops its on_neuron_ratio would not count)."""
        B, H = self._batch, self._hidden
        S = mask_bias.shape[-1]  # static: the compiled S, or a bucket's
        x = tf.reshape(embeddings, [B * S, H])  # [B*S,H]
        for k in range(self._layers - 1):
            x = self.block(x, mask_bias, k)
        first = self.last_block(x, mask_bias, self._layers - 1)  # [B,H], the [CLS] rows
        pooled = tf.tanh(self.dense(first, "pooler"))  # [B,H]
        return {OUTPUT_KEY: self.dense(pooled, "classifier")}  # [B,C] logits, fp32
