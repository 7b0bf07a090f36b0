"""bertpool-compile: turn a fine-tuned open-source BERT into a servable compiled model.

Keeps the Neuron demo's flags (``bert_model.py --input_saved_model IN
--output_saved_model OUT --crude_gelu``). Exit status: 0 done, 1 the
equivalence proof failed (output kept, marked failed), 2 bad input, an
unavailable backend or an output it cannot write (a full disk: the output is
left as it was), 3 an unexpected error (a bug: reported with its
traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, e.g. from
``timeout``); interrupted or terminated, it leaves no output and no staging
directory. User errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

from ..common.cli import report_error, report_interrupt, sigterm_as_interrupt
from ..common.errors import BertpoolError, EquivalenceError
from .build import CompileOptions, compile_model, default_target
from .neuron import DEFAULT_MIN_ON_NEURON, NEURON_TARGETS
from .gelu import GELUS
from .rebuild import DTYPES
from .runtime import TARGETS, quiet_tensorflow

PROG = "bertpool-compile"
EXIT_PROOF_FAILED = 1  # the equivalence proof failed (output kept, marked failed)
EXIT_BAD_INPUT = 2  # any other typed error: bad flag, unreadable model, unavailable backend, unwritable output
EXIT_INTERNAL = 3  # an untyped exception: a bug (never to be read as a failed proof)


def _buckets(text: str) -> tuple[int, ...]:
    """--seq-buckets: 'none' or comma-separated integers."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Rebuild a fine-tuned BERT sentence-pair classifier for serving: embeddings on the host "
                    "(fp32), encoder+pooler+classifier compiled for a fixed batch x sequence length, softmax on "
                    "the host; then prove the rebuilt model matches the original on N pairs.",
        epilog="Exit status: 0 ok; 1 equivalence proof failed; 2 bad input, backend unavailable or an output "
               "it cannot write; "
               "3 unexpected error (a bug); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). "
               "Interrupted or terminated, it leaves the output as it was and no staging directory. "
               "Example: bertpool-demo-model --size base --output /tmp/bert-base && "
               "bertpool-compile --input_saved_model /tmp/bert-base --output_saved_model /tmp/bert-base-cpu "
               "--target cpu",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input_saved_model", required=True, metavar="DIR", type=pathlib.Path,
                    help="the fine-tuned classifier: a google-research run_classifier SavedModel export, a "
                         "google-research checkpoint directory (bert_config.json + bert_model.ckpt.*) or "
                         "checkpoint prefix, or a Hugging Face BertForSequenceClassification directory "
                         "(config.json + model.safetensors); the format is detected from the content")
    io.add_argument("--output_saved_model", required=True, metavar="DIR", type=pathlib.Path,
                    help="directory to write: manifest.json, vocab.txt, embeddings.npz, accelerated/")
    io.add_argument("--vocab", metavar="FILE", type=pathlib.Path,
                    help="the model's vocab.txt (default: vocab.txt inside the input directory or beside it)")
    io.add_argument("--force", action="store_true", help="replace an existing, non-empty output directory")

    build = parser.add_argument_group("rebuild")
    build.add_argument("--target", choices=TARGETS,
                       help="neuron: traced with tensorflow-neuron (inf1) or tensorflow-neuronx (inf2/trn1), see "
                            "--neuron-target; cpu/gpu: a TF SavedModel (default: neuron where a Neuron compiler "
                            "and its package are installed, else cpu)")
    build.add_argument("--dtype", choices=DTYPES,
                       help="dtype of attention and dense matmuls; LayerNorm, softmax and GELU stay fp32 "
                            "(default: float16 for neuron, float32 for cpu and gpu; inf1 takes float16 or "
                            "bfloat16 only)")
    gelu = build.add_mutually_exclusive_group()
    gelu.add_argument("--gelu", choices=GELUS,
                      help="GELU of the rebuilt model: erf (exact), tanh (approximation), crude "
                           "(x*sigmoid(1.702x)) (default: the source model's)")
    gelu.add_argument("--crude_gelu", action="store_const", dest="gelu", const="crude",
                      help="same as --gelu crude (the Neuron demo's flag)")
    build.add_argument("--batch-size", type=int, default=4, metavar="B", help="fixed batch size (default: 4)")
    build.add_argument("--seq-length", type=int, default=128, metavar="S",
                       help="fixed sequence length (default: 128)")
    neuron = parser.add_argument_group("neuron")
    neuron.add_argument("--neuron-target", choices=NEURON_TARGETS, default="auto",
                        help="inf1: tensorflow-neuron + neuron-cc; inf2 or trn1: tensorflow-neuronx + neuronx-cc; "
                             "auto: by which compiler is installed (default: auto)")
    neuron.add_argument("--compiler-args", default="", metavar="ARGS",
                        help="more compiler flags, after the ones that keep the matmul dtype (inf1: "
                             "--fp32-cast=matmult-fp16 or matmult-bf16; inf2/trn1: --auto-cast=none) and before "
                             "$NEURON_CC_FLAGS, which is respected and wins; flags of the other compiler are refused")
    neuron.add_argument("--min-on-neuron", type=float, default=DEFAULT_MIN_ON_NEURON, metavar="FRACTION",
                        help=f"fail unless this fraction of the ops compiled for Neuron (tensorflow-neuron's "
                             f"on_neuron_ratio); any matmul left on the CPU fails regardless "
                             f"(default: {DEFAULT_MIN_ON_NEURON})")
    build.add_argument("--seq-buckets", type=_buckets, default=None, metavar="S1,S2,...",
                       help="cpu/gpu: shorter sequence lengths to compile as well; each batch runs at the "
                            "shortest one its longest pair fits, so padding costs no compute ('none': only "
                            "--seq-length; default: every multiple of 32 below it)")
    build.add_argument("--xla", choices=("auto", "on", "off"), default="auto",
                       help="XLA-compile the cpu/gpu model (default auto: on, except bfloat16 on cpu where it "
                            "measured slower)")
    build.add_argument("--heads", type=int, metavar="N",
                       help="attention heads, only needed for a SavedModel whose graph does not reveal them")
    build.add_argument("--source-gelu", choices=GELUS,
                       help="the source model's GELU, overriding detection (graph ops / config hidden_act)")

    proof = parser.add_argument_group("equivalence proof")
    proof.add_argument("--tsv", metavar="FILE", type=pathlib.Path,
                       help="MRPC-format TSV whose first N pairs are used (default: generated pairs)")
    proof.add_argument("--pairs", type=int, default=32, metavar="N", help="pairs to compare (default: 32)")
    # default None: an explicit --seed with --tsv (where it would do nothing) is refused
    proof.add_argument("--seed", type=int, default=None,
                       help="seed of generated pairs, >= 0 (default: 0; not with --tsv)")
    proof.add_argument("--tolerance", type=float, metavar="T",
                       help="max |difference in probability| accepted (default: 1e-5 float32, 5e-3 float16, "
                            "4e-2 bfloat16, plus a measured allowance when the GELU differs from the "
                            "source's: 2e-3 tanh/erf, 6e-2 crude); below float32, a float32 twin of the "
                            "graph is proven first, at the float32 default whatever this says")
    proof.add_argument("--no-verify", dest="verify", action="store_false",
                       help="skip the proof (the manifest then records equivalence: null)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    quiet_tensorflow()  # TF's own chatter would bury the report
    try:
        with sigterm_as_interrupt():
            manifest = compile_model(_options(args, log))
    except BertpoolError as exc:  # every typed error is the user's input; a failed proof keeps its output
        return report_error(PROG, exc, EXIT_PROOF_FAILED if isinstance(exc, EquivalenceError) else EXIT_BAD_INPUT)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): exit 130 or 143
        return report_interrupt(PROG, exc)
    except Exception:  # a bug: its traceback helps, and its exit code must not say "proof failed"
        traceback.print_exc()
        print(f"{PROG}: unexpected error (a bug in bertpool-compile; please report it with the traceback above)",
              file=sys.stderr)
        return EXIT_INTERNAL
    if not args.quiet:
        _print_summary(args.output_saved_model, manifest)
    return 0


def _options(args, log) -> CompileOptions:
    """The parsed flags as CompileOptions; with no --target, the default one, announced."""
    target = args.target
    if target is None:
        target, why = default_target()
        log(f"target: {target} ({why}; choose with --target)")
    return CompileOptions(
        input=args.input_saved_model, output=args.output_saved_model, target=target, dtype=args.dtype,
        gelu=args.gelu, batch_size=args.batch_size, seq_length=args.seq_length, seq_buckets=args.seq_buckets,
        vocab=args.vocab,
        tsv=args.tsv, pairs=args.pairs, seed=args.seed, tolerance=args.tolerance,
        compiler_args=args.compiler_args, neuron_target=args.neuron_target,
        min_on_neuron=args.min_on_neuron, verify=args.verify, force=args.force, xla=args.xla,
        heads=args.heads, source_gelu=args.source_gelu, progress=not args.quiet, log=log,
    )


def _print_summary(output: pathlib.Path, manifest: dict) -> None:
    """One line on stdout: what was written, and how its proof went."""
    eq = manifest["equivalence"]
    twin = (eq or {}).get("float32_twin")  # the proof's first stage, below float32
    status = ("not verified" if eq is None else
              ("" if twin is None else f"float32 twin max |dp| {twin['max_abs_diff']:.3g}, then ") +
              f"max |dp| {eq['max_abs_diff']:.3g}, labels agree {eq['label_agreement']:.0%}")
    on_neuron = ""
    if manifest["neuron"]:
        n = manifest["neuron"]
        on_neuron = f", {n['family']}, {n['placement']['on_neuron_ratio']:.1%} of ops on Neuron"
    print(f"{output}: {manifest['target']} {manifest['dtype']} "
          f"batch {manifest['batch_size']} x {manifest['seq_length']} ({status}{on_neuron})")


if __name__ == "__main__":
    raise SystemExit(main())
