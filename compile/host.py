"""The host part of a compiled model, in numpy float32: embeddings, mask bias, softmax.

The accelerated part (encoder, pooler, classifier) takes what :class:`HostEmbeddings`
returns; the embedding gather and its LayerNorm stay on the host in fp32 (as in
the Neuron demo's rebuilt BERT): a gather from a 30522-row table is memory-bound,
cheap on a CPU, and keeps the large table out of accelerator memory.

No TensorFlow here: this module is imported by the serving hot path.

Dimension legend: B batch, S sequence, H hidden, T token types.
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np

from ..common.errors import ModelFormatError
from .shape import EMBEDDINGS

EMBEDDING_KEYS = ("word_embeddings", "token_type_embeddings", "position_embeddings", "gamma", "beta")
MASK_NEG = -10000.0  # additive bias of padded positions, as google-research BERT


# EMBEDDING_KEYS -> the google-research tensor (under bert/embeddings/) each is read from
_SOURCE_NAMES = {"word_embeddings": "word_embeddings", "token_type_embeddings": "token_type_embeddings",
                 "position_embeddings": "position_embeddings", "gamma": "LayerNorm/gamma", "beta": "LayerNorm/beta"}


def embedding_arrays(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The host part of a model's tensors (google-research names), keyed by EMBEDDING_KEYS, fp32."""
    return {key: np.asarray(tensors[f"{EMBEDDINGS}/{_SOURCE_NAMES[key]}"], np.float32) for key in EMBEDDING_KEYS}


def save_embeddings(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Write the embedding tensors (google-research names) to an uncompressed .npz."""
    np.savez(path, **embedding_arrays(tensors))


class HostEmbeddings:
    """word + token type + position embeddings, then LayerNorm, for fixed [B,S] inputs."""

    def __init__(self, arrays: dict[str, np.ndarray], seq_length: int, layer_norm_eps: float) -> None:
        missing = [k for k in EMBEDDING_KEYS if k not in arrays]
        if missing:
            raise ModelFormatError(f"embeddings file lacks {', '.join(missing)}")
        self.word = np.ascontiguousarray(arrays["word_embeddings"], np.float32)  # [V,H]
        position = np.asarray(arrays["position_embeddings"], np.float32)  # [P,H]
        token_type = np.asarray(arrays["token_type_embeddings"], np.float32)  # [T,H]
        if seq_length > position.shape[0]:
            raise ModelFormatError(f"sequence length {seq_length} exceeds the model's "
                                   f"{position.shape[0]} position embeddings")
        # position + token type for every (type, position): [T,S,H]; one gather then serves both.
        self.position_type = np.ascontiguousarray(token_type[:, None, :] + position[None, :seq_length, :])
        self.gamma = np.asarray(arrays["gamma"], np.float32)
        self.beta = np.asarray(arrays["beta"], np.float32)
        self.eps = np.float32(layer_norm_eps)
        self.seq_length = seq_length
        self.vocab_size, self.hidden = self.word.shape
        self.type_vocab_size = token_type.shape[0]
        self._positions = np.arange(seq_length)

    @classmethod
    def load(cls, path: pathlib.Path, seq_length: int, layer_norm_eps: float) -> "HostEmbeddings":
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # missing, cut short, not an npz
            raise ModelFormatError(f"cannot read embeddings {path}: {type(exc).__name__}: {exc}") from None
        return cls(arrays, seq_length, layer_norm_eps)

    def __call__(self, input_ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
        """LayerNorm(word[ids] + type[segments] + position[:S]) as float32 [B,S,H]."""
        if input_ids.min(initial=0) < 0 or input_ids.max(initial=0) >= self.vocab_size:
            raise ValueError(f"input_ids outside [0, {self.vocab_size})")
        if segment_ids.min(initial=0) < 0 or segment_ids.max(initial=0) >= self.type_vocab_size:
            raise ValueError(f"segment_ids outside [0, {self.type_vocab_size})")
        x = self.word[input_ids]  # [B,S,H]
        x += self.position_type[segment_ids, self._positions[: input_ids.shape[1]]]  # [B,S,H]; S <= seq_length
        mean = x.mean(axis=-1, keepdims=True)  # [B,S,1]
        x -= mean
        variance = np.mean(np.square(x), axis=-1, keepdims=True)  # [B,S,1]
        x *= 1.0 / np.sqrt(variance + self.eps)
        x *= self.gamma
        x += self.beta
        return x


def mask_bias(input_mask: np.ndarray) -> np.ndarray:
    """The attention mask as an additive bias [B,1,1,S]: 0 on real tokens, -10000 on padding."""
    bias = (1.0 - input_mask.astype(np.float32)) * np.float32(MASK_NEG)  # [B,S]
    return bias[:, None, None, :]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float32, stable for large logits."""
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
