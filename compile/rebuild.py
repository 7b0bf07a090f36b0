"""The rebuilt, accelerator-friendly BERT classifier (the Neuron demo's Appendix 3).

Split of work:
    host (numpy fp32, :mod:`.host`):  embeddings + LayerNorm, mask -> additive bias, softmax
    accelerated (this module):        encoder, pooler, classifier -> logits

What differs from open-source BERT (:mod:`.reference`), and why:
    * fixed batch B and sequence S: accelerators compile for static shapes (the cpu/gpu
      export adds shorter sequence buckets, see ``call_at``: padding costs compute);
    * query, key and value are one [H,3H] matmul (one big GEMM beats three small ones);
    * 1/sqrt(D) is folded into the query kernel and bias (one multiply fewer per score);
    * the mask arrives as an additive [B,1,1,S] bias, broadcast over heads and queries
      (no [B,S,S] mask is materialised);
    * matmuls run in ``dtype`` (float16 on Neuron); the residual stream, bias adds,
      attention softmax, GELU and LayerNorm stay in fp32, where fp16 would lose
      precision (variance, exp) for no speed;
    * GELU is selectable: exact erf, tanh approximation, or the demo's crude
      x*sigmoid(1.702x);
    * the last block computes queries, attention output and feed-forward for the
      [CLS] row only: the pooler reads nothing else, so the other S-1 rows of the
      last block are dead work (1/L of the encoder's FLOPs);
    * no dropout or any other training-only op.

Dimension legend: B batch, S sequence, H hidden, N heads, D head size (H/N),
I intermediate, C labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..common.errors import ConfigError
from .shape import BertShape

DTYPES = ("float32", "float16", "bfloat16")
GELUS = ("erf", "tanh", "crude")
OUTPUT_KEY = "logits"  # the accelerated signature's only output


@dataclass(frozen=True)
class RebuildConfig:
    """How to rebuild the accelerated part."""

    dtype: str = "float32"  # matmul dtype: float32, float16 or bfloat16
    gelu: str = "erf"  # erf (exact), tanh (approximation) or crude (x*sigmoid(1.702x))
    batch_size: int = 4  # B, fixed at compile time
    seq_length: int = 128  # S, fixed at compile time
    jit_compile: bool = False  # XLA-compile the function (cpu/gpu targets)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.gelu not in GELUS:
            raise ConfigError(f"unknown GELU {self.gelu!r}; expected one of {', '.join(GELUS)}")
        if self.batch_size < 1 or self.seq_length < 3:
            raise ConfigError(f"batch size must be >= 1 and sequence length >= 3, "
                              f"got {self.batch_size} and {self.seq_length}")


def fold_weights(shape: BertShape, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The accelerated part's weights, prepared in numpy (fp32 math, then cast).

    Returns fp32 arrays named ``layer_K/qkv/kernel`` [H,3H] etc.; the kernels
    are cast to the matmul dtype inside TF (numpy has no bfloat16).
    """
    scale = np.float32(1.0 / math.sqrt(shape.head_size))
    out: dict[str, np.ndarray] = {}
    for k in range(shape.layers):
        p = f"bert/encoder/layer_{k}"
        t = lambda name: np.asarray(tensors[f"{p}/{name}"], np.float32)  # noqa: E731
        q_kernel = t("attention/self/query/kernel") * scale
        q_bias = t("attention/self/query/bias") * scale
        kv_kernel = np.concatenate([t("attention/self/key/kernel"), t("attention/self/value/kernel")], axis=1)
        kv_bias = np.concatenate([t("attention/self/key/bias"), t("attention/self/value/bias")])
        if k < shape.layers - 1:
            out[f"layer_{k}/qkv/kernel"] = np.concatenate([q_kernel, kv_kernel], axis=1)  # [H,3H]
            out[f"layer_{k}/qkv/bias"] = np.concatenate([q_bias, kv_bias])  # [3H]
        else:  # the last block: queries for [CLS] only, keys and values for every row
            out[f"layer_{k}/q/kernel"], out[f"layer_{k}/q/bias"] = q_kernel, q_bias  # [H,H], [H]
            out[f"layer_{k}/kv/kernel"], out[f"layer_{k}/kv/bias"] = kv_kernel, kv_bias  # [H,2H], [2H]
        for ours, theirs in (("attention_output", "attention/output/dense"), ("intermediate", "intermediate/dense"),
                             ("output", "output/dense")):
            out[f"layer_{k}/{ours}/kernel"] = t(f"{theirs}/kernel")
            out[f"layer_{k}/{ours}/bias"] = t(f"{theirs}/bias")
        for ours, theirs in (("attention_ln", "attention/output/LayerNorm"), ("output_ln", "output/LayerNorm")):
            out[f"layer_{k}/{ours}/gamma"] = t(f"{theirs}/gamma")
            out[f"layer_{k}/{ours}/beta"] = t(f"{theirs}/beta")
    out["pooler/kernel"] = np.asarray(tensors["bert/pooler/dense/kernel"], np.float32)
    out["pooler/bias"] = np.asarray(tensors["bert/pooler/dense/bias"], np.float32)
    out["classifier/kernel"] = np.ascontiguousarray(np.asarray(tensors["output_weights"], np.float32).T)  # [H,C]
    out["classifier/bias"] = np.asarray(tensors["output_bias"], np.float32)
    return out


def build_module(shape: BertShape, tensors: dict[str, np.ndarray], config: RebuildConfig):
    """A tf.Module whose ``__call__(embeddings [B,S,H] f32, mask_bias [B,1,1,S] f32)``
    returns ``{"logits": [B,C] f32}``; a tf.function with a fixed input signature over
    ``forward``, the same graph as plain Python."""
    import tensorflow as tf

    folded = fold_weights(shape, tensors)
    dt = tf.as_dtype(config.dtype)
    B, S, H, N, D = config.batch_size, config.seq_length, shape.hidden, shape.heads, shape.head_size
    eps = float(shape.layer_norm_eps)

    class LeanBert(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="lean_bert")
            # kernels live in the matmul dtype; biases and LayerNorm parameters in fp32
            self.w = {name: tf.Variable(tf.cast(value, dt) if name.endswith("/kernel") else value,
                                        trainable=False, name=name.replace("/", "_"))
                      for name, value in folded.items()}

        def dense(self, x, name):
            """x [M,K] fp32 -> x @ kernel + bias, matmul in dt, result fp32 [M,O]."""
            y = tf.matmul(tf.cast(x, dt), self.w[f"{name}/kernel"])
            return tf.cast(y, tf.float32) + self.w[f"{name}/bias"]

        def layer_norm(self, x, name):
            """LayerNorm over the last axis, fp32."""
            mean = tf.reduce_mean(x, axis=-1, keepdims=True)
            centred = x - mean
            variance = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
            return centred * tf.math.rsqrt(variance + eps) * self.w[f"{name}/gamma"] + self.w[f"{name}/beta"]

        def attention(self, q, key, v, bias, rows):
            """Scaled dot-product attention; q [B,N,R,D] (already scaled), key/v [B,N,S,D]
            -> context [B*R,H] fp32, R = rows (S, or 1 for [CLS] only)."""
            scores = tf.cast(tf.matmul(q, key, transpose_b=True), tf.float32) + bias  # [B,N,R,S]
            probs = tf.nn.softmax(scores, axis=-1)  # fp32: exp of fp16 scores loses digits
            context = tf.matmul(tf.cast(probs, dt), v)  # [B,N,R,D]
            return tf.cast(tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [B * rows, H]), tf.float32)  # [B*R,H]

        def block(self, x, bias, k):
            """One transformer block on the fp32 residual stream x [B*S,H] -> [B*S,H]."""
            qkv = tf.cast(self.dense(x, f"layer_{k}/qkv"), dt)  # [B*S,3H]
            S = bias.shape[-1]  # static in every traced function: the full S or a bucket
            qkv = tf.reshape(qkv, [B, S, 3, N, D])  # [B,S,3,N,D]
            qkv = tf.transpose(qkv, [2, 0, 3, 1, 4])  # [3,B,N,S,D]
            context = self.attention(qkv[0], qkv[1], qkv[2], bias, S)  # [B*S,H]
            return self.feed_forward(context, x, k)

        def last_block(self, x, bias, k):
            """The last block for the [CLS] rows only: x [B*S,H] -> [B,H]."""
            S = bias.shape[-1]
            kv = tf.cast(self.dense(x, f"layer_{k}/kv"), dt)  # [B*S,2H]
            kv = tf.transpose(tf.reshape(kv, [B, S, 2, N, D]), [2, 0, 3, 1, 4])  # [2,B,N,S,D]
            first = tf.reshape(x, [B, S, H])[:, 0, :]  # [B,H], the [CLS] rows
            q = tf.cast(self.dense(first, f"layer_{k}/q"), dt)  # [B,H]
            q = tf.transpose(tf.reshape(q, [B, 1, N, D]), [0, 2, 1, 3])  # [B,N,1,D]
            context = self.attention(q, kv[0], kv[1], bias, 1)  # [B,H]
            return self.feed_forward(context, first, k)

        def feed_forward(self, context, x, k):
            """Attention output + LayerNorm, then GELU feed-forward + LayerNorm; rows of x [M,H]."""
            x = self.layer_norm(self.dense(context, f"layer_{k}/attention_output") + x, f"layer_{k}/attention_ln")
            inner = gelu(self.dense(x, f"layer_{k}/intermediate"), config.gelu)  # [M,I]
            return self.layer_norm(self.dense(inner, f"layer_{k}/output") + x, f"layer_{k}/output_ln")

        @tf.function(
            input_signature=[tf.TensorSpec([B, S, H], tf.float32, name="embeddings"),
                             tf.TensorSpec([B, 1, 1, S], tf.float32, name="mask_bias")],
            jit_compile=config.jit_compile,
        )
        def __call__(self, embeddings, mask_bias):
            return self.forward(embeddings, mask_bias)

        @tf.function(jit_compile=config.jit_compile)
        def call_at(self, embeddings, mask_bias):
            """``__call__`` for a shorter sequence S' (embeddings [B,S',H], mask_bias [B,1,1,S']):
            one trace per S'. Exact: past its last real token a row's positions only ever get
            exp(-10000) = 0 attention, so cutting them off changes nothing but the work."""
            return self.forward(embeddings, mask_bias)

        def forward(self, embeddings, mask_bias):
            """The graph itself, as plain Python: a tracer that wraps it (tensorflow-neuron) gets one flat
            graph, not a call into __call__'s function (whose ops its on_neuron_ratio would not count)."""
            S = mask_bias.shape[-1]  # static: the compiled S, or a bucket's
            x = tf.reshape(embeddings, [B * S, H])  # [B*S,H]
            for k in range(shape.layers - 1):
                x = self.block(x, mask_bias, k)
            first = self.last_block(x, mask_bias, shape.layers - 1)  # [B,H], the [CLS] rows
            pooled = tf.tanh(self.dense(first, "pooler"))  # [B,H]
            return {OUTPUT_KEY: self.dense(pooled, "classifier")}  # [B,C] logits, fp32

    return LeanBert()


def gelu(x, kind: str):
    """GELU on fp32 x; see RebuildConfig.gelu."""
    import tensorflow as tf

    if kind == "erf":
        return 0.5 * x * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))
    if kind == "tanh":
        return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if kind == "crude":
        return x * tf.sigmoid(1.702 * x)
    raise ConfigError(f"unknown GELU {kind!r}")
