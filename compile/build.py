"""Compile a fine-tuned BERT classifier into a servable directory (the pipeline).

    read weights (any format) -> check vocab -> rebuild -> export for the target
    (neuron: trace, refuse a CPU fallback) -> reference pairs -> equivalence proof
    (below float32: a float32 twin of the graph first) -> manifest.json -> move into place

:func:`compile_model` is the programmatic entry point; :mod:`.cli` wraps it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import time
from dataclasses import dataclass, field

from .. import __version__
from ..common.cli import check_output_dir, check_replaceable, replacing_dir
from ..common.data import check_seed
from ..common.errors import BackendUnavailable, BertpoolError, ConfigError, EquivalenceError, ModelFormatError
from . import neuron
from .equivalence import (TOLERANCES, check_tsv_pairs, describe_original, load_pairs, open_original, prove,
                          run_original, tolerance_for)
from .host import HostEmbeddings, save_embeddings
from .gelu import check_gelu
from .rebuild import DTYPES, OUTPUT_KEY, RebuildConfig, build_module
from .runtime import (ACCELERATED_DIR, BUCKET_SIGNATURE, EMBEDDINGS_FILE, MANIFEST, MANIFEST_VERSION, MAX_BATCH_SIZE,
                      TARGETS, VOCAB_FILE, CompiledModel, import_tensorflow, load_compiled)
from .selfcheck import REFERENCE_PAIRS, write_reference
from .vocab import check_vocab
from .weights import BertWeights, load_weights
from .writing import writing

DEFAULT_DTYPE = {"neuron": "float16", "cpu": "float32", "gpu": "float32"}
DEFAULT_BUCKET_STEP = 32  # cpu/gpu: also compile every multiple of this below seq_length
# Upper bounds, checked before any work: a typo (--batch-size 1000000000) otherwise rebuilt the model
# and then died in a numpy MemoryError (runtime.MAX_BATCH_SIZE), and --pairs 1000000000 ran until killed.
# 100000: ~25x GLUE MRPC's training set (~3700 pairs); the proof runs both models on every pair and
# holds all their tokenized features in memory, so a count beyond this costs hours and proves no more.
MAX_PAIRS = 100_000
DEFAULT_SEED = 0  # of generated pairs, when --seed is not given


@dataclass(frozen=True)
class CompileOptions:
    """Everything bertpool-compile is asked to do (see cli.py for the flags).

    Frozen: :meth:`validated` checks it and returns a copy with paths as ``pathlib.Path``.
    """

    input: pathlib.Path  # SavedModel, checkpoint dir/prefix, or HF dir
    output: pathlib.Path  # directory to write
    target: str = "cpu"  # neuron, cpu or gpu
    dtype: str | None = None  # matmul dtype; None = DEFAULT_DTYPE[target]
    gelu: str | None = None  # rebuilt GELU; None = the source's
    batch_size: int = 4  # fixed compiled batch
    seq_length: int = 128  # fixed compiled sequence length
    seq_buckets: tuple[int, ...] | None = None  # cpu/gpu: shorter lengths also compiled; None = every 32
    vocab: pathlib.Path | None = None  # None = vocab.txt inside or beside the input
    tsv: pathlib.Path | None = None  # MRPC-format pairs for the proof; None = generated
    pairs: int = 32  # pairs in the proof
    seed: int | None = None  # seed of generated pairs; None = DEFAULT_SEED (refused with tsv)
    tolerance: float | None = None  # None = tolerance_for(dtype, gelu, source gelu)
    compiler_args: str = ""  # neuron: flags after the toolchain's own, before $NEURON_CC_FLAGS
    neuron_target: str = "auto"  # neuron: inf1, inf2, trn1, or auto (by the installed compiler)
    min_on_neuron: float = neuron.DEFAULT_MIN_ON_NEURON  # neuron: least on_neuron_ratio accepted
    verify: bool = True  # run the equivalence proof
    force: bool = False  # replace an existing output directory
    xla: str = "auto"  # auto, on or off (cpu/gpu): XLA-compile the accelerated function
    heads: int | None = None  # attention heads, when a SavedModel's graph does not tell
    source_gelu: str | None = None  # override the source's detected GELU
    progress: bool = True  # show progress bars
    log: object = field(default=print, repr=False)  # where status lines go

    def validated(self) -> CompileOptions:
        """This request, checked (ConfigError naming the flag), with ``input``/``output`` as Paths."""
        return _validate(self)


@dataclass
class NeuronBuild:
    """The Neuron toolchain a neuron build uses, chosen and checked before any work."""

    toolchain: neuron.Toolchain  # inf1 or inf2/trn1
    package: object = field(repr=False)  # the imported tensorflow-neuron(x) module
    flags: str = ""  # NEURON_CC_FLAGS for the trace
    target: str = "auto"  # what --neuron-target asked for


def default_target() -> tuple[str, str]:
    """("neuron", why) when a Neuron compiler is installed and its package imports, else ("cpu", why)."""
    try:
        toolchain = neuron.choose_toolchain("auto")
        neuron.import_package(toolchain)
    except BertpoolError as exc:
        return "cpu", f"no Neuron toolchain: {exc}"
    return "neuron", f"{toolchain.compiler} and {toolchain.distribution} found ({toolchain.family})"


def _require_gpu() -> None:
    """BackendUnavailable unless TensorFlow sees a GPU: built and proven on the CPU instead, a model
    would say "gpu" in its manifest and be something else."""
    tf = import_tensorflow("--target gpu")
    if not tf.config.list_physical_devices("GPU"):
        raise BackendUnavailable("--target gpu, but TensorFlow sees no GPU here (a CUDA build of TensorFlow "
                                 "and a visible device are needed); use --target cpu")


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
    (nothing is written), ConfigError "cannot write OUTPUT: reason" when a write
    fails (a full disk, a permission lost; what was written goes, and the output is
    as it was), PlacementError when tensorflow-neuron left the encoder on the CPU
    (nothing is written), EquivalenceError when the proof fails (the output is
    written, marked ``equivalence.passed: false``, and will not load).
    """
    log = options.log
    o = options.validated()
    dtype = o.dtype or DEFAULT_DTYPE[o.target]
    nb = _neuron_build(o, dtype) if o.target == "neuron" else None
    if o.target == "gpu":
        _require_gpu()
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
        held = {"savedmodel": "a SavedModel export holds none", "checkpoint": "google-research ships it beside "
                "the checkpoint", "hf": "a tokenizer.json alone is not read"}[weights.source.format]
        raise ModelFormatError(f"no vocab.txt inside or beside {o.input} ({held}); pass --vocab FILE")
    check_vocab(vocab, shape.vocab_size)
    tokenizer = _tokenizer(vocab, o.seq_length, weights, log)
    config = RebuildConfig(dtype=dtype, gelu=o.gelu or weights.gelu, batch_size=o.batch_size,
                           seq_length=o.seq_length, jit_compile=use_xla(o.xla, o.target, dtype))
    log(f"rebuilding for {o.target}: dtype {config.dtype}, GELU {config.gelu}, batch {config.batch_size} x "
        f"seq {config.seq_length}, XLA {'on' if config.jit_compile else 'off'}")

    report = None
    with replacing_dir(o.output, o.force) as staging:
        staging.mkdir()
        module, placement = _write_model(staging, weights, vocab, config, o, nb)
        manifest = _manifest(o, weights, tokenizer.do_lower_case, config, nb, placement)
        manifest["reference"] = _write_reference(staging, weights, tokenizer, module, config, manifest, o)
        _write_json(staging / MANIFEST, manifest)
        if o.verify:
            report = _verify(staging, weights, tokenizer, module, config, manifest, o)
            manifest["equivalence"] = report.to_dict()
            log(report.summary())
            _write_json(staging / MANIFEST, manifest)
        else:
            log("equivalence proof skipped (--no-verify)")
    log(f"wrote {o.output} ({time.perf_counter() - started:.1f} s)")
    if report is not None and not report.passed:
        raise EquivalenceError(f"{report.failure()} (output kept in {o.output}, marked failed)")
    return manifest


def _tokenizer(vocab: pathlib.Path, seq_length: int, weights: BertWeights, log):
    """The tokenizer the pool will use for this model, its casing announced; ModelFormatError when the
    source's tokenizer config states the other casing (BertWeights.tokenizer)."""
    tokenizer = weights.tokenizer(vocab, seq_length)
    lower, stated = tokenizer.do_lower_case, weights.do_lower_case
    log(f"  tokenization: {'uncased' if lower else 'cased'} (do_lower_case={lower}, decided from {vocab}"
        f"{'' if stated is None else ', as tokenizer_config.json says'})")
    return tokenizer


def _neuron_build(o: CompileOptions, dtype: str) -> NeuronBuild:
    """Choose the toolchain, import its package and settle the compiler flags (typed errors, no work done)."""
    toolchain = neuron.choose_toolchain(o.neuron_target)
    flags = neuron.compiler_flags(toolchain, dtype, o.compiler_args, os.environ)
    return NeuronBuild(toolchain, neuron.import_package(toolchain), flags, o.neuron_target)


def _validate(o: CompileOptions) -> CompileOptions:
    o = dataclasses.replace(o, input=pathlib.Path(o.input), output=pathlib.Path(o.output))
    if o.target not in TARGETS:
        raise ConfigError(f"unknown target {o.target!r}; expected one of {', '.join(TARGETS)}")
    if o.dtype is not None and o.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {o.dtype!r}; expected one of {', '.join(DTYPES)}")
    for name, value in (("gelu", o.gelu), ("source gelu", o.source_gelu)):
        if value is not None:
            check_gelu(value, name)
    if o.xla is not None and o.xla not in ("auto", "on", "off"):
        raise ConfigError(f"unknown xla {o.xla!r}; expected one of auto, on, off")
    _check_shape(o)
    if not 0 <= o.min_on_neuron <= 1:
        raise ConfigError(f"--min-on-neuron must be within [0, 1], got {o.min_on_neuron}")
    if o.vocab is not None:
        _check_input_file("--vocab", o.vocab)
    o = _check_proof(o)
    check_output_dir("--output_saved_model", o.output, o.force)
    # --force replaces the output directory: never one that holds an input (a checkpoint prefix
    # included), lies inside the input, or holds the current directory.
    output = check_replaceable("--output_saved_model", o.output,
                               {"--input_saved_model": o.input, "--vocab": o.vocab, "--tsv": o.tsv})
    return dataclasses.replace(o, output=output)


def _check_shape(o: CompileOptions) -> None:
    """ConfigError naming the flag unless batch size, sequence length and buckets are in range."""
    if not 1 <= o.batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {o.batch_size}")
    if o.seq_length < 3:
        raise ConfigError(f"--seq-length must be >= 3, got {o.seq_length}")
    buckets = o.seq_buckets or ()
    if any(not 3 <= b < o.seq_length for b in buckets):
        raise ConfigError(f"--seq-buckets must lie between 3 and --seq-length {o.seq_length} (exclusive), "
                          f"got {list(buckets)}")
    if buckets and o.target == "neuron":
        raise ConfigError("--seq-buckets is for the cpu and gpu targets; a Neuron binary has one fixed shape")


def _check_proof(o: CompileOptions) -> CompileOptions:
    """The proof's flags checked (ConfigError naming the flag): seed, pairs, tolerance, and a --tsv
    that holds --pairs pairs (read to count them; without --verify, at least one). Returns ``o`` with
    its seed settled (DEFAULT_SEED when not given)."""
    if o.seed is not None:
        check_seed(o.seed)
    if o.seed is not None and o.tsv is not None:  # it would be ignored: the TSV's pairs are used in file order
        raise ConfigError("--seed seeds generated pairs; with --tsv the file's first --pairs pairs are used, "
                          "so give one or the other")
    if o.verify and not 1 <= o.pairs <= MAX_PAIRS:
        raise ConfigError(f"--pairs must be between 1 and {MAX_PAIRS}, got {o.pairs}")
    if o.tolerance is not None and not 0 < o.tolerance < float("inf"):  # inf: a proof that cannot fail
        raise ConfigError(f"--tolerance must be a finite number > 0, got {o.tolerance}")
    if o.tsv is not None:
        _check_input_file("--tsv", o.tsv)
        # A proof on fewer pairs than asked would claim more than it showed.
        check_tsv_pairs(o.tsv, o.pairs if o.verify else 1)
    return dataclasses.replace(o, seed=DEFAULT_SEED if o.seed is None else o.seed)


def _check_input_file(flag: str, path: pathlib.Path) -> None:
    """ConfigError naming ``flag`` unless ``path`` is a file: "no such file", or what it is instead."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: " + ("not a regular file" if path.exists() else "no such file"))


def _check_seq_length(o: CompileOptions, weights: BertWeights) -> None:
    weights.shape.check_seq_length("--seq-length", o.seq_length)
    fixed = weights.signature.seq_length if weights.signature else None
    if fixed is not None and fixed != o.seq_length and o.verify:
        raise ConfigError(f"the SavedModel takes sequences of {fixed}, so the equivalence proof needs "
                          f"--seq-length {fixed} (or --no-verify)")


def _write_model(staging, weights: BertWeights, vocab, config: RebuildConfig, o: CompileOptions,
                 nb: NeuronBuild | None):
    """Write embeddings.npz, vocab.txt and accelerated/; returns the rebuilt tf.Module and, for
    neuron, where the traced graph runs (else None)."""
    import tensorflow as tf

    with writing(staging / EMBEDDINGS_FILE):
        save_embeddings(staging / EMBEDDINGS_FILE, weights.tensors)
    with writing(staging / VOCAB_FILE):
        shutil.copyfile(vocab, staging / VOCAB_FILE)
    module = build_module(weights.shape, weights.tensors, config)
    path = staging / ACCELERATED_DIR
    if nb is not None:
        return module, _trace_neuron(module, config, weights.shape.hidden, nb, path, o)
    B, H = config.batch_size, weights.shape.hidden
    signatures = {"serving_default": module.__call__.get_concrete_function()}
    for length in seq_buckets(o):
        if length != config.seq_length:
            signatures[f"{BUCKET_SIGNATURE}{length}"] = module.call_at.get_concrete_function(
                tf.TensorSpec([B, length, H], tf.float32, name="embeddings"),
                tf.TensorSpec([B, 1, 1, length], tf.float32, name="mask_bias"))
    with writing(path):
        tf.saved_model.save(module, str(path), signatures=signatures)
    return module, None


def seq_buckets(o: CompileOptions) -> list[int]:
    """Every sequence length the accelerated part is compiled for, ascending, ending at seq_length.

    cpu/gpu default: every multiple of DEFAULT_BUCKET_STEP below seq_length (a batch runs at the
    shortest one its longest row fits, so padding is not computed); neuron: seq_length alone.
    """
    if o.target == "neuron":
        return [o.seq_length]
    buckets = o.seq_buckets if o.seq_buckets is not None else range(DEFAULT_BUCKET_STEP, o.seq_length,
                                                                     DEFAULT_BUCKET_STEP)
    return sorted(set(buckets) | {o.seq_length})


def _trace_neuron(module, config: RebuildConfig, hidden: int, nb: NeuronBuild, path: pathlib.Path,
                  o: CompileOptions) -> neuron.Placement:
    """Trace with ``package.trace(func, [embeddings, mask_bias])``, refuse a CPU fallback, save.

    The example inputs are ONE list, as in AWS's BERT tutorials: tensorflow-neuron
    records them as the saved model's only input structure, so the runtime calls
    the reloaded model with that list. Compiler flags reach the package only
    through $NEURON_CC_FLAGS, set for this call alone.
    """
    import tensorflow as tf

    B, S = config.batch_size, config.seq_length
    example = [tf.zeros([B, S, hidden], tf.float32), tf.zeros([B, 1, 1, S], tf.float32)]

    def accelerated(inputs):
        embeddings, mask_bias = inputs
        return module.forward(embeddings, mask_bias)[OUTPUT_KEY]

    o.log(f"tracing with {nb.package.__name__}.trace for {nb.toolchain.family} ({neuron.FLAGS_VAR}={nb.flags!r}); "
          f"this takes minutes for BERT-Large")
    with neuron.scoped_env(neuron.FLAGS_VAR, nb.flags):
        traced = nb.package.trace(accelerated, example)
    where = neuron.placement(traced)
    o.log(f"  {where.on_neuron_ratio:.1%} of ops on Neuron, in {where.neuron_ops} compiled subgraph(s)")
    neuron.check_placement(where, o.min_on_neuron)
    with writing(path):
        traced.save(str(path))
    return where


def _manifest(o: CompileOptions, weights: BertWeights, do_lower_case: bool, config: RebuildConfig,
              nb: NeuronBuild | None, placement: neuron.Placement | None) -> dict:
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
        "seq_buckets": seq_buckets(o),
        "target": o.target,
        "xla": config.jit_compile,
        "neuron": _neuron_section(nb, placement) if nb is not None else None,
        "do_lower_case": do_lower_case,
        "files": {"embeddings": EMBEDDINGS_FILE, "accelerated": ACCELERATED_DIR, "vocab": VOCAB_FILE},
        "accelerated_inputs": {"embeddings": [config.batch_size, config.seq_length, shape.hidden],
                               "mask_bias": [config.batch_size, 1, 1, config.seq_length]},
        "output_key": OUTPUT_KEY,
        "reference": None,
        "equivalence": None,
    }


def _neuron_section(nb: NeuronBuild, placement: neuron.Placement) -> dict:
    """The manifest's ``neuron`` section: what compiled it, with which flags, and where it runs."""
    t = nb.toolchain
    return {"family": t.family, "target": nb.target, "package": nb.package.__name__,
            "distribution": t.distribution, "version": neuron.package_version(t), "compiler": t.compiler,
            "compiler_path": neuron.find_compiler(t.compiler), "compiler_flags": nb.flags,
            "placement": placement.to_dict()}


def _write_json(path: pathlib.Path, data: dict) -> None:
    with writing(path):
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _cpu_rebuilt(staging, weights: BertWeights, module, config: RebuildConfig, manifest: dict) -> CompiledModel:
    """The rebuilt graph itself, run in this process on the CPU, behind the CompiledModel interface."""
    import tensorflow as tf

    embeddings = HostEmbeddings.load(staging / EMBEDDINGS_FILE, config.seq_length, weights.shape.layer_norm_eps)

    def accelerated(x, bias):  # any bucket's sequence length (manifest["seq_buckets"])
        fn = module.__call__ if x.shape[1] == config.seq_length else module.call_at
        return fn(tf.constant(x), tf.constant(bias))[OUTPUT_KEY].numpy()

    return CompiledModel(staging, manifest, embeddings, accelerated)


def _write_reference(staging, weights: BertWeights, tokenizer, module, config: RebuildConfig, manifest: dict,
                     o: CompileOptions) -> dict:
    """Store REFERENCE_PAIRS pairs with the rebuilt graph's probabilities (see selfcheck.py)."""
    texts, _ = load_pairs(o.tsv, REFERENCE_PAIRS, o.seed)
    rebuilt = _cpu_rebuilt(staging, weights, module, config, manifest)
    return write_reference(staging, tokenizer.encode_pairs(texts), rebuilt, TOLERANCES[config.dtype],
                           f"the rebuilt graph on the CPU at {config.dtype}")


def _verify(staging, weights: BertWeights, tokenizer, module, config: RebuildConfig, manifest: dict,
            o: CompileOptions):
    """The equivalence proof on o.pairs pairs (see equivalence.py): the original runs once; below
    float32, its answers prove a float32 twin of the graph first, then the model."""
    texts, data = load_pairs(o.tsv, o.pairs, o.seed)
    features = tokenizer.encode_pairs(texts)
    if o.target == "neuron":
        # The traced binary runs only on a NeuronCore: prove the graph that was traced, on the CPU;
        # the binary itself is checked against the reference pairs when a worker loads it.
        rebuilt = _cpu_rebuilt(staging, weights, module, config, manifest)
        rebuilt_name = f"the rebuilt graph before neuron tracing, on the CPU at {config.dtype}"
    else:
        rebuilt = load_compiled(staging, check_equivalence=False)
        rebuilt_name = f"the compiled {o.target} model loaded from disk ({config.dtype})"
    tolerance = o.tolerance or tolerance_for(config.dtype, config.gelu, weights.gelu)
    twin = _float32_twin(staging, weights, config, manifest)
    if twin is not None:
        o.log(f"  proof in two stages: a float32 twin of the graph (tolerance {twin[1]:.3g}: the graph), then "
              f"the {config.dtype} model (tolerance {tolerance:.3g}: rounding)")
    original = open_original(weights, config.seq_length)
    try:
        answers = run_original(original, features, rebuilt.seq_buckets, data, describe_original(weights),
                               progress=o.progress)
    finally:
        original.close()
    return prove(answers, rebuilt, tolerance, rebuilt_name, config.dtype, twin, progress=o.progress)


def _float32_twin(staging, weights: BertWeights, config: RebuildConfig, manifest: dict):
    """None at float32; below it ``(model, tolerance, name)`` for equivalence.prove: the rebuilt graph
    built again by the same code with the same options (GELU, batch, sequence, XLA), computing in
    float32, run in this process behind the runtime's host part (the staged embeddings.npz). Its bound is
    the float32 one (plus the GELU allowance only when the user chose another GELU), whatever
    --tolerance says: --tolerance sets the bound of the model at --dtype."""
    if config.dtype == "float32":
        return None
    twin_config = dataclasses.replace(config, dtype="float32")
    module = build_module(weights.shape, weights.tensors, twin_config)
    model = _cpu_rebuilt(staging, weights, module, twin_config, manifest)
    name = f"a float32 twin of the rebuilt {config.dtype} graph (same build and options), run in this process"
    return model, tolerance_for("float32", config.gelu, weights.gelu), name
