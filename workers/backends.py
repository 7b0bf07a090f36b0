"""Model backends a worker can serve: ``echo``, ``tf`` and ``neuron``.

Every backend maps int32 features [B, S] to float32 probabilities [B, 2]:

    B  batch (the backend's fixed ``batch_size`` when it has one)
    S  sequence length (``seq_length``, 128 for the run_classifier export)

TensorFlow is imported lazily so the echo backend (and the whole pool) runs
without it.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.errors import ConfigError, ModelFormatError
from ..common.protocol import MAX_TIMEOUT_S
from ..common.vocab import bert_vocab
from ..compile.runtime import (import_tensorflow, is_compiled_model, model_dir_kind, neuron_toolchain,
                               read_manifest, savedmodel_embedding_rows)
from . import neuron_cores

BACKENDS = ("echo", "tf", "neuron")
# Most TensorFlow intra-op threads one worker may ask for: bertpool-finetune's bound (more only hangs
# TensorFlow's thread pool start: --threads 99999 grew a worker by GBs and it never loaded). A fixed
# bound, not the host's cores: a config is valid on every host, and oversubscribing a few cores stays
# the operator's call.
MAX_THREADS = 1024
# Longest simulated echo batch: the longest wait any component takes (a day); beyond it time.sleep
# overflows mid-batch (1e308 was accepted, and failed at warm-up with a traceback).
MAX_ECHO_DELAY_MS = MAX_TIMEOUT_S * 1000


@dataclass(frozen=True)
class BackendConfig:
    name: str = "echo"              # one of BACKENDS
    model_dir: str | None = None    # SavedModel or compiled-model directory (tf, neuron)
    echo_delay_ms: float = 0.0      # echo: simulated compute time per batch
    seq_length: int = 128           # echo: sequence length it accepts
    threads: int = 0                # tf: intra-op threads for this process (0 = TF's default)

    def __post_init__(self) -> None:
        if not 0 <= self.echo_delay_ms <= MAX_ECHO_DELAY_MS:  # also NaN, which time.sleep refuses mid-batch
            raise ConfigError(f"echo_delay_ms must be a number >= 0 and at most {MAX_ECHO_DELAY_MS:.0f} "
                              f"(a day), got {self.echo_delay_ms}")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ConfigError(f"threads must be >= 0 and at most {MAX_THREADS}, got {self.threads}")


class Backend:
    """Base class: ``predict`` maps features [B,S] to probabilities [B,2]."""

    name = "base"
    batch_size: int | None = None   # fixed batch the model needs; None = any batch
    seq_length: int = 128
    vocab_path: Path | None = None  # the vocabulary the model was trained with, if known
    vocab_size: int | None = None   # rows of the model's word embeddings (the token ids it takes);
                                    # None: no model (echo), or the backend cannot tell
    vocab_checked: bool = False     # vocab_path was checked against vocab_size when the model loaded

    def predict(self, input_ids: np.ndarray, input_mask: np.ndarray,
                segment_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def model_info(self) -> dict[str, str]:
        """What READY tells the broker it serves (metric labels): ``hash`` (the source weights'
        sha256), ``dtype`` and ``target``, from a compiled model's manifest; "unknown" where the
        backend cannot tell, "none" where there is no model (echo)."""
        return {"hash": "unknown", "dtype": "unknown", "target": "unknown"}


# ----------------------------------------------------------------------- echo

@functools.lru_cache(maxsize=8)
def _echo_weights(seq: int) -> np.ndarray:
    """Per-position odd multipliers for the echo hash, int64 [seq] (below 2**31: a BERT vocabulary's ids
    x 128 positions stay within int64; beyond, numpy's wrap-around is just another deterministic hash)."""
    return (np.arange(1, 2 * seq, 2, dtype=np.int64) * 2654435761) % (1 << 31)


def echo_probabilities(input_ids: np.ndarray, input_mask: np.ndarray) -> np.ndarray:
    """The echo backend's deterministic answer for features [B,S]: float32 [B,2].

    p(paraphrase) is a hash of the real tokens (each id, where the mask is 1, weighted by its
    position), computed for the whole batch at once, so every request gets an answer that tests
    can recompute and that differs between requests.
    """
    real = input_ids * (input_mask != 0)  # [B, S], in the ids' dtype: ids x 0 or 1 cannot overflow
    p = ((real @ _echo_weights(input_ids.shape[1])) % 1_000_003 / 1_000_003.0).astype(np.float32)  # [B]
    out = np.empty((len(p), 2), np.float32)  # [B, 2]; filled in place, not stacked: fewer numpy calls
    out[:, 1] = p
    np.subtract(1.0, p, out=out[:, 0])
    return out


class EchoBackend(Backend):
    """No model: probabilities hashed from the input, after a fixed per-batch delay."""

    name = "echo"

    def __init__(self, config: BackendConfig) -> None:
        self.seq_length = config.seq_length
        self._delay_s = config.echo_delay_ms / 1000.0

    def model_info(self) -> dict[str, str]:
        return {"hash": "none", "dtype": "none", "target": "none"}

    def predict(self, input_ids, input_mask, segment_ids):
        if self._delay_s > 0:
            # A blocking sleep stands in for an accelerator call, which also blocks.
            time.sleep(self._delay_s)
        return echo_probabilities(input_ids, input_mask)


# ------------------------------------------------------------------------- tf

def _configure_tf_threads(threads: int):
    """Import TensorFlow, limiting this process to ``threads`` intra-op threads."""
    tf = import_tensorflow("the tf backend")
    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TF already initialised in this process (tests); keep its setting
    return tf


class SavedModelBackend(Backend):
    """A google-research run_classifier SavedModel, served through its signature.

    The signature takes int32 ``input_ids``, ``input_mask``, ``segment_ids``
    [N,S] and, in the original export, ``label_ids`` and ``is_real_example``
    [N] that inference ignores: those are fed zeros and ones.
    """

    name = "tf"

    def __init__(self, model_dir: Path, tf) -> None:
        try:
            loaded = tf.saved_model.load(str(model_dir))
        except Exception as exc:  # TF raises many types for a bad directory
            raise ModelFormatError(f"{model_dir}: cannot load SavedModel: {exc}") from exc
        if "serving_default" not in loaded.signatures:
            raise ModelFormatError(f"{model_dir}: SavedModel has no 'serving_default' signature")
        self._loaded = loaded  # keep the object alive: the function references its variables
        self._fn = loaded.signatures["serving_default"]
        self._tf = tf
        specs = self._fn.structured_input_signature[1]
        missing = {"input_ids", "input_mask", "segment_ids"} - set(specs)
        if missing:
            raise ModelFormatError(f"{model_dir}: signature lacks inputs {sorted(missing)}")
        self._extra = {k: v for k, v in specs.items()
                       if k not in ("input_ids", "input_mask", "segment_ids")}
        seq = specs["input_ids"].shape[-1]
        self.seq_length = int(seq) if seq is not None else 128
        batch = specs["input_ids"].shape[0]
        self.batch_size = int(batch) if batch is not None else None
        outputs = self._fn.structured_outputs
        self._output = "probabilities" if "probabilities" in outputs else next(iter(outputs))
        vocab = model_dir / "vocab.txt"
        self.vocab_path = vocab if vocab.is_file() else None
        self.vocab_size = savedmodel_embedding_rows(model_dir, tf)

    def predict(self, input_ids, input_mask, segment_ids):
        tf = self._tf
        n = input_ids.shape[0]
        feed = {"input_ids": tf.constant(input_ids, tf.int32),
                "input_mask": tf.constant(input_mask, tf.int32),
                "segment_ids": tf.constant(segment_ids, tf.int32)}
        for key, spec in self._extra.items():
            fill = 1 if key == "is_real_example" else 0
            feed[key] = tf.fill([n], tf.constant(fill, spec.dtype))
        return self._fn(**feed)[self._output].numpy().astype(np.float32, copy=False)


class CompiledBackend(Backend):
    """A directory written by ``bertpool-compile`` (it holds manifest.json)."""

    def __init__(self, model_dir: Path, name: str) -> None:
        from ..compile.runtime import load_compiled  # imports TensorFlow lazily itself

        self.name = name
        self._model = load_compiled(model_dir)
        self.batch_size = self._model.batch_size
        self.seq_length = self._model.seq_length
        self.vocab_path = self._model.vocab_path
        self.vocab_size = self._model.shape.vocab_size
        self.vocab_checked = True  # load_compiled checks its vocab.txt against the embeddings

    def predict(self, input_ids, input_mask, segment_ids):
        return self._model.predict(input_ids, input_mask, segment_ids)

    def model_info(self) -> dict[str, str]:
        manifest = self._model.manifest
        source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
        return {"hash": str(source.get("sha256") or "unknown"), "dtype": str(manifest.get("dtype") or "unknown"),
                "target": str(manifest.get("target") or "unknown")}


def _model_dir(config: BackendConfig) -> Path:
    if not config.model_dir:
        raise ConfigError(f"the {config.name} backend needs --model DIR")
    path = Path(config.model_dir)
    if not path.is_dir():
        raise ConfigError(f"--model {path}: not a directory")
    return path


def _compiled_manifest(path: Path) -> dict | None:
    """The manifest of a bertpool-compile directory (its ``target`` says what it was built for), or
    None for any other directory."""
    return read_manifest(path) if is_compiled_model(path) else None


def _load_tf(config: BackendConfig) -> Backend:
    path = _model_dir(config)
    tf = _configure_tf_threads(config.threads)
    manifest = _compiled_manifest(path)
    if manifest is not None:
        if manifest["target"] == "neuron":
            raise ConfigError(f"{path} was compiled for Neuron; serve it with --backend neuron")
        return CompiledBackend(path, "tf")
    if not (path / "saved_model.pb").is_file():
        raise ModelFormatError(f"{path}: neither a compiled bertpool model (manifest.json) "
                               "nor a SavedModel (saved_model.pb)")
    return SavedModelBackend(path, tf)


def _load_neuron(config: BackendConfig) -> Backend:
    """A ``--target neuron`` compiled model, run by the Neuron package it was compiled with
    (imported by load_compiled from the manifest; BackendUnavailable where it does not import).
    A model compiled for another NeuronCore generation than the host's is a ModelFormatError here,
    before TensorFlow or the package is imported (see :func:`_check_neuron_host`)."""
    path = _model_dir(config)
    manifest = _compiled_manifest(path)
    if manifest is None:
        raise ModelFormatError(f"{path}: not a compiled model; run bertpool-compile --target neuron")
    if manifest["target"] != "neuron":
        raise ConfigError(f"{path} was compiled for {manifest['target']}, not Neuron; serve it with --backend tf")
    # The driver's own path, looked up at call time: serve's --neuron-sysfs does not reach the workers.
    _check_neuron_host(path, manifest, neuron_cores.NEURON_SYSFS, os.environ)
    _configure_tf_threads(config.threads)
    return CompiledBackend(path, "neuron")


def _check_neuron_host(path: Path, manifest: dict, sysfs_root: str, environ) -> None:
    """Refuse the model at ``path`` (its ``manifest``) when its toolchain (the manifest's neuron.family)
    cannot run on this host's NeuronCores, read from the driver's files under ``sysfs_root``: otherwise
    the runtime loads it and fails only at the warm-up batch, with an untyped TensorFlow OpError. A
    manifest naming no toolchain is left to load_compiled, which refuses it with its own message."""
    toolchain = neuron_toolchain(manifest)
    if toolchain is not None:
        neuron_cores.check_model_family(path, toolchain.family, toolchain.distribution, sysfs_root, environ)


ECHO_WARNING = ("echo backend: answers are NOT a model's (probabilities are a hash of the tokens); "
                "pass --model DIR to serve a model")


def choose_backend(requested: str | None, model_dir: str | None) -> str:
    """The backend to run: ``requested``, or chosen from ``model_dir`` when None.

    A model directory is always served by a model: ``tf``, or ``neuron`` when it
    was compiled with ``--target neuron``. Echo runs only when asked for or when
    no model is given; asking for echo with a model, or for a model backend
    without one, is a ConfigError (never a quiet substitute).
    """
    if requested is not None and requested not in BACKENDS:
        raise ConfigError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "echo" and model_dir:
        raise ConfigError(f"--backend echo serves no model, but --model {model_dir} was given; "
                          f"drop --backend to serve the model, or drop --model")
    if requested is not None:
        if requested != "echo" and not model_dir:
            raise ConfigError(f"the {requested} backend needs --model DIR")
        return requested
    if not model_dir:
        return "echo"
    if model_dir_kind(model_dir) == "compiled":
        return "neuron" if read_manifest(model_dir)["target"] == "neuron" else "tf"
    return "tf"


def load_backend(config: BackendConfig) -> Backend:
    """Build the backend ``config.name`` names; raise a typed error if it cannot be served."""
    if config.name == "echo":
        return EchoBackend(config)
    if config.name == "tf":
        return _load_tf(config)
    if config.name == "neuron":
        return _load_neuron(config)
    raise ConfigError(f"unknown backend {config.name!r}; choose one of {', '.join(BACKENDS)}")


def run_padded(backend: Backend, input_ids: np.ndarray, input_mask: np.ndarray,
               segment_ids: np.ndarray, batch_size: int,
               dummy_tokens: tuple[int, int] = (101, 102)) -> np.ndarray:
    """Run ``n`` real rows (features [n, S] each) through the backend in batches of its fixed
    size (see :func:`run_rows`); float32 [n, 2] for the real rows only."""
    return run_rows(backend, np.stack((input_ids, input_mask, segment_ids), axis=1), batch_size, dummy_tokens)


@functools.lru_cache(maxsize=64)
def _dummy_rows(padded: int, seq: int, cls_id: int, sep_id: int) -> np.ndarray:
    """Features int32 [3, padded, S] of dummy rows only, read-only: ``[CLS] [SEP]``, mask on those two
    tokens (a minimal valid sequence, so no model sees an all-masked row). run_rows copies it and
    writes its real rows over the first ones: one numpy call, where filling the padding took four."""
    rows = np.zeros((3, padded, seq), np.int32)
    rows[0, :, 0], rows[0, :, 1] = cls_id, sep_id
    rows[1, :, :2] = 1
    rows.flags.writeable = False
    return rows


def run_rows(backend: Backend, rows, batch_size: int, dummy_tokens: tuple[int, int] = (101, 102)) -> np.ndarray:
    """Run ``n`` real rows through the backend in batches of its fixed size.

    ``rows``: n int32 arrays [3, S] (input_ids, input_mask, segment_ids of one
    row), or one array [n, 3, S]. They are padded with dummy rows
    (``dummy_tokens`` = the [CLS] and [SEP] ids, mask on those two tokens) up
    to a multiple of ``batch_size`` (or of the backend's own fixed batch);
    dummy outputs are dropped, so the result is float32 [n, 2].
    """
    n = len(rows)
    step = backend.batch_size or batch_size
    padded = -(-n // step) * step
    features = _dummy_rows(padded, rows[0].shape[-1], *dummy_tokens).copy()  # ids, mask, segs: each [padded, S]
    for i, row in enumerate(rows):
        features[:, i] = row  # a whole row: nothing of the dummy under it is left
    ids, mask, segs = features
    out = [backend.predict(ids[i:i + step], mask[i:i + step], segs[i:i + step])
           for i in range(0, padded, step)]
    probs = out[0] if len(out) == 1 else np.concatenate(out, axis=0)
    assert probs.shape == (padded, 2), probs.shape
    return probs[:n]


# -------------------------------------------------------------- vocabularies

def fallback_vocab_path() -> Path:
    """A tiny character-level WordPiece vocabulary for model-less backends (echo).

    Covers ASCII letters, digits and punctuation (each also as a ``##``
    continuation), so any ASCII text tokenizes; other characters become [UNK].
    Written once per process into a temporary directory.
    """
    path = Path(tempfile.gettempdir()) / f"bertpool-echo-vocab-{os.getuid()}.txt"
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    text = "".join(t + "\n" for t in bert_vocab(chars + ["##" + c for c in chars]))
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: several workers may race here
    return path
