"""A default BERT classifier that needs no download: seeded random weights.

``build_demo_model(out, "tiny")`` writes what google-research/bert's
run_classifier exports (a TF1 SavedModel, signature ``serving_default``:
int32 ``input_ids``/``input_mask``/``segment_ids`` [None,128], ``label_ids``
and ``is_real_example`` [None]; float32 ``probabilities`` [None,2]; variables
under google-research names) plus a ``vocab.txt``. The graph is the plain
reference implementation (:mod:`.reference`), not the rebuilt one, so that
compiling it and checking equivalence is a real test.

The weights are random but shaped like a trained model's statistics (normal,
std 0.02; LayerNorm gamma near 1). The classifier is then calibrated on a few
random token sequences: its weights point along the direction in which pooled
outputs vary most and are scaled so logits spread over a few units. Without
that, a random BERT outputs ~0.5/0.5 for every pair and label agreement would
mean nothing.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from ..common.cli import (STOPPED, add_exit_status, check_output_dir, check_replaceable, replacing_dir,
                          report_interrupt, sigterm_as_interrupt)
from ..common.data import check_seed
from ..common.errors import ConfigError
from ..common.vocab import write_vocab
from .gelu import GELUS, check_gelu
from .reference import build_reference_graph, load_weights
from .runtime import quiet_tensorflow
from .shape import PRESETS, BertShape
from .vocab import generate_vocab
from .weights import FORMATS, write_checkpoint, write_hf
from .writing import writing

SEQ_LENGTH = 128  # the run_classifier export's fixed max_seq_length
INIT_STD = 0.02  # google-research initializer_range (embedding tables)
KERNEL_GAIN = 1.0  # dense kernels: std = KERNEL_GAIN / sqrt(fan_in)
ATTENTION_GAIN = 1.5  # query/key a bit larger: peakier attention, so tokens matter
LOGIT_SPREAD = 2.0  # std of the calibrated logit difference across inputs
CALIBRATION_SEQUENCES = 64  # random sequences used to calibrate the classifier


def random_weights(shape: BertShape, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random weights for every tensor, float32, google-research names."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, dims in shape.expected_shapes().items():
        if name.endswith("/gamma"):
            value = 1.0 + 0.05 * rng.standard_normal(dims)
        elif name.endswith(("/beta", "/bias")) or name == "output_bias":
            value = 0.02 * rng.standard_normal(dims)
        elif name.endswith("/kernel"):
            # variance-preserving (1/sqrt(fan_in)), like a trained BERT's kernels (std ~0.04 at
            # H=768); google's 0.02 init makes every input look alike at the pooler.
            std = KERNEL_GAIN / np.sqrt(dims[0])
            if "/self/query/" in name or "/self/key/" in name:
                std *= ATTENTION_GAIN
            value = np.clip(rng.standard_normal(dims), -2.0, 2.0) * std  # truncated normal
        else:  # embedding tables and output_weights
            value = np.clip(rng.standard_normal(dims), -2.0, 2.0) * INIT_STD
        weights[name] = value.astype(np.float32)
    return weights


def random_features(shape: BertShape, n: int, seed: int, seq_length: int = SEQ_LENGTH):
    """n random "[CLS] a [SEP] b [SEP]" sequences over ordinary tokens (ids >= 104)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros([n, seq_length], np.int32)
    mask = np.zeros([n, seq_length], np.int32)
    segments = np.zeros([n, seq_length], np.int32)
    for row in range(n):
        len_a = int(rng.integers(3, 30))
        len_b = int(rng.integers(3, 30))
        a = rng.integers(104, shape.vocab_size, len_a)
        b = rng.integers(104, shape.vocab_size, len_b)
        tokens = np.concatenate([[101], a, [102], b, [102]])[:seq_length]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        segments[row, len_a + 2 : len(tokens)] = 1
    return ids, mask, segments


def calibrate_classifier(pooled: np.ndarray, shape: BertShape, seed: int) -> dict[str, np.ndarray]:
    """Classifier weights whose logit difference spreads by ~LOGIT_SPREAD across inputs.

    The direction is the top principal component of the pooled outputs; the
    bias centres the logit difference at the median, so labels split ~50/50.
    """
    rng = np.random.default_rng(seed + 1)
    centred = pooled - pooled.mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    direction = vt[0]
    projection = pooled.astype(np.float64) @ direction
    scale = LOGIT_SPREAD / max(projection.std(), 1e-6)
    noise = INIT_STD * rng.standard_normal([shape.num_labels, shape.hidden])
    weights = noise.copy()
    weights[0] += 0.5 * scale * direction  # logit_0 - logit_1 = scale * projection + noise
    weights[1] -= 0.5 * scale * direction
    bias = np.zeros([shape.num_labels])
    diff = pooled.astype(np.float64) @ (weights[0] - weights[1])
    bias[0] = -0.5 * np.median(diff)
    bias[1] = 0.5 * np.median(diff)
    return {"output_weights": weights.astype(np.float32), "output_bias": bias.astype(np.float32)}


def build_demo_model(output_dir, size: str = "tiny", seed: int = 0, gelu: str = "erf",
                     overwrite: bool = False, fmt: str = "savedmodel", progress: bool = False) -> pathlib.Path:
    """Write a run_classifier SavedModel with seeded random weights and a vocab.txt.

    ``size`` is a preset of :data:`.shape.PRESETS` (tiny, base, large) or a
    :class:`BertShape`. ``gelu`` selects the GELU of the graph (the default,
    exact erf, is what open-source BERT means). ``fmt`` may instead ask for the
    same weights as a google-research checkpoint directory (``checkpoint``) or
    a Hugging Face directory (``hf``). Returns ``output_dir``. The directory
    must not exist or be empty, unless ``overwrite``. ``progress`` shows a
    progress bar over the steps (BERT-Large takes a minute or two).
    """
    shape = _resolve_size(size)
    check_gelu(gelu)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "checkpoint" and gelu == "crude":
        raise ConfigError("a google-research bert_config.json cannot express the crude GELU")
    check_seed(seed)
    out = pathlib.Path(output_dir)
    check_output_dir("output", out, overwrite)
    check_replaceable("output", out, {})
    # Built beside it and swapped in at the end: an interrupted build leaves the old one as it was.
    with replacing_dir(out, overwrite) as staging:
        _write_demo_model(staging, shape, seed, gelu, fmt, progress)
    return out


def _write_demo_model(out: pathlib.Path, shape: BertShape, seed: int, gelu: str, fmt: str, progress: bool) -> None:
    """build_demo_model's work, into ``out`` (which must not exist: the SavedModel builder creates it)."""
    import tensorflow as tf
    from tqdm import tqdm

    bar = tqdm(total=4, desc="demo model", unit="step", disable=not progress, leave=False)
    bar.set_postfix_str("random weights")
    weights = random_weights(shape, seed)
    bar.update()
    graph = tf.Graph()
    with graph.as_default():
        handles = build_reference_graph(shape, SEQ_LENGTH, gelu)
        with tf.compat.v1.Session(graph=graph) as session:
            load_weights(session, handles, weights)
            bar.set_postfix_str("calibrating the classifier")
            ids, mask, segments = random_features(shape, CALIBRATION_SEQUENCES, seed)
            pooled = session.run(handles.pooled, {handles.input_ids: ids, handles.input_mask: mask,
                                                  handles.segment_ids: segments})
            weights.update(calibrate_classifier(pooled, shape, seed))
            load_weights(session, handles, weights, names=["output_weights", "output_bias"])
            bar.update()
            bar.set_postfix_str(f"writing {fmt}")
            if fmt == "savedmodel":
                save_run_classifier(session, handles, out)
    with writing(out):  # a checkpoint's write fails in TensorFlow, as the SavedModel's does
        if fmt == "checkpoint":
            write_checkpoint(out, shape, weights, gelu)
        elif fmt == "hf":
            write_hf(out, shape, weights, gelu)
    bar.update()
    with writing(out / "vocab.txt"):
        write_vocab(out / "vocab.txt", generate_vocab(shape.vocab_size))
    bar.update()
    bar.close()


def save_run_classifier(session, handles, out: pathlib.Path) -> None:
    """Save as run_classifier's serving_input_receiver_fn export does (tag 'serve')."""
    import tensorflow as tf

    v1 = tf.compat.v1
    sig = v1.saved_model.signature_def_utils.predict_signature_def(
        inputs={"input_ids": handles.input_ids, "input_mask": handles.input_mask,
                "segment_ids": handles.segment_ids, "label_ids": handles.label_ids,
                "is_real_example": handles.is_real_example},
        outputs={"probabilities": handles.probabilities},
    )
    # TensorFlow's error for a failed write (a full disk, no permission) leaves as an OSError naming
    # ``out``: replacing_dir then says "cannot write OUTPUT" (exit 2), not a bug.
    with writing(out):
        builder = v1.saved_model.Builder(str(out))
        builder.add_meta_graph_and_variables(
            session, [v1.saved_model.tag_constants.SERVING],
            signature_def_map={"serving_default": sig}, strip_default_attrs=True,
        )
        builder.save()


def _resolve_size(size) -> BertShape:
    if isinstance(size, BertShape):
        return size
    try:
        return PRESETS[size]
    except KeyError:
        raise ConfigError(f"unknown size {size!r}; expected one of {', '.join(PRESETS)}") from None


def main(argv=None) -> int:
    """CLI: bertpool-demo-model --size tiny|base|large --output DIR [--seed N]."""
    parser = argparse.ArgumentParser(
        prog="bertpool-demo-model",
        description="Write a google-research run_classifier SavedModel (TF1) with seeded random "
                    "weights and a generated vocab.txt. Needs no download. Sizes: "
                    + "; ".join(f"{k}: {v.layers} layers x {v.hidden} hidden, {v.heads} heads, "
                                f"vocab {v.vocab_size}" for k, v in PRESETS.items()),
    )
    parser.add_argument("--size", choices=sorted(PRESETS), default="tiny",
                        help="model size; 'large' is the BERT-Large shape (default: tiny)")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to create")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    parser.add_argument("--gelu", choices=GELUS, default="erf",
                        help="GELU of the graph (default: erf, exact; as open-source BERT)")
    parser.add_argument("--format", choices=FORMATS, default="savedmodel",
                        help="savedmodel: run_classifier TF1 export (default); checkpoint: google-research "
                             "bert_config.json + bert_model.ckpt; hf: Hugging Face config.json + model.safetensors")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    add_exit_status(parser, f"0 written, 2 a bad flag or an output it cannot write, {STOPPED}; either way "
                            f"--output is whole or as it was")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    try:
        with sigterm_as_interrupt():
            out = build_demo_model(args.output, args.size, args.seed, args.gelu, overwrite=args.force,
                                   fmt=args.format, progress=True)
    except ConfigError as exc:
        print(f"bertpool-demo-model: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a file where a parent directory should be, or no permission
        print(f"bertpool-demo-model: error: cannot write {args.output}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): exit 130 or 143
        return report_interrupt("bertpool-demo-model", exc, f"; {args.output} is as it was")
    shape = PRESETS[args.size]
    print(f"wrote {args.size} demo model as {args.format} ({shape.layers} layers x {shape.hidden}, "
          f"vocab {shape.vocab_size}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
