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
    * GELU is selectable (:mod:`.gelu`, the formulas fine-tuning used): exact erf,
      tanh approximation, or the demo's crude x*sigmoid(1.702x);
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
from .gelu import check_gelu
from .shape import BertShape

DTYPES = ("float32", "float16", "bfloat16")
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
        check_gelu(self.gelu)
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
    """A :class:`.lean_bert.LeanBert` (a tf.Module) whose ``__call__(embeddings [B,S,H] f32,
    mask_bias [B,1,1,S] f32)`` returns ``{"logits": [B,C] f32}``; a tf.function with a fixed
    input signature over ``forward``, the same graph as plain Python. TensorFlow is imported
    here, not when this module is."""
    from .lean_bert import LeanBert

    return LeanBert(shape, fold_weights(shape, tensors), config)
