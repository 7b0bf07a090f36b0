"""The shape of a BERT sentence-pair classifier and the names of its tensors.

Every tensor is named as in the google-research/bert checkpoint (the names a
run_classifier export carries); the Hugging Face names are mapped onto these in
:mod:`.weights`. :meth:`BertShape.expected_shapes` is the single source of truth
used to assert every copied tensor's shape.

Dimension legend used across this package:
    L layers, H hidden size, N attention heads, D = H / N head size,
    I intermediate (feed-forward) size, V vocabulary rows, T token types,
    P position rows, C classifier labels, B batch, S sequence length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..common.errors import ConfigError, ModelFormatError

EMBEDDINGS = "bert/embeddings"
POOLER = "bert/pooler/dense"


@dataclass(frozen=True)
class BertShape:
    """Hyper-parameters that fix every tensor shape of a BERT classifier."""

    layers: int  # L: transformer blocks in the encoder
    hidden: int  # H: width of the residual stream
    heads: int  # N: attention heads; H must divide by N
    intermediate: int  # I: inner width of each feed-forward block
    vocab_size: int  # V: rows of word_embeddings (= lines of vocab.txt)
    type_vocab_size: int  # T: rows of token_type_embeddings (2 for sentence pairs)
    max_positions: int  # P: rows of position_embeddings; bounds the sequence length
    layer_norm_eps: float = 1e-12  # variance epsilon of every LayerNorm
    num_labels: int = 2  # C: classifier outputs (2 for MRPC)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "layer_norm_eps" and (not isinstance(value, int) or value < 1):
                raise ModelFormatError(f"model shape: {field.name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ModelFormatError(
                f"model shape: hidden size {self.hidden} does not divide into {self.heads} attention heads"
            )
        if not 0.0 < float(self.layer_norm_eps) < 1e-2:
            raise ModelFormatError(f"model shape: implausible layer_norm_eps {self.layer_norm_eps!r}")

    @property
    def head_size(self) -> int:
        """D, the width of one attention head."""
        return self.hidden // self.heads

    def check_seq_length(self, flag: str, seq_length: int) -> None:
        """ConfigError naming ``flag`` when ``seq_length`` exceeds the position embeddings (P rows)."""
        if seq_length > self.max_positions:
            raise ConfigError(f"{flag} {seq_length} exceeds the model's {self.max_positions} position embeddings")

    def to_dict(self) -> dict:
        """The manifest's ``model`` section."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BertShape":
        """Inverse of :meth:`to_dict`; unknown keys are an error (typos hide bugs)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelFormatError(f"model shape: unknown keys {unknown}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ModelFormatError(f"model shape: lacks {', '.join(missing)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelFormatError(f"model shape: {exc}") from None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the classifier, google-research name -> shape."""
        H, I = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {
            f"{EMBEDDINGS}/word_embeddings": (self.vocab_size, H),
            f"{EMBEDDINGS}/token_type_embeddings": (self.type_vocab_size, H),
            f"{EMBEDDINGS}/position_embeddings": (self.max_positions, H),
            f"{EMBEDDINGS}/LayerNorm/gamma": (H,),
            f"{EMBEDDINGS}/LayerNorm/beta": (H,),
        }
        for k in range(self.layers):
            p = f"bert/encoder/layer_{k}"
            for dense, (n_in, n_out) in {
                "attention/self/query": (H, H),
                "attention/self/key": (H, H),
                "attention/self/value": (H, H),
                "attention/output/dense": (H, H),
                "intermediate/dense": (H, I),
                "output/dense": (I, H),
            }.items():
                shapes[f"{p}/{dense}/kernel"] = (n_in, n_out)
                shapes[f"{p}/{dense}/bias"] = (n_out,)
            for ln in ("attention/output/LayerNorm", "output/LayerNorm"):
                shapes[f"{p}/{ln}/gamma"] = (H,)
                shapes[f"{p}/{ln}/beta"] = (H,)
        shapes[f"{POOLER}/kernel"] = (H, H)
        shapes[f"{POOLER}/bias"] = (H,)
        # run_classifier.create_model: logits = pooled @ output_weights^T + output_bias
        shapes["output_weights"] = (self.num_labels, H)
        shapes["output_bias"] = (self.num_labels,)
        return shapes


# Preset sizes for the demo model. `large` is the BERT-Large shape
# (24 x 1024, 16 heads, ~335M parameters); `base` is BERT-Base (~110M).
# `tiny` keeps the real layout at a size that builds and runs in a second.
PRESETS: dict[str, BertShape] = {
    "tiny": BertShape(layers=2, hidden=64, heads=4, intermediate=256, vocab_size=2048,
                      type_vocab_size=2, max_positions=512),
    "base": BertShape(layers=12, hidden=768, heads=12, intermediate=3072, vocab_size=30522,
                      type_vocab_size=2, max_positions=512),
    "large": BertShape(layers=24, hidden=1024, heads=16, intermediate=4096, vocab_size=30522,
                       type_vocab_size=2, max_positions=512),
}
