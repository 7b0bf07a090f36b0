"""Load and run a model written by ``bertpool-compile`` (the serving hot path).

A compiled model directory holds::

    manifest.json     what it is: written by .build (``_manifest``), checked by :func:`read_manifest`
                      (MANIFEST_VERSION, REQUIRED_KEYS)
    vocab.txt         the WordPiece vocabulary the model was trained with
    embeddings.npz    host part: word/token type/position embeddings + LayerNorm (fp32)
    accelerated/      the rebuilt encoder+pooler+classifier: a TF SavedModel (cpu, gpu)
                      or a tensorflow-neuron / -neuronx traced model (neuron)
    reference.npz     a few tokenized pairs and the rebuilt graph's probabilities, which
                      the loaded binary must reproduce before it serves (.selfcheck)

``load_compiled(dir).predict(ids, mask, segments)`` runs embeddings on the host
(numpy fp32), the accelerated part, then softmax on the host (fp32).

TensorFlow is imported lazily (inside :func:`load_compiled`), so importing this
module is cheap and works where TensorFlow is not installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from collections.abc import MutableMapping

import numpy as np

from ..common.errors import BackendUnavailable, ConfigError, ModelFormatError
from .host import HostEmbeddings, mask_bias, softmax
from .gelu import GELUS
from .rebuild import DTYPES
from .selfcheck import REFERENCE_FILE, check_reference
from .shape import EMBEDDINGS, BertShape
from .vocab import check_vocab

MANIFEST = "manifest.json"
BUCKET_SIGNATURE = "serving_s"  # cpu/gpu: signature "serving_s64" runs sequences cut to 64
EMBEDDINGS_FILE = "embeddings.npz"
ACCELERATED_DIR = "accelerated"
VOCAB_FILE = "vocab.txt"
MANIFEST_VERSION = 1
TARGETS = ("neuron", "cpu", "gpu")
# The largest batch anything here builds, serves or trains (compile's, the workers' and finetune's
# --batch-size): a batch is a latency trade-off, and at 1024 a base model's activations at 512 tokens
# already take GiBs (the attention scores alone, [B, heads, S, S] fp32: 12 GiB); nothing larger fits.
MAX_BATCH_SIZE = 1024
REQUIRED_KEYS = ("format_version", "model", "batch_size", "seq_length", "target", "dtype", "gelu")


def is_compiled_model(path) -> bool:
    """True when ``path`` is a directory holding a manifest.json (a bertpool-compile output)."""
    path = pathlib.Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


def model_dir_kind(model_dir) -> str:
    """``"compiled"`` (a bertpool-compile output) or ``"savedmodel"``: the two kinds of model directory
    bertpool serves; ConfigError/ModelFormatError for anything else (nothing to serve)."""
    path = pathlib.Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"--model {path}: not a directory")
    if is_compiled_model(path):
        return "compiled"
    if not (path / "saved_model.pb").is_file():
        raise ModelFormatError(f"--model {path}: neither a compiled bertpool model ({MANIFEST}) nor a "
                               f"SavedModel (saved_model.pb); nothing to serve")
    return "savedmodel"


def read_manifest(model_dir) -> dict:
    """The parsed, minimally validated manifest; ModelFormatError if absent or malformed."""
    model_dir = pathlib.Path(model_dir)
    path = model_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{model_dir} is not a compiled model: no {MANIFEST}") from None
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ModelFormatError(f"{path} lacks {', '.join(missing)}")
    if type(manifest["format_version"]) is not type(MANIFEST_VERSION) or manifest["format_version"] != MANIFEST_VERSION:
        raise ModelFormatError(f"{path}: format_version {manifest['format_version']!r} is not supported "
                               f"(this bertpool reads {MANIFEST_VERSION}); recompile the model")
    if manifest["target"] not in TARGETS:
        raise ModelFormatError(f"{path}: unknown target {manifest['target']!r}")
    for key, least in (("batch_size", 1), ("seq_length", 3)):
        value = manifest[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ModelFormatError(f"{path}: {key} must be a whole number >= {least}, got {value!r}")
    if not isinstance(manifest["model"], dict):
        raise ModelFormatError(f"{path}: model must be an object, got {manifest['model']!r}")
    # What the rebuild wrote: a damaged or hand-edited value would change what the model computes, or
    # load a file from elsewhere, without a word.
    if manifest["dtype"] not in DTYPES:
        raise ModelFormatError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {manifest['dtype']!r}")
    if manifest["gelu"] not in GELUS:
        raise ModelFormatError(f"{path}: gelu must be one of {', '.join(GELUS)}, got {manifest['gelu']!r}")
    if manifest.get("do_lower_case") is not None and not isinstance(manifest["do_lower_case"], bool):
        raise ModelFormatError(f"{path}: do_lower_case must be true, false or null, got {manifest['do_lower_case']!r}")
    _check_buckets(path, manifest)
    _check_reference_section(path, manifest.get("reference"))
    equivalence = manifest.get("equivalence")
    if equivalence is not None and not (isinstance(equivalence, dict) and isinstance(equivalence.get("passed"), bool)):
        raise ModelFormatError(f"{path}: equivalence must be null or an object with passed true or false")
    return manifest


def _check_reference_section(path: pathlib.Path, section) -> None:
    """ModelFormatError unless the reference section is absent, null or an object whose ``file`` (if
    given) is a plain file name in the model directory and whose ``tolerance`` is a finite number > 0."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise ModelFormatError(f"{path}: reference must be an object, got {section!r}")
    name = section.get("file", REFERENCE_FILE)
    if not isinstance(name, str) or not name or pathlib.PurePath(name).name != name or name in (".", ".."):
        raise ModelFormatError(f"{path}: reference.file must be a file name in the model directory, got {name!r}")
    tolerance = section.get("tolerance")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < math.inf:
        raise ModelFormatError(f"{path}: reference.tolerance must be a finite number > 0, got {tolerance!r}")


def _check_buckets(path: pathlib.Path, manifest: dict) -> None:
    """ModelFormatError unless seq_buckets is absent, null or a list of whole numbers (which lengths
    were compiled is checked against the binary's signatures when it loads), and a neuron model's is
    its seq_length alone (a traced binary has one fixed shape)."""
    buckets = manifest.get("seq_buckets")
    if buckets is None:
        return
    if not isinstance(buckets, list) or any(isinstance(b, bool) or not isinstance(b, int) for b in buckets):
        raise ModelFormatError(f"{path}: seq_buckets must be a list of whole numbers, got {buckets!r}")
    if manifest["target"] == "neuron" and set(buckets) - {manifest["seq_length"]}:
        raise ModelFormatError(f"{path}: seq_buckets {buckets} do not match the model's compiled shape: a "
                               f"neuron model runs at its seq_length {manifest['seq_length']} alone")


class CompiledModel:
    """A loaded compiled model. ``predict`` is thread-safe.

    Attributes: ``batch_size`` and ``seq_length`` (the fixed compiled shape),
    ``manifest`` (dict), ``vocab_path``, ``target``, ``shape`` (BertShape),
    ``do_lower_case``.
    """

    def __init__(self, model_dir: pathlib.Path, manifest: dict, embeddings: HostEmbeddings, accelerated) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.batch_size = int(manifest["batch_size"])
        self.seq_length = int(manifest["seq_length"])
        self.target = manifest["target"]
        self.shape = BertShape.from_dict(manifest["model"])
        self.vocab_path = model_dir / VOCAB_FILE
        self.do_lower_case = manifest.get("do_lower_case")
        # Sequence lengths compiled, ascending; the last is seq_length (older manifests: that alone).
        self.seq_buckets = sorted(int(b) for b in manifest.get("seq_buckets") or [self.seq_length])
        self._embeddings = embeddings
        self._accelerated = accelerated  # (embeddings [B,S',H], bias [B,1,1,S']) -> logits [B,C], S' a bucket

    def logits(self, input_ids, input_mask, segment_ids) -> np.ndarray:
        """float32 logits [N,C] for int32 inputs [N,S]; N may be anything >= 1.

        Rows are run batch_size at a time; a short last batch is padded with
        copies of its first row (the padded rows' outputs are dropped).
        """
        ids, mask, segments = (self._check(name, a) for name, a in
                               (("input_ids", input_ids), ("input_mask", input_mask), ("segment_ids", segment_ids)))
        if not (len(ids) == len(mask) == len(segments)):
            raise ValueError("input_ids, input_mask and segment_ids differ in their number of rows")
        B, n = self.batch_size, len(ids)
        out = np.empty([n, self.shape.num_labels], np.float32)
        for start in range(0, n, B):
            rows = slice(start, min(start + B, n))
            width = self.bucket_for(mask[rows])
            chunk = [_pad_rows(a[rows, :width], B) for a in (ids, mask, segments)]  # [B,S'] each
            x = self._embeddings(chunk[0], chunk[2])  # [B,S',H] fp32, on the host
            logits = self._accelerated(x, mask_bias(chunk[1]))  # [B,C] fp32
            out[rows] = logits[: rows.stop - rows.start]
        return out

    def bucket_for(self, input_mask: np.ndarray) -> int:
        """The shortest compiled sequence length that holds every real token of ``input_mask`` [N,S]."""
        real = np.flatnonzero(input_mask.any(axis=0))
        need = int(real[-1]) + 1 if len(real) else 1
        return next(b for b in self.seq_buckets if b >= need)

    def predict(self, input_ids, input_mask, segment_ids) -> np.ndarray:
        """float32 probabilities [N,C] (softmax on the host in fp32); N = batch_size in serving."""
        return softmax(self.logits(input_ids, input_mask, segment_ids))

    def _check(self, name: str, array) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[1] != self.seq_length or array.shape[0] < 1:
            raise ValueError(f"{name} must have shape [N, {self.seq_length}], got {list(array.shape)}")
        if array.dtype.kind not in "iu":
            raise ValueError(f"{name} must be integers, got {array.dtype}")
        return array.astype(np.int32, copy=False)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if len(array) == rows:
        return array
    return np.concatenate([array, np.repeat(array[:1], rows - len(array), axis=0)])


def _proof_failure(equivalence: dict) -> str:
    """Which stage of a failed proof (the manifest's ``equivalence``) failed, and what to do."""
    twin = equivalence.get("float32_twin")
    if isinstance(twin, dict) and not twin.get("passed", False):
        # Below float32 the graph's float32 twin is proven first: failing it is no rounding matter.
        return (f"its float32 twin, the same graph computed in float32, is off by max |dp| "
                f"{twin.get('max_abs_diff')} > tolerance {twin.get('tolerance')}: the rebuilt graph differs from "
                f"the original, not by rounding; a looser --tolerance does not apply to it")
    return (f"max |dp| {equivalence.get('max_abs_diff')} > tolerance {equivalence.get('tolerance')}; recompile "
            f"it (see bertpool-compile --tolerance)")


def load_compiled(model_dir, check_equivalence: bool = True, warm_up: bool = True) -> CompiledModel:
    """Load a compiled model directory.

    Raises ModelFormatError for a missing/incomplete directory, or one whose
    equivalence proof failed (unless ``check_equivalence`` is False),
    BackendUnavailable when the target's runtime (tensorflow, or the Neuron
    package the model was compiled with) cannot be imported, and
    BinaryMismatchError when the loaded binary disagrees with the reference pairs
    stored beside it. ``warm_up`` runs those pairs (the first call also pays for
    XLA compilation or the Neuron load), or a dummy batch for a model without them;
    a neuron model must have them.
    """
    model_dir = pathlib.Path(model_dir)
    manifest = read_manifest(model_dir)
    equivalence = manifest.get("equivalence")
    if check_equivalence and isinstance(equivalence, dict) and not equivalence.get("passed", False):
        raise ModelFormatError(f"{model_dir} failed its equivalence proof ({_proof_failure(equivalence)})")
    for name in (EMBEDDINGS_FILE, VOCAB_FILE, ACCELERATED_DIR):
        if not (model_dir / name).exists():
            raise ModelFormatError(f"{model_dir} is incomplete: no {name}")
    if manifest["target"] == "neuron" and not isinstance(manifest.get("reference"), dict):
        raise ModelFormatError(f"{model_dir}: a neuron model must carry reference pairs to check its binary "
                               f"against; recompile it with this bertpool")
    shape = BertShape.from_dict(manifest["model"])
    embeddings = HostEmbeddings.load(model_dir / EMBEDDINGS_FILE, int(manifest["seq_length"]),
                                     shape.layer_norm_eps)
    if (embeddings.vocab_size, embeddings.hidden) != (shape.vocab_size, shape.hidden):
        raise ModelFormatError(f"{model_dir}: embeddings.npz does not match the manifest's model shape")
    # A vocab.txt cut short (or another model's) would tokenize to the wrong rows: wrong answers, no error.
    check_vocab(model_dir / VOCAB_FILE, shape.vocab_size, fix="the model directory is damaged; recompile it")
    loader = _load_neuron if manifest["target"] == "neuron" else _load_tf
    accelerated = loader(model_dir / ACCELERATED_DIR, manifest)
    model = CompiledModel(model_dir, manifest, embeddings, accelerated)
    if warm_up and isinstance(manifest.get("reference"), dict):
        check_reference(model, manifest["reference"])
    if warm_up:
        _warm_buckets(model)
    return model


def _warm_buckets(model: CompiledModel) -> None:
    """One dummy batch per sequence bucket, so that no request pays for its XLA compilation."""
    for length in model.seq_buckets:
        ids = np.zeros([model.batch_size, model.seq_length], np.int32)
        mask = np.zeros_like(ids)
        mask[:, :length] = 1
        model.logits(ids, mask, ids)


def quiet_tensorflow(env: MutableMapping[str, str] | None = None) -> None:
    """Keep TensorFlow's chatter out of a command's own output: its C++ INFO and WARNING lines
    (``TF_CPP_MIN_LOG_LEVEL=2``; ERRORs still show) unless someone chose a level, and, for this
    process (``env`` None), its Python deprecation notices (the v1 API the compiler uses). With
    ``env`` (a child's environment) only the variable is set there. Call it before TensorFlow is
    imported: the C++ level is read then."""
    if env is not None:
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def import_tensorflow(who: str = "a compiled model"):
    """``import tensorflow``, or BackendUnavailable saying that ``who`` needs it and how to install it
    (the one place that message is written; the serving backends use it too)."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise BackendUnavailable(f"{who} needs TensorFlow ({exc}): pip install 'bertpool[tf]'") from None
    return tf


def _load_tf(path: pathlib.Path, manifest: dict):
    """The cpu/gpu SavedModel's serving signatures as one numpy -> numpy function."""
    tf = import_tensorflow()
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, KeyError, ValueError, tf.errors.OpError) as exc:
        raise ModelFormatError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
    fns = _bucket_signatures(path, loaded.signatures, manifest)
    output = manifest.get("output_key", "logits")

    def run(embeddings: np.ndarray, bias: np.ndarray) -> np.ndarray:
        # One concrete function per sequence bucket, each with a fixed input signature: no retracing.
        result = fns[embeddings.shape[1]](embeddings=tf.constant(embeddings), mask_bias=tf.constant(bias))
        return result[output].numpy()

    run.loaded = loaded  # keep the trackable object (and its variables) alive
    return run


def _bucket_signatures(path: pathlib.Path, signatures, manifest: dict) -> dict:
    """{sequence length: the signature compiled for it} for the manifest's seq_length
    ("serving_default") and each of its seq_buckets ("serving_s<length>").

    ModelFormatError naming the signatures the model has when one is missing or compiled for another
    shape (a manifest edited, or another model's): else a KeyError, or a shape error mid-request.
    """
    batch = manifest["batch_size"]
    wanted = {manifest["seq_length"]: "serving_default"}
    for length in manifest.get("seq_buckets") or []:
        wanted.setdefault(length, f"{BUCKET_SIGNATURE}{length}")
    compiled = {name: _signature_shape(fn) for name, fn in signatures.items()}
    if all(compiled.get(name) == (batch, length) for length, name in wanted.items()):
        return {length: signatures[name] for length, name in wanted.items()}
    have = ", ".join(f"{name} (batch {shape[0]} x seq {shape[1]})" if shape else f"{name} (other inputs)"
                     for name, shape in sorted(compiled.items(), key=lambda item: item[1] or (0, 0)))
    raise ModelFormatError(
        f"{path.parent / MANIFEST}: its batch_size {batch}, seq_length {manifest['seq_length']} and seq_buckets "
        f"{manifest.get('seq_buckets')} do not match the model's compiled signatures: {have or 'none'}; "
        f"the manifest was edited or belongs to another model: recompile it")


def _signature_shape(fn) -> tuple[int, int] | None:
    """(batch, sequence length) a serving signature was compiled for: its ``embeddings`` input's
    first two dimensions; None for a signature without a fixed [B, S, H] embeddings input."""
    spec = fn.structured_input_signature[1].get("embeddings")
    if spec is None or spec.shape.rank != 3 or None in spec.shape.as_list()[:2]:
        return None
    return tuple(spec.shape.as_list()[:2])


def neuron_toolchain(manifest: dict):
    """The Neuron toolchain (compile.neuron.Toolchain: family, distribution, ...) a neuron manifest
    names, for the serving side, which may not import compile.neuron itself; None where it names
    none (load_compiled refuses such a model, with its own message)."""
    from . import neuron

    try:
        return neuron.runtime_toolchain(manifest)
    except ModelFormatError:
        return None


def _load_neuron(path: pathlib.Path, manifest: dict):
    """The traced model, loaded with the Neuron package it was compiled with (which registers NeuronOp)."""
    from . import neuron

    tf = import_tensorflow()
    neuron.import_package(neuron.runtime_toolchain(manifest))
    model = neuron.load_traced(tf, str(path))
    expected = (int(manifest["batch_size"]), int(manifest["model"]["num_labels"]))

    def run(embeddings: np.ndarray, bias: np.ndarray) -> np.ndarray:
        # Traced with ONE list of example inputs: the saved model accepts exactly that structure.
        logits = np.asarray(model([tf.constant(embeddings), tf.constant(bias)]), np.float32)
        if logits.shape != expected:
            raise ModelFormatError(f"{path} returned logits of shape {list(logits.shape)}, not {list(expected)}")
        return logits

    run.loaded = model
    return run


def savedmodel_embedding_rows(model_dir: pathlib.Path, tf) -> int | None:
    """Rows of a run_classifier SavedModel's word embeddings (the token ids it takes), from its
    variables checkpoint's index (no tensor is read); None for a SavedModel that names no such variable."""
    try:
        shapes = tf.train.load_checkpoint(str(model_dir / "variables" / "variables")).get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError):
        return None
    shape = shapes.get(f"{EMBEDDINGS}/word_embeddings")
    return int(shape[0]) if shape else None
