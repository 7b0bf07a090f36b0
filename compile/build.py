"""Compile a fine-tuned BERT classifier into a servable directory (the pipeline).

    read weights (any format) -> check vocab -> rebuild -> export for the target
    -> equivalence proof -> manifest.json -> move into place

:func:`compile_model` is the programmatic entry point; :mod:`.cli` wraps it.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import time
from dataclasses import dataclass, field

from .. import __version__
from ..common.errors import BackendUnavailable, ConfigError, EquivalenceError, ModelFormatError
from .equivalence import compare, describe_original, load_pairs, open_original, tolerance_for
from .host import HostEmbeddings, save_embeddings
from .rebuild import DTYPES, GELUS, OUTPUT_KEY, RebuildConfig, build_module
from .runtime import (ACCELERATED_DIR, EMBEDDINGS_FILE, MANIFEST, MANIFEST_VERSION, TARGETS, VOCAB_FILE,
                      CompiledModel, load_compiled)
from .vocab import check_vocab
from .weights import BertWeights, load_weights

DEFAULT_COMPILER_ARGS = "--fp32-cast matmult"  # what the Neuron BERT demo passed to neuron-cc
DEFAULT_DTYPE = {"neuron": "float16", "cpu": "float32", "gpu": "float32"}
# Neuron packages in order of preference: inf1 (neuron-cc), then inf2/trn1 (neuronx-cc).
NEURON_PACKAGES = ("tensorflow.neuron", "tensorflow_neuronx")


@dataclass
class CompileOptions:
    """Everything bertpool-compile is asked to do (see cli.py for the flags)."""

    input: pathlib.Path  # SavedModel, checkpoint dir/prefix, or HF dir
    output: pathlib.Path  # directory to write
    target: str = "cpu"  # neuron, cpu or gpu
    dtype: str | None = None  # matmul dtype; None = DEFAULT_DTYPE[target]
    gelu: str | None = None  # rebuilt GELU; None = the source's
    batch_size: int = 4  # fixed compiled batch
    seq_length: int = 128  # fixed compiled sequence length
    vocab: pathlib.Path | None = None  # None = vocab.txt inside or beside the input
    tsv: pathlib.Path | None = None  # MRPC-format pairs for the proof; None = generated
    pairs: int = 32  # pairs in the proof
    seed: int = 0  # seed of generated pairs
    tolerance: float | None = None  # None = tolerance_for(dtype, gelu, source gelu)
    compiler_args: str = DEFAULT_COMPILER_ARGS  # neuron compiler flags (NEURON_CC_FLAGS)
    verify: bool = True  # run the equivalence proof
    force: bool = False  # replace an existing output directory
    xla: str = "auto"  # auto, on or off (cpu/gpu): XLA-compile the accelerated function
    heads: int | None = None  # attention heads, when a SavedModel's graph does not tell
    source_gelu: str | None = None  # override the source's detected GELU
    progress: bool = True  # show progress bars
    log: object = field(default=print, repr=False)  # where status lines go


def neuron_package() -> str | None:
    """The first importable tensorflow-neuron package name, or None."""
    for name in NEURON_PACKAGES:
        try:
            __import__(name)
            return name
        except ImportError:
            continue
        except Exception:  # a broken install (e.g. ABI mismatch) is as good as absent
            continue
    return None


def default_target() -> str:
    """neuron when tensorflow-neuron imports, else cpu."""
    return "neuron" if neuron_package() else "cpu"


def use_xla(option: str, target: str, dtype: str) -> bool:
    """Whether to XLA-compile the accelerated function.

    auto: on for cpu/gpu except bfloat16 on cpu. Measured (2-core AVX-512 CPU,
    batch 4 x 128): fp32 tiny 2.8 -> 1.6 ms, base ~2% faster; bfloat16 base
    0.32 -> 0.73 s (XLA's CPU bf16 dot is slow), so off there. Never for neuron
    (neuron-cc compiles the graph itself).
    """
    if target == "neuron":
        return False
    if option in ("on", "off"):
        return option == "on"
    return not (target == "cpu" and dtype == "bfloat16")


def compile_model(options: CompileOptions) -> dict:
    """Run the whole pipeline; returns the manifest written to ``options.output``.

    Raises ConfigError / ModelFormatError / BackendUnavailable for bad input
    (nothing is written), EquivalenceError when the proof fails (the output is
    written, marked ``equivalence.passed: false``, and will not load).
    """
    log = options.log
    o = _validate(options)
    neuron_pkg = None
    if o.target == "neuron":
        neuron_pkg = neuron_package()
        if neuron_pkg is None:
            raise BackendUnavailable("--target neuron needs tensorflow-neuron (inf1) or tensorflow-neuronx "
                                     "(inf2/trn1), which install only from AWS's Neuron pip repository; "
                                     "use --target cpu here")
    started = time.perf_counter()
    log(f"reading {o.input}")
    weights = load_weights(o.input, heads=o.heads, source_gelu=o.source_gelu)
    shape = weights.shape
    log(f"  format {weights.source.format}: {shape.layers} layers x {shape.hidden} hidden, {shape.heads} heads, "
        f"intermediate {shape.intermediate}, vocab {shape.vocab_size}, GELU {weights.gelu}")
    for note in weights.notes:
        log(f"  note: {note}")
    _check_seq_length(o, weights)
    vocab = o.vocab or weights.vocab_path
    if vocab is None:
        raise ModelFormatError(f"no vocab.txt inside or beside {o.input} (a SavedModel export holds none); "
                               f"pass --vocab FILE")
    check_vocab(vocab, shape.vocab_size)
    from ..common.tokenizer import BertTokenizer

    tokenizer = BertTokenizer(vocab, max_seq_length=o.seq_length)
    dtype = o.dtype or DEFAULT_DTYPE[o.target]
    config = RebuildConfig(dtype=dtype, gelu=o.gelu or weights.gelu, batch_size=o.batch_size,
                           seq_length=o.seq_length, jit_compile=use_xla(o.xla, o.target, dtype))
    log(f"rebuilding for {o.target}: dtype {config.dtype}, GELU {config.gelu}, batch {config.batch_size} x "
        f"seq {config.seq_length}, XLA {'on' if config.jit_compile else 'off'}")

    staging = _staging_dir(o.output)
    try:
        module = _write_model(staging, weights, vocab, config, o, neuron_pkg)
        manifest = _manifest(o, weights, tokenizer.do_lower_case, config, neuron_pkg)
        _write_json(staging / MANIFEST, manifest)
        if o.verify:
            report = _verify(staging, weights, tokenizer, module, config, manifest, o)
            manifest["equivalence"] = report.to_dict()
            log(report.summary())
            _write_json(staging / MANIFEST, manifest)
        else:
            log("equivalence proof skipped (--no-verify)")
        _install(staging, o.output, o.force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {o.output} ({time.perf_counter() - started:.1f} s)")
    if manifest["equivalence"] is not None and not manifest["equivalence"]["passed"]:
        eq = manifest["equivalence"]
        raise EquivalenceError(f"rebuilt model differs from the original: max |dp| = {eq['max_abs_diff']:.3g} "
                               f"> tolerance {eq['tolerance']:.3g} (output kept in {o.output}, marked failed)")
    return manifest


def _validate(o: CompileOptions) -> CompileOptions:
    o.input, o.output = pathlib.Path(o.input), pathlib.Path(o.output)
    if o.target not in TARGETS:
        raise ConfigError(f"unknown target {o.target!r}; expected one of {', '.join(TARGETS)}")
    if o.dtype is not None and o.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {o.dtype!r}; expected one of {', '.join(DTYPES)}")
    for name, value, choices in (("gelu", o.gelu, GELUS), ("source gelu", o.source_gelu, GELUS),
                                 ("xla", o.xla, ("auto", "on", "off"))):
        if value is not None and value not in choices:
            raise ConfigError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
    if o.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {o.batch_size}")
    if o.seq_length < 3:
        raise ConfigError(f"--seq-length must be >= 3, got {o.seq_length}")
    if o.verify and o.pairs < 1:
        raise ConfigError(f"--pairs must be >= 1, got {o.pairs}")
    if o.tolerance is not None and not o.tolerance > 0:
        raise ConfigError(f"--tolerance must be > 0, got {o.tolerance}")
    if o.vocab is not None and not pathlib.Path(o.vocab).is_file():
        raise ConfigError(f"--vocab {o.vocab}: no such file")
    if o.tsv is not None and not pathlib.Path(o.tsv).is_file():
        raise ConfigError(f"--tsv {o.tsv}: no such file")
    if o.output.exists():
        if not o.output.is_dir():
            raise ConfigError(f"--output_saved_model {o.output} exists and is not a directory")
        if any(o.output.iterdir()) and not o.force:
            raise ConfigError(f"--output_saved_model {o.output} exists and is not empty (use --force to replace it)")
    if o.input.exists() and o.output.resolve() == o.input.resolve():
        raise ConfigError("--output_saved_model must differ from --input_saved_model")
    return o


def _check_seq_length(o: CompileOptions, weights: BertWeights) -> None:
    if o.seq_length > weights.shape.max_positions:
        raise ConfigError(f"--seq-length {o.seq_length} exceeds the model's {weights.shape.max_positions} "
                          f"position embeddings")
    fixed = weights.signature.seq_length if weights.signature else None
    if fixed is not None and fixed != o.seq_length and o.verify:
        raise ConfigError(f"the SavedModel takes sequences of {fixed}, so the equivalence proof needs "
                          f"--seq-length {fixed} (or --no-verify)")


def _staging_dir(output: pathlib.Path) -> pathlib.Path:
    """A fresh directory beside the output: the output appears complete or not at all."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _install(staging: pathlib.Path, output: pathlib.Path, force: bool) -> None:
    if output.exists():
        if any(output.iterdir()) and not force:
            raise ConfigError(f"{output} appeared while compiling; not replacing it without --force")
        shutil.rmtree(output)
    staging.rename(output)


def _write_model(staging, weights: BertWeights, vocab, config: RebuildConfig, o: CompileOptions, neuron_pkg):
    """Write embeddings.npz, vocab.txt and accelerated/; returns the rebuilt tf.Module."""
    import tensorflow as tf

    save_embeddings(staging / EMBEDDINGS_FILE, weights.tensors)
    shutil.copyfile(vocab, staging / VOCAB_FILE)
    module = build_module(weights.shape, weights.tensors, config)
    path = staging / ACCELERATED_DIR
    if o.target == "neuron":
        _trace_neuron(module, config, weights.shape.hidden, o.compiler_args, neuron_pkg, path, o.log)
    else:
        signature = module.__call__.get_concrete_function()
        tf.saved_model.save(module, str(path), signatures={"serving_default": signature})
    return module


def _trace_neuron(module, config: RebuildConfig, hidden: int, compiler_args: str, package: str,
                  path: pathlib.Path, log) -> None:
    """Compile with tensorflow-neuron's TF2 tracing API and save the traced keras model.

    Written against the documented API (tfn.trace(func, example_inputs) returns a
    keras.Model; a tuple of example inputs means func(*inputs); compiler flags
    come from NEURON_CC_FLAGS). Not run in CI: no Inferentia there.
    """
    import importlib

    import tensorflow as tf

    tfn = importlib.import_module(package)
    flags = " ".join(filter(None, [os.environ.get("NEURON_CC_FLAGS", ""), compiler_args]))
    os.environ["NEURON_CC_FLAGS"] = flags
    log(f"tracing with {package}.trace (NEURON_CC_FLAGS={flags!r}); this takes minutes for BERT-Large")
    B, S = config.batch_size, config.seq_length
    example = (tf.zeros([B, S, hidden], tf.float32), tf.zeros([B, 1, 1, S], tf.float32))

    def accelerated(embeddings, mask_bias):
        return module(embeddings, mask_bias)[OUTPUT_KEY]

    traced = tfn.trace(accelerated, example)
    ratio = getattr(traced, "on_neuron_ratio", None)
    if ratio is not None:
        log(f"  {ratio:.0%} of ops placed on Neuron")
    traced.save(str(path))


def _manifest(o: CompileOptions, weights: BertWeights, do_lower_case: bool, config: RebuildConfig,
              neuron_pkg) -> dict:
    shape = weights.shape
    return {
        "format_version": MANIFEST_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bertpool_version": __version__,
        "source": {"path": str(weights.source.path.resolve()), "format": weights.source.format,
                   "sha256": weights.source.sha256(), "gelu": weights.gelu},
        "model": shape.to_dict(),
        "dtype": config.dtype,
        "gelu": config.gelu,
        "batch_size": config.batch_size,
        "seq_length": config.seq_length,
        "target": o.target,
        "xla": config.jit_compile,
        "compiler_args": o.compiler_args if o.target == "neuron" else None,
        "neuron_package": neuron_pkg,
        "do_lower_case": do_lower_case,
        "files": {"embeddings": EMBEDDINGS_FILE, "accelerated": ACCELERATED_DIR, "vocab": VOCAB_FILE},
        "accelerated_inputs": {"embeddings": [config.batch_size, config.seq_length, shape.hidden],
                               "mask_bias": [config.batch_size, 1, 1, config.seq_length]},
        "output_key": OUTPUT_KEY,
        "equivalence": None,
    }


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _verify(staging, weights: BertWeights, tokenizer, module, config: RebuildConfig, manifest: dict,
            o: CompileOptions):
    """The equivalence proof on o.pairs pairs (see equivalence.py)."""
    import tensorflow as tf

    texts, data = load_pairs(o.tsv, o.pairs, o.seed)
    features = tokenizer.encode_pairs(texts)
    if o.target == "neuron":
        # The traced model runs only on Inferentia: check the graph that was traced, on the CPU.
        fn = module.__call__.get_concrete_function()
        embeddings = HostEmbeddings.load(staging / EMBEDDINGS_FILE, config.seq_length, weights.shape.layer_norm_eps)

        def accelerated(x, bias):
            return fn(embeddings=tf.constant(x), mask_bias=tf.constant(bias))[OUTPUT_KEY].numpy()

        rebuilt = CompiledModel(staging, manifest, embeddings, accelerated)
        rebuilt_name = f"the rebuilt graph before neuron tracing, on the CPU at {config.dtype}"
    else:
        rebuilt = load_compiled(staging, check_equivalence=False)
        rebuilt_name = f"the compiled {o.target} model loaded from disk ({config.dtype})"
    tolerance = o.tolerance or tolerance_for(config.dtype, config.gelu, weights.gelu)
    original = open_original(weights, config.seq_length)
    try:
        return compare(original, rebuilt, features, tolerance, data, describe_original(weights), rebuilt_name,
                       progress=o.progress)
    finally:
        original.close()

