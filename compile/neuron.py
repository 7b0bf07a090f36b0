"""The Neuron toolchains: which package and compiler, which flags, tracing, placement, loading.

Two toolchains, never mixed (tensorflow-neuronx reuses tensorflow_neuron's code,
so on an inf2 host both packages may import; importing "whichever imports first"
would pick the inf1 one there):

    family     package (import)                       compiler     cast flags (matmuls in the graph's dtype)
    inf1       tensorflow-neuron (tensorflow.neuron)   neuron-cc    --fp32-cast=matmult-fp16 | matmult-bf16
    inf2/trn1  tensorflow-neuronx (tensorflow_neuronx) neuronx-cc   --auto-cast=none

Why these flags (from the neuron-cc / neuronx-cc CLI references and the
tensorflow-neuron source):

* tensorflow-neuron (TF2) parses ``--fp32-cast`` out of NEURON_CC_FLAGS itself
  (default ``matmult-fp16``) and always calls neuron-cc with ``--fast-math=none
  --fp32-cast=<value>``; neuron-cc gives ``--fp32-cast`` priority over
  ``--fast-math``'s casting, so ``--fp32-cast`` is the flag that takes effect
  there. The old ``--fp32-cast matmult`` (= ``--fast-math fp32-cast-matmult``)
  runs matmuls in bf16, which the CPU proof at float16 never saw. Inferentia's
  matmult engine computes in fp16 or bf16 only (even ``--fast-math none`` casts
  matmuls to bf16), so inf1 takes float16 or bfloat16, never float32.
* neuronx-cc has neither flag; its ``--auto-cast`` (default ``matmult``, to
  ``--auto-cast-type`` bf16) would cast fp32 matmuls too. The rebuilt graph
  already holds its matmuls in the chosen dtype, so ``none`` runs exactly the
  dtypes the CPU proof ran.

Both packages read their compiler flags only from the ``NEURON_CC_FLAGS``
environment variable, at trace() time: :func:`scoped_env` sets it for that call
and restores the caller's value afterwards.

The one home of Neuron detection, for building and serving alike: ``bertpool-compile``
(:mod:`.build`) and the serving path (:mod:`.runtime`, loaded by the ``neuron`` worker
backend) both call :func:`import_package`, which writes the "needs tensorflow-neuron(x)"
message. This module imports only the standard library, so serving pays nothing for
the build-time parts (flags, tracing, placement).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field

from ..common.errors import BackendUnavailable, ConfigError, ModelFormatError, PlacementError

FLAGS_VAR = "NEURON_CC_FLAGS"
PIPELINE_FLAG = "--neuroncore-pipeline-cores"  # compiles one model across N NeuronCores (NeuronCore Pipeline)
NEURON_TARGETS = ("auto", "inf1", "inf2", "trn1")  # --neuron-target choices
# Op types that carry the encoder's FLOPs: none of them may stay on the CPU.
MATMUL_OPS = frozenset({"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum"})
# Ops tensorflow-neuron's on_neuron_ratio ignores, plus the NeuronOp itself.
BOOKKEEPING_OPS = frozenset({"Placeholder", "IdentityN", "Identity", "NeuronOp", "ReadVariableOp", "NoOp", "Const"})
DEFAULT_MIN_ON_NEURON = 0.9  # least on_neuron_ratio a build accepts (BERT compiles fully: ~1.0)


@dataclass(frozen=True)
class Toolchain:
    """One Neuron toolchain: the package that traces and runs, and the compiler it drives."""

    family: str  # "inf1" or "inf2" (trn1 shares inf2's toolchain)
    modules: tuple[str, ...]  # import names, most documented first
    distribution: str  # the pip name
    compiler: str  # the compiler executable the package runs
    cast_flags: dict  # matmul dtype -> compiler flags that keep it (None: not possible)
    foreign_flags: dict  # flag of the other compiler -> what to use instead
    # The package's own flags whose value its argparse parser restricts: a value outside them makes
    # it call sys.exit(2) in the middle of trace() (tensorflow_neuron/python/utils.py).
    package_choices: dict = field(default_factory=dict)


INF1 = Toolchain(
    family="inf1", modules=("tensorflow.neuron", "tensorflow_neuron"), distribution="tensorflow-neuron",
    compiler="neuron-cc",
    cast_flags={"float16": ["--fp32-cast=matmult-fp16"], "bfloat16": ["--fp32-cast=matmult-bf16"],
                "float32": None},
    foreign_flags={"--auto-cast": "--fp32-cast", "--auto-cast-type": "--fp32-cast", "--target": "nothing",
                   "--model-type": "nothing"},
    package_choices={
        "--verbose": ("debug", "info", "warning", "error", "critical", "DEBUG", "INFO", "WARNING", "ERROR",
                      "CRITICAL"),
        "--extract-weights": ("inf1.xlarge", "inf1.2xlarge", "inf1.6xlarge", "inf1.24xlarge", "trn1.2xlarge",
                              "trn1.32xlarge", "inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge"),
    },
)
INF2 = Toolchain(
    family="inf2", modules=("tensorflow_neuronx",), distribution="tensorflow-neuronx", compiler="neuronx-cc",
    cast_flags={"float16": ["--auto-cast=none"], "bfloat16": ["--auto-cast=none"], "float32": ["--auto-cast=none"]},
    foreign_flags={"--fp32-cast": "--auto-cast / --auto-cast-type", "--fast-math": "--auto-cast / --auto-cast-type"},
)
TOOLCHAINS = {"inf1": INF1, "inf2": INF2, "trn1": INF2}


# ------------------------------------------------------------------ choosing

def find_compiler(name: str) -> str | None:
    """The compiler's path, searched as tensorflow-neuron does: beside this Python, then $PATH."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


def choose_toolchain(target: str) -> Toolchain:
    """The toolchain for ``--neuron-target`` (auto: by which compiler is installed).

    ConfigError for an unknown target or an ambiguous host (both compilers);
    BackendUnavailable when no compiler is installed.
    """
    if target not in NEURON_TARGETS:
        raise ConfigError(f"unknown --neuron-target {target!r}; expected one of {', '.join(NEURON_TARGETS)}")
    if target != "auto":
        return TOOLCHAINS[target]
    found = [t for t in (INF1, INF2) if find_compiler(t.compiler)]
    if len(found) == 2:
        raise ConfigError("both neuron-cc (inf1) and neuronx-cc (inf2/trn1) are installed; choose one with "
                          "--neuron-target inf1|inf2|trn1")
    if not found:
        raise BackendUnavailable("--target neuron needs neuron-cc (inf1, from tensorflow-neuron[cc]) or neuronx-cc "
                                 "(inf2/trn1, with tensorflow-neuronx), which install only from AWS's Neuron pip "
                                 "repository (README, section Neuron); use --target cpu here")
    return found[0]


def import_package(toolchain: Toolchain):
    """Import the toolchain's own package (never the other one); BackendUnavailable if it is not there,
    or is there but does not import."""
    errors = []
    for name in toolchain.modules:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"import {name}: {exc}")
        except Exception as exc:  # installed, but broken: e.g. its native library does not load (OSError)
            raise BackendUnavailable(
                f"{toolchain.distribution} is installed but does not import (import {name}: {type(exc).__name__}: "
                f"{exc}); reinstall it with the TensorFlow version it pins (README, section Neuron)") from exc
    raise BackendUnavailable(
        f"the {toolchain.family} toolchain needs {toolchain.distribution} ({'; '.join(errors)}); it installs "
        f"only from AWS's Neuron pip repository on an {toolchain.family} host (README, section Neuron)")


def package_version(toolchain: Toolchain) -> str | None:
    """The installed distribution's version, for the manifest (None when metadata is absent)."""
    from importlib import metadata

    try:
        return metadata.version(toolchain.distribution)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------- flags

def compiler_flags(toolchain: Toolchain, dtype: str, extra: str, environ: dict) -> str:
    """The NEURON_CC_FLAGS for one trace: our cast flags, then ``extra`` (--compiler-args),
    then the user's own $NEURON_CC_FLAGS, so that the user's later flags win.

    ConfigError, before any work, when the dtype cannot be kept on this toolchain, when a flag
    belongs to the other compiler, when the text does not split into flags, when a flag would
    make the package exit mid-trace (a value its own parser refuses), or when it asks for a
    model the pool cannot load (``--neuroncore-pipeline-cores`` above 1).
    """
    cast = toolchain.cast_flags[dtype]
    if cast is None:
        raise ConfigError(f"{toolchain.compiler} ({toolchain.family}) multiplies in float16 or bfloat16 only "
                          f"(even --fast-math none casts matmuls to bf16); choose --dtype float16 or bfloat16")
    user = _split_flags("--compiler-args", extra) + _split_flags(f"${FLAGS_VAR}", environ.get(FLAGS_VAR, ""))
    where = f"(from --compiler-args or ${FLAGS_VAR})"
    for index, flag in enumerate(user):
        name, value = flag.split("=", 1)[0], _flag_value(user, index)
        if name in toolchain.foreign_flags:
            raise ConfigError(f"{name} is not a {toolchain.compiler} flag ({toolchain.family}); use "
                              f"{toolchain.foreign_flags[name]} there {where}")
        choices = toolchain.package_choices.get(name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{name} {value or '(no value)'} {where}: {toolchain.distribution} takes one of "
                              f"{', '.join(choices)} (any other value makes it exit mid-trace)")
        if name == PIPELINE_FLAG and value != "1":
            # Each worker owns one NeuronCore; a pipelined NEFF is split across N cores and cannot load on one.
            raise ConfigError(f"{PIPELINE_FLAG} {value or '(no value)'} {where}: a pipelined model needs that many "
                              f"NeuronCores per copy, but bertpool runs one worker per NeuronCore "
                              f"(NEURON_RT_VISIBLE_CORES=<core>), so no worker could load it; drop the flag and "
                              f"scale with bertpool-serve --parallel")
    return shlex.join(cast + user)


def _split_flags(source: str, text: str) -> list[str]:
    """``text`` split as a shell would (as the packages do); ConfigError naming ``source`` if it cannot be."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{source} {text!r} does not split into flags ({str(exc).lower()}); quote values as "
                          f"in a shell") from None


def _flag_value(flags: list[str], index: int) -> str | None:
    """The value of the flag at ``index``: after its ``=``, else the next word unless that is a flag."""
    _, equals, value = flags[index].partition("=")
    if equals:
        return value
    following = flags[index + 1] if index + 1 < len(flags) else None
    return None if following is None or following.startswith("-") else following


@contextlib.contextmanager
def scoped_env(name: str, value: str):
    """Set os.environ[name] for the block only, restoring the caller's value (or its absence) after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


# ------------------------------------------------------------ trace and check

@dataclass
class Placement:
    """Where the traced graph runs (the manifest's ``neuron.placement``)."""

    on_neuron_ratio: float  # tensorflow-neuron's own figure (1 = every op compiled)
    neuron_ops: int  # compiled subgraphs (NeuronOp nodes)
    cpu_ops: dict  # op type -> count of ops left on the CPU (bookkeeping ops excluded)

    def to_dict(self) -> dict:
        return {"on_neuron_ratio": self.on_neuron_ratio, "neuron_ops": self.neuron_ops, "cpu_ops": self.cpu_ops}


def placement(traced) -> Placement:
    """Read the traced model's graph: compiled subgraphs are NeuronOp nodes, failed ones fell back to CPU ops."""
    function = getattr(traced, "aws_neuron_function", None)
    ratio = getattr(traced, "on_neuron_ratio", None)
    if function is None or ratio is None:
        raise PlacementError("the traced model has no aws_neuron_function / on_neuron_ratio, so where it runs "
                             "cannot be checked; this tensorflow-neuron version is not supported")
    nodes = function.graph.as_graph_def().node
    cpu = Counter(node.op for node in nodes if node.op not in BOOKKEEPING_OPS)
    return Placement(float(ratio), sum(node.op == "NeuronOp" for node in nodes), dict(sorted(cpu.items())))


def check_placement(where: Placement, min_on_neuron: float) -> None:
    """PlacementError unless the encoder runs on Neuron: a compiled subgraph, no matmul on the CPU,
    and at least ``min_on_neuron`` of the ops compiled."""
    on_cpu = ", ".join(f"{op} x{n}" for op, n in where.cpu_ops.items()) or "none"
    hint = f"(ops left on the CPU: {on_cpu}; NEURON_CC_FLAGS='--workdir DIR' keeps the compiler's logs)"
    if where.neuron_ops == 0:
        raise PlacementError(f"the Neuron compiler compiled nothing: the whole model would run on the CPU {hint}")
    matmuls = sorted(MATMUL_OPS & set(where.cpu_ops))
    if matmuls:
        raise PlacementError(f"the encoder's {', '.join(matmuls)} ops fell back to the CPU {hint}")
    if where.on_neuron_ratio < min_on_neuron:
        raise PlacementError(f"only {where.on_neuron_ratio:.1%} of the ops compiled for Neuron, below "
                             f"--min-on-neuron {min_on_neuron:.0%} {hint}")


# ------------------------------------------------------------------- loading

def load_traced(tf, path: str):
    """Reload a saved traced model; call it with the one list it was traced with.

    tensorflow-neuron documents ``tf.keras.models.load_model`` (Keras 2: TF <= 2.15,
    which every tensorflow-neuron release pins). Keras 3 cannot read a SavedModel
    directory, so there the SavedModel is loaded with ``tf.saved_model.load``, whose
    restored ``__call__`` keeps the same single input structure.
    """
    keras_major = int(str(getattr(tf.keras, "__version__", "3")).split(".")[0])
    try:
        if keras_major < 3:
            return tf.keras.models.load_model(path, compile=False)  # inference only: no optimizer state
        return tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise ModelFormatError(f"cannot load the traced model {path}: {str(exc).splitlines()[0]}") from exc


def runtime_toolchain(manifest: dict) -> Toolchain:
    """The toolchain a neuron manifest was compiled with (ModelFormatError if it does not say)."""
    section = manifest.get("neuron")
    if not isinstance(section, dict) or section.get("family") not in TOOLCHAINS:
        raise ModelFormatError("the manifest of this neuron model names no toolchain (neuron.family); "
                               "recompile it with this bertpool")
    return TOOLCHAINS[section["family"]]
