"""GELU: the one list of kinds bertpool knows, their check, and the formulas its graphs share.

    erf    exact: x * Phi(x) (HF "gelu", early google-research)
    tanh   the tanh approximation (google-research modeling.py, HF "gelu_new")
    crude  x * sigmoid(1.702 x) (the Neuron demo's --crude_gelu)

:func:`gelu` is what the fine-tuned (:mod:`.finetune`) and the rebuilt (:mod:`.rebuild`)
graphs compute, op for op, so fine-tuning stays bit-reproducible. :mod:`.reference`
keeps its own formulas on purpose: it is the independent model the rebuilt one is
proved against, so it shares only :data:`GELUS` and :func:`check_gelu`.
"""

from __future__ import annotations

import math

from ..common.errors import ConfigError

GELUS = ("erf", "tanh", "crude")


def check_gelu(kind: str, what: str = "GELU") -> str:
    """``kind`` if it is one of :data:`GELUS`, else ConfigError naming ``what`` (e.g. "source gelu")."""
    if kind not in GELUS:
        raise ConfigError(f"unknown {what} {kind!r}; expected one of {', '.join(GELUS)}")
    return kind


def gelu(x, kind: str):
    """GELU of ``kind`` on a float32 tensor ``x`` (TF ops; eager, graph or tf.function)."""
    import tensorflow as tf

    check_gelu(kind)
    if kind == "erf":
        return 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0)))
    if kind == "tanh":
        return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    return x * tf.sigmoid(1.702 * x)  # crude
