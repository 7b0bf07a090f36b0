"""Reference pairs: a compiled model checks its own binary before it serves.

The equivalence proof of a neuron build runs the rebuilt graph on the CPU: the
compiled Neuron binary can only run on a NeuronCore, which the build host may
not have. So the build stores a few tokenized pairs with the rebuilt graph's
probabilities (``reference.npz``), and :func:`check_reference` runs the loaded
binary on them when a worker loads the model, before it says READY. A binary
that disagrees by more than its dtype's bound (the proof's bound: the binary and
the CPU graph multiply in the same dtype) is refused with BinaryMismatchError.

No TensorFlow here: this module is imported by the serving hot path.
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np

from ..common.errors import BinaryMismatchError, EquivalenceError, ModelFormatError
from .writing import writing

REFERENCE_FILE = "reference.npz"
REFERENCE_PAIRS = 8  # two batches of the default 4: cheap at load, and exercises batching
FEATURE_KEYS = ("input_ids", "input_mask", "segment_ids")


def write_reference(model_dir: pathlib.Path, features, rebuilt, tolerance: float, rebuilt_name: str) -> dict:
    """Run ``rebuilt`` (a CompiledModel) on the first REFERENCE_PAIRS rows of ``features`` and store
    inputs and probabilities in ``model_dir/reference.npz``; returns the manifest's ``reference`` section.
    EquivalenceError when a probability is not finite: no bound can prove such a model."""
    rows = slice(0, REFERENCE_PAIRS)
    arrays = {key: np.asarray(getattr(features, key)[rows], np.int32) for key in FEATURE_KEYS}
    probabilities = rebuilt.predict(*(arrays[key] for key in FEATURE_KEYS))
    if not np.isfinite(probabilities).all():  # (else the proof's own load of the output blames its binary)
        raise EquivalenceError(f"{rebuilt_name} gives non-finite probabilities (NaN or inf) on the reference "
                               f"pairs: it is not the original's function (an overflow in its dtype?)")
    with writing(model_dir / REFERENCE_FILE):
        np.savez(model_dir / REFERENCE_FILE, probabilities=probabilities, **arrays)
    return {"file": REFERENCE_FILE, "pairs": int(len(probabilities)), "tolerance": float(tolerance),
            "from": rebuilt_name}


def check_reference(model, section: dict) -> float:
    """Run ``model`` on the stored pairs; return max |dp|, or raise BinaryMismatchError past the bound.

    ModelFormatError when the file is missing or malformed.
    """
    path = pathlib.Path(model.model_dir) / section.get("file", REFERENCE_FILE)
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in (*FEATURE_KEYS, "probabilities")}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelFormatError(f"cannot read the reference pairs {path}: {type(exc).__name__}: {exc}") from None
    got = model.predict(*(arrays[key] for key in FEATURE_KEYS))
    diff = float(np.max(np.abs(got.astype(np.float64) - arrays["probabilities"])))
    tolerance = float(section["tolerance"])
    if not (np.isfinite(diff) and diff <= tolerance):
        raise BinaryMismatchError(
            f"{model.model_dir}: the loaded {model.target} binary disagrees with its {len(got)} reference pairs "
            f"(max |dp| = {diff:.3g} > {tolerance:.3g}, the {model.manifest.get('dtype')} bound); the binary is "
            f"not the graph that was proven equivalent, or this device computes it differently: recompile it")
    return diff
