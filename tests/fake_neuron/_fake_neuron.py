"""A test double of tensorflow-neuron / tensorflow-neuronx's ``trace`` (tests only, never shipped).

No Inferentia here and no real package on PyPI, so this reproduces the contract
bertpool relies on, as the tensorflow-neuron source (python/_trace.py, utils.py,
neuron_cc_hlo.py, graph_def_util.py) and the AWS docs state it:

* ``trace(func, example_inputs)`` returns a keras Model. A tensor or a list of
  example inputs means ``func(example_inputs)``; a tuple ``func(*inputs)``; a
  dict ``func(**inputs)``. Variables are frozen into the traced graph.
* Compiler flags come only from ``os.environ["NEURON_CC_FLAGS"]``, read during
  ``trace``. The package's own flags are parsed out by its own argparse parser
  (utils.parse_neuron_cc_flags: a value outside a flag's choices, e.g.
  ``--verbose loud``, makes it exit with SystemExit(2) in the middle of trace;
  inf1: ``--fp32-cast``, default ``matmult-fp16``, is always passed to neuron-cc
  with ``--fast-math=none``, and ``--neuroncore-pipeline-cores=N``, or else
  ``--enable-fast-context-switch``); the rest go to the compiler. A flag or value
  the compiler does not know makes it fail, and a failed subgraph quietly falls
  back to the CPU, as tensorflow-neuron does.
* The compiled graph has fixed shapes: a NeuronOp runs only the shapes and dtypes
  it was traced with (tf.errors.InvalidArgumentError otherwise), except that
  ``--dynamic-batch-size`` lets the first dimension vary (the documented "Special
  Flags" of the tracing API). The returned model does not autocast its inputs
  (AwsNeuronModel passes ``autocast=False``).
* Compiled subgraphs appear as ``NeuronOp`` nodes (with an ``executable``) in
  ``model.aws_neuron_function.graph``; op types the compiler does not support
  stay as CPU ops; ``model.on_neuron_ratio`` is computed the way
  ``AwsNeuronModel.calculate_on_neuron_ratio`` does.
* ``model.save(dir)`` records the example inputs as the model's ONE input
  structure (``_make_keras_model_savable``): reloaded, it accepts only that
  structure. Keras 2 (TF <= 2.15): Keras's own SavedModel save, reloaded with
  ``tf.keras.models.load_model``. Keras 3 cannot save or load a SavedModel from
  a keras Model, so there the same contract is kept with ``tf.saved_model.save``
  of a module whose only signature is that structure.

The "device" computes exactly what the traced graph computes, on the CPU.

Test knobs, read from the environment so that worker processes see them too:
    FAKE_NEURON_CPU_OPS         comma-separated op types the compiler does not support
    FAKE_NEURON_BROKEN_RUNTIME  importing the package raises RuntimeError with this text (a
                                broken install: not an ImportError)
The compile also writes ``fake_neuron.json`` beside the saved model: the
compiler command it would have run, for tests to check the flags.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
from dataclasses import dataclass

import tensorflow as tf
from tensorflow.python.eager import wrap_function
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

FLAGS_VAR = "NEURON_CC_FLAGS"
CPU_OPS_VAR = "FAKE_NEURON_CPU_OPS"
BROKEN_VAR = "FAKE_NEURON_BROKEN_RUNTIME"
KERAS_MAJOR = int(str(getattr(tf.keras, "__version__", "3")).split(".")[0])
# tensorflow_neuron/python/utils.py parse_neuron_cc_flags: the values its parser accepts.
VERBOSE_CHOICES = ("debug", "info", "warning", "error", "critical", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EXTRACT_WEIGHTS_CHOICES = ("inf1.xlarge", "inf1.2xlarge", "inf1.6xlarge", "inf1.24xlarge", "trn1.2xlarge",
                           "trn1.32xlarge", "inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge")


@dataclass(frozen=True)
class Flavour:
    """What differs between tensorflow-neuron (inf1) and tensorflow-neuronx (inf2/trn1)."""

    family: str
    compiler: str
    own_flags: tuple  # (flag, default, choices or None) parsed by the package itself
    compiler_flags: dict  # flag -> accepted values (None: any value or a switch)
    fixed_args: tuple  # flag names whose parsed values the package always passes on


INF1 = Flavour(
    family="inf1", compiler="neuron-cc",
    own_flags=(("--workdir", None, None), ("--verbose", None, VERBOSE_CHOICES), ("--dynamic-batch-size", False, None),
               ("--fp32-cast", "matmult-fp16", None), ("--neuroncore-pipeline-cores", None, None),
               ("--extract-weights", None, EXTRACT_WEIGHTS_CHOICES)),
    compiler_flags={"--fast-math": None, "--fp32-cast": {"all", "matmult", "matmult-fp16", "matmult-bf16",
                                                         "all-fp16"},
                    "--enable-saturate-infinity": None, "--enable-fast-loading-neuron-binaries": None,
                    "--enable-fast-context-switch": None, "--neuroncore-pipeline-cores": None,
                    "--verbose": None},
    fixed_args=("fp32_cast",),
)
INF2 = Flavour(
    family="inf2", compiler="neuronx-cc",
    own_flags=(("--workdir", None, None), ("--dynamic-batch-size", False, None),
               ("--extract-weights", None, EXTRACT_WEIGHTS_CHOICES)),
    compiler_flags={"--target": {"inf2", "trn1"}, "--auto-cast": {"matmult", "matmul", "all", "none"},
                    "--auto-cast-type": {"bf16", "fp16", "tf32", "fp8_e4m3"}, "--model-type": {"generic", "transformer"},
                    "--enable-fast-context-switch": None, "--enable-fast-loading-neuron-binaries": None,
                    "--logfile": None, "--verbose": None},
    fixed_args=(),
)


def make_trace(flavour: Flavour):
    """The package's ``trace`` function for one flavour (raises at import when the runtime is "broken")."""
    if os.environ.get(BROKEN_VAR):
        raise RuntimeError(os.environ[BROKEN_VAR])

    def trace(func, example_inputs, subgraph_builder_function=None):
        return _trace(flavour, func, example_inputs)

    return trace


# ------------------------------------------------------------------ compiling

def parse_own_flags(flavour: Flavour, environ):
    """utils.parse_neuron_cc_flags: the package's own flags and the rest (SystemExit(2) for a value
    outside a flag's choices, as argparse exits)."""
    parser = argparse.ArgumentParser()
    for flag, default, choices in flavour.own_flags:
        if default is False:
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, default=default, choices=choices)
    return parser.parse_known_args(shlex.split(environ.get(FLAGS_VAR, "")))


def compiler_command(flavour: Flavour, environ) -> tuple[list[str], bool]:
    """What the package would run for one subgraph, and whether the compiler accepts it."""
    own, rest = parse_own_flags(flavour, environ)
    command = [flavour.compiler, "compile", "--framework", "XLA"]
    if flavour.family == "inf1":  # neuron_cc_hlo.hlo_opt_to_neff_bytes
        command += [f"--verbose={own.verbose or 35}", "--fast-math=none", f"--fp32-cast={own.fp32_cast}"]
        pipeline = own.neuroncore_pipeline_cores
        command += ["--enable-fast-context-switch"] if pipeline is None else [f"--neuroncore-pipeline-cores={pipeline}"]
    command += rest
    return command, _accepted(flavour, command[4:])


def _accepted(flavour: Flavour, args: list[str]) -> bool:
    """Whether the compiler's argument parser would take ``args`` (unknown flag or value: it fails)."""
    i = 0
    while i < len(args):
        name, _, value = args[i].partition("=")
        if name not in flavour.compiler_flags:
            return False
        allowed = flavour.compiler_flags[name]
        if allowed is not None:
            if not value and i + 1 < len(args):
                i += 1
                value = args[i]
            if value not in allowed:
                return False
        i += 1
    return True


def _concrete(func, example_inputs):
    """tensorflow-neuron's _func_to_concrete_func: how example inputs map to arguments."""
    if isinstance(example_inputs, dict):
        return tf.function(func).get_concrete_function(**example_inputs)
    if isinstance(example_inputs, tuple):
        return tf.function(func).get_concrete_function(*example_inputs)
    return tf.function(func).get_concrete_function(example_inputs)


def _trace(flavour: Flavour, func, example_inputs):
    concrete = _concrete(func, example_inputs)
    real_op_count = sum(op.type not in {"Placeholder", "ReadVariableOp", "Identity", "NoOp"}
                        for op in concrete.graph.get_operations())
    frozen = convert_variables_to_constants_v2(concrete, aggressive_inlining=True)
    graph_def = frozen.graph.as_graph_def()
    runnable = wrap_function.function_from_graph_def(
        graph_def, [t.name for t in frozen.inputs], [t.name for t in frozen.outputs])
    command, compiled = compiler_command(flavour, os.environ)
    dynamic_batch = parse_own_flags(flavour, os.environ)[0].dynamic_batch_size
    unsupported = {op for op in os.environ.get(CPU_OPS_VAR, "").split(",") if op}
    display = _placed_graph(graph_def, [t.name for t in frozen.outputs], unsupported if compiled else None)
    record = {"family": flavour.family, "compiler_command": command, "compiled": compiled,
              FLAGS_VAR: os.environ.get(FLAGS_VAR)}
    model = FakeNeuronModel(runnable, display, concrete.structured_outputs, real_op_count, json.dumps(record))
    model.set_example(example_inputs, dynamic_batch)
    return model


def _placed_graph(graph_def, outputs: list[str], unsupported: set | None):
    """The traced graph as tensorflow-neuron leaves it: the inputs, the supported ops fused into one
    NeuronOp with an executable, the unsupported ops on the CPU, and the output Identity ops. When
    the compiler failed (``unsupported is None``) every op stays on the CPU."""
    if unsupported is None:
        return _DisplayFunction(graph_def)
    placed = tf.compat.v1.GraphDef()
    output_nodes = {name.split(":")[0] for name in outputs}
    fused = []
    for node in graph_def.node:
        if node.op == "Placeholder" or node.op in unsupported or node.name in output_nodes:
            placed.node.add().CopyFrom(node)
        elif node.op not in {"Identity", "NoOp"}:
            fused.append(node)
    if any(node.op != "Const" for node in fused):
        neuron_op = placed.node.add(name="neuron_op_0", op="NeuronOp")
        digest = hashlib.sha256(b"".join(n.SerializeToString() for n in fused)).hexdigest()
        neuron_op.attr["executable"].s = f"fake-neff:{digest}".encode()
    return _DisplayFunction(placed)


class _DisplayGraph:
    def __init__(self, graph_def) -> None:
        self._graph_def = graph_def

    def as_graph_def(self):
        return self._graph_def

    def get_operations(self):
        return [_Op(node.op) for node in self._graph_def.node]


@dataclass
class _Op:
    type: str


class _DisplayFunction:
    """Stands for AwsNeuronModel.aws_neuron_function: its graph holds the NeuronOp nodes."""

    def __init__(self, graph_def) -> None:
        self.graph = _DisplayGraph(graph_def)


# -------------------------------------------------------------------- the model

class FakeNeuronModel(tf.keras.Model):
    """What ``trace`` returns: an inference-only keras Model over the traced graph."""

    def __init__(self, runnable, display, structured_outputs, real_op_count: int, record: str) -> None:
        super().__init__(trainable=False, autocast=False)
        self._runnable = runnable
        self._outputs_structure = tf.nest.map_structure(lambda _: 0, structured_outputs)
        self._record = record  # JSON text: keras would wrap a dict attribute
        self.aws_neuron_function = display
        self.on_neuron_ratio = _on_neuron_ratio(display, real_op_count)
        self._example = None
        self._dynamic_batch = False

    def set_example(self, example_inputs, dynamic_batch: bool = False) -> None:
        """_make_keras_model_savable: the example inputs become the one saved input structure;
        their shapes and dtypes are the compiled ones (dimension 0 free with --dynamic-batch-size)."""
        self._example = example_inputs
        self._dynamic_batch = dynamic_batch
        if KERAS_MAJOR < 3:
            self._set_save_spec(example_inputs)

    def call(self, inputs, *args):
        flat = tf.nest.flatten((inputs, args))
        _check_compiled_shapes(flat, tf.nest.flatten(self._example), self._dynamic_batch)
        outputs = self._runnable(*flat)
        return tf.nest.pack_sequence_as(self._outputs_structure, outputs)

    def save(self, filepath, *args, **kwargs):
        if KERAS_MAJOR < 3:
            super().save(filepath, *args, **kwargs)
        else:
            tf.saved_model.save(_OneStructure(self._runnable, self._outputs_structure, self._example,
                                              self._dynamic_batch), filepath)
        with open(os.path.join(filepath, "fake_neuron.json"), "w") as f:
            f.write(self._record)


class _OneStructure(tf.Module):
    """Keras 3 stand-in for a saved traced model: ``__call__`` takes exactly the example structure."""

    def __init__(self, runnable, structured_outputs, example, dynamic_batch: bool) -> None:
        super().__init__(name="aws_neuron_model")
        self._runnable = runnable
        signature = [tf.nest.map_structure(
            lambda t: tf.TensorSpec([None, *t.shape[1:]] if dynamic_batch else t.shape, t.dtype), example)]

        def call(inputs):
            return tf.nest.pack_sequence_as(structured_outputs, runnable(*tf.nest.flatten(inputs)))

        self.__call__ = tf.function(call, input_signature=signature)


def _check_compiled_shapes(given: list, compiled: list, dynamic_batch: bool) -> None:
    """The NeuronOp's check: the inputs it was compiled for, in number, dtype and shape (any first
    dimension with --dynamic-batch-size); tf.errors.InvalidArgumentError otherwise."""
    if len(given) != len(compiled):
        raise tf.errors.InvalidArgumentError(None, None, f"Incorrect number of input tensors: given {len(given)}, "
                                                         f"expect {len(compiled)}")
    for index, (tensor, spec) in enumerate(zip(given, compiled)):
        tensor = tf.convert_to_tensor(tensor)
        shape, want = tensor.shape.as_list(), spec.shape.as_list()
        if dynamic_batch and shape and want:
            shape, want = shape[1:], want[1:]
        # None: a symbolic dimension (Keras 2 traces call() with a free batch to save it)
        if tensor.dtype != spec.dtype or len(shape) != len(want) or any(
                d is not None and d != w for d, w in zip(shape, want)):
            raise tf.errors.InvalidArgumentError(
                None, None, f"NeuronOp input #{index}: given {tensor.dtype.name} {tensor.shape.as_list()}, compiled "
                            f"for {spec.dtype.name} {spec.shape.as_list()}"
                            f"{' (any batch)' if dynamic_batch else ' (no --dynamic-batch-size)'}")


def _on_neuron_ratio(display: _DisplayFunction, real_op_count: int) -> float:
    """AwsNeuronModel.calculate_on_neuron_ratio, on the placed graph."""
    ops = [op.type for op in display.graph.get_operations()]
    if "NeuronOp" not in ops:
        return 0.0
    non_compiled = sum(t not in {"Placeholder", "IdentityN", "NeuronOp", "ReadVariableOp", "NoOp"} for t in ops)
    return 1 - non_compiled / real_op_count
