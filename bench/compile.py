"""Benchmarks of bertpool-compile: throughput and measured equivalence bounds.

throughput  batch-4 pairs/s of the compiled cpu model vs the original SavedModel,
            same process, same pairs, interleaved rounds (median reported). The
            original runs two ways: the TF1 loader in a Session (its fastest
            path) and TF2 ``tf.saved_model.load`` signatures (what the ``tf``
            worker backend does with an uncompiled SavedModel).
tolerance   max |dp| of the rebuilt graph vs the original SavedModel per size,
            GELU and dtype on N generated pairs: the data behind
            :data:`.equivalence.TOLERANCES`.

    python -m bertpool.bench.compile throughput --sizes tiny base --json runs/bench-compile.json
    python -m bertpool.bench.compile tolerance --sizes tiny base large --pairs 64 --json runs/tol.json

Demo models are built under ``--work`` (default runs/bench-compile) and reused.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

from ..clients.bench import run_environment
from ..common.cli import add_exit_status, check_count, check_writable, report_error, write_output
from ..common.errors import ConfigError
from ..common.protocol import check_timeout
from ..compile.gelu import GELUS
from ..compile.rebuild import DTYPES
from ..compile.runtime import quiet_tensorflow
from ..compile.shape import PRESETS


def _demo(work: pathlib.Path, size: str, gelu: str = "erf") -> pathlib.Path:
    from ..compile.demo_model import build_demo_model

    path = work / f"original-{size}-{gelu}"
    if not (path / "saved_model.pb").is_file():
        started = time.perf_counter()
        build_demo_model(path, size, gelu=gelu, overwrite=True)
        print(f"built {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def _features(vocab: pathlib.Path, n: int, seed: int = 0):
    from ..common.data import generate_pairs
    from ..common.tokenizer import BertTokenizer

    pairs = [(p.text_a, p.text_b) for p in generate_pairs(n, seed=seed)]
    return BertTokenizer(vocab).encode_pairs(pairs)


def _rate(model, batches, seconds: float) -> float:
    """pairs/s over as many batch-4 calls as fit in ``seconds`` (at least 3)."""
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        ids, mask, segments = batches[calls % len(batches)]
        model.predict(ids, mask, segments)
        calls += 1
    return calls * len(batches[0][0]) / (time.perf_counter() - started)


def throughput(size: str, work: pathlib.Path, rounds: int, seconds: float, batch_size: int = 4,
               xla: str = "auto", dtype: str | None = None) -> dict:
    import tensorflow as tf

    from ..workers.backends import SavedModelBackend  # a bench sits above the roles it measures
    from ..compile.build import CompileOptions, compile_model
    from ..compile.equivalence import SavedModelOriginal
    from ..compile.runtime import load_compiled
    from ..compile.weights import load_weights

    src = _demo(work, size)
    out = work / f"cpu-{size}"
    started = time.perf_counter()
    manifest = compile_model(CompileOptions(input=src, output=out, target="cpu", force=True, progress=False,
                                            batch_size=batch_size, xla=xla, dtype=dtype, log=lambda *a: None))
    compile_s = time.perf_counter() - started
    f = _features(src / "vocab.txt", 8 * batch_size, seed=1)
    batches = [(f.input_ids[i:i + batch_size], f.input_mask[i:i + batch_size], f.segment_ids[i:i + batch_size])
               for i in range(0, 8 * batch_size, batch_size)]
    models = {
        "original_session": SavedModelOriginal(src, load_weights(src)),
        "original_tf2": SavedModelBackend(src, tf),  # what the tf worker backend serves, itself
        "compiled": load_compiled(out),
    }
    for model in models.values():  # warm-up: graph optimisation, XLA, caches
        for b in batches[:2]:
            model.predict(*b)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):  # interleaved so that drift (thermal, other load) hits all alike
        for name, model in models.items():
            rates[name].append(_rate(model, batches, seconds))
    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "size": size, "batch_size": batch_size, "seq_length": 128,
        "model": PRESETS[size].to_dict(), "compile_seconds": round(compile_s, 1),
        "equivalence": manifest["equivalence"], "xla": manifest["xla"], "dtype": manifest["dtype"],
        "pairs_per_s": {k: round(v, 2) for k, v in median.items()},
        "rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "speedup_vs_session": round(median["compiled"] / median["original_session"], 3),
        "speedup_vs_tf2": round(median["compiled"] / median["original_tf2"], 3),
    }
    print(f"{size}: compiled {median['compiled']:.1f} pairs/s, original session {median['original_session']:.1f}, "
          f"original tf2 {median['original_tf2']:.1f} -> x{result['speedup_vs_session']:.2f} / "
          f"x{result['speedup_vs_tf2']:.2f}; equivalence max |dp| {manifest['equivalence']['max_abs_diff']:.2g}",
          file=sys.stderr)
    models["original_session"].close()
    return result


def tolerance(size: str, work: pathlib.Path, pairs: int, gelus: list[str]) -> list[dict]:
    """max |dp| of the rebuilt graph (in process) vs the SavedModel, per GELU x dtype."""
    import tensorflow as tf

    from ..compile.equivalence import SavedModelOriginal
    from ..compile.host import HostEmbeddings, embedding_arrays, mask_bias, softmax
    from ..compile.rebuild import RebuildConfig, build_module
    from ..compile.weights import load_weights

    rows = []
    for source_gelu in gelus:
        src = _demo(work, size, source_gelu)
        weights = load_weights(src)
        original = SavedModelOriginal(src, weights)
        f = _features(src / "vocab.txt", pairs, seed=2)
        expected = np.concatenate([original.predict(f.input_ids[i:i + 16], f.input_mask[i:i + 16],
                                                    f.segment_ids[i:i + 16]) for i in range(0, pairs, 16)])
        original.close()
        t = weights.tensors
        embeddings = HostEmbeddings(embedding_arrays(t), 128, weights.shape.layer_norm_eps)
        combos = [(d, source_gelu) for d in DTYPES] + [("float32", g) for g in GELUS if g != source_gelu]
        for dtype, gelu in combos:
            module = build_module(weights.shape, t, RebuildConfig(dtype=dtype, gelu=gelu, batch_size=4))
            fn = module.__call__.get_concrete_function()
            got = []
            for i in range(0, pairs, 4):
                ids, mask, seg = f.input_ids[i:i + 4], f.input_mask[i:i + 4], f.segment_ids[i:i + 4]
                logits = fn(embeddings=tf.constant(embeddings(ids, seg)), mask_bias=tf.constant(mask_bias(mask)))
                got.append(softmax(logits["logits"].numpy()))
            diff = np.abs(np.concatenate(got).astype(np.float64) - expected)
            agree = float(np.mean(np.concatenate(got).argmax(-1) == expected.argmax(-1)))
            row = {"size": size, "source_gelu": source_gelu, "gelu": gelu, "dtype": dtype, "pairs": pairs,
                   "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "label_agreement": agree}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertpool.bench.compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("throughput", "tolerance"))
    parser.add_argument("--sizes", nargs="+", choices=sorted(PRESETS), default=["tiny", "base"])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("runs/bench-compile"),
                        help="where demo and compiled models are kept (default: runs/bench-compile)")
    parser.add_argument("--json", metavar="FILE", type=pathlib.Path,
                        help="also write the results as JSON to FILE (its directory is made if missing)")
    parser.add_argument("--rounds", type=int, default=5, help="throughput: interleaved rounds (default: 5)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="throughput: seconds per model per round (default: 3.0)")
    parser.add_argument("--xla", choices=("auto", "on", "off"), default="auto", help="throughput: bertpool-compile --xla")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="throughput: bertpool-compile --dtype (default float32)")
    parser.add_argument("--pairs", type=int, default=64, help="tolerance: pairs per combination (default: 64)")
    parser.add_argument("--gelus", nargs="+", choices=GELUS, default=list(GELUS),
                        help="tolerance: source GELUs to build demo models with")
    add_exit_status(parser, "0 measured, 2 a bad flag or a --json that cannot be written (checked before "
                            "any model is built)")
    args = parser.parse_args(argv)
    try:  # before minutes of building and timing models, not after them
        _check_args(args)
    except ConfigError as exc:
        return report_error(parser.prog, exc)
    environment = run_environment(parser.prog, argv)
    quiet_tensorflow()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        if args.what == "throughput":
            results.append(throughput(size, args.work, args.rounds, args.seconds, xla=args.xla, dtype=args.dtype))
        else:
            results.extend(tolerance(size, args.work, args.pairs, args.gelus))
    # The host's CPU count is environment.host.cpus, as in every bench report.
    text = json.dumps({"benchmark": args.what, "config": {k: str(v) if isinstance(v, pathlib.Path) else v
                                                         for k, v in vars(args).items()},
                       "environment": environment, "results": results}, indent=2)
    print(text)
    if args.json:
        try:
            write_output("--json", args.json, text + "\n")
        except ConfigError as exc:  # the results are on stdout already
            return report_error(parser.prog, exc)
    return 0


MAX_ROUNDS = 1000  # interleaved rounds of every model: a typo of a digit or three more is refused
MAX_PAIRS = 100_000  # tolerance pairs per combination, each run through two models


def _check_args(args: argparse.Namespace) -> None:
    """ConfigError for a count or duration that would time nothing (0, negative, NaN) or run for
    days, and for a --json that cannot be written (its missing directory is made first)."""
    check_count("--rounds", args.rounds, MAX_ROUNDS)
    check_timeout("--seconds", args.seconds)
    check_count("--pairs", args.pairs, MAX_PAIRS)
    check_writable("--json", args.json, make_parent=True)


if __name__ == "__main__":
    raise SystemExit(main())
