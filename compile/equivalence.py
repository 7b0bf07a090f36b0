"""The equivalence proof: original vs rebuilt model on the same sentence pairs.

"The original" is the model as the user gave it:
    * savedmodel: the SavedModel itself, run through TF2's v1 loader in a Session;
    * checkpoint / hf: these carry weights but no graph, so the original is the
      plain reference implementation (:mod:`.reference`, google-research's
      modeling.py layout) fed the extracted weights.
"The rebuilt" is the compiled output directory loaded with
:func:`.runtime.load_compiled` (cpu/gpu: from disk, exactly as served), or, for a
neuron build on a host without Inferentia, the rebuilt graph run on the CPU at
the same dtype before tracing.

Tolerances on max |p_original - p_rebuilt| over all pairs and both classes,
measured with ``python -m bertpool.bench.compile tolerance`` on the demo
models (generated pairs; max over 64 pairs for tiny/base/large x every source
GELU, and 512 pairs for tiny/base):

    dtype      measured max |dp|              mean |dp|     bound
    float32    <= 1.0e-6                       <= 2.0e-7     1e-5 (from the issue)
    float16    <= 1.4e-3 (tiny, 512 pairs)     <= 5.9e-4     5e-3
    bfloat16   <= 1.4e-2 (tiny, 512 pairs)     <= 4.8e-3     4e-2

float16 keeps 11 significant bits (weights and activations each rounded by up
to 2^-11 relative before every matmul; accumulation stays fp32, as on
Inferentia), bfloat16 only 8. The mean error grows with depth (large has the
highest), the max with the number of pairs; the bounds leave ~3x headroom
over the worst case seen, for data with more extreme logits than the demo's
calibrated classifier. Differences in fp32 come from op order only. Labels
can flip at float16/bfloat16 when p is within the error of 0.5 (seen: 1 in 512
for float16 on base), so label agreement is reported, not required. What does
hold, and tests/test_compile.py checks: a pair's label can differ only if its
original top two probabilities lie within 2 * max |dp| of each other (for two
labels: p within max |dp| of 0.5); the report counts those pairs as
``near_ties``, so ``label_agreement >= 1 - near_ties / pairs``.

Which rows: the --pairs pairs, plus one probe row per compiled sequence length
(:func:`probe_features`). Pairs alone left parts of the served model unproved:
generated pairs put a truncated pair every 8th row, so with batch 4 every batch
ran at the 64 or the 128 bucket (with batch 8, at 128 alone; below 8 pairs no
row reached 128), and --pairs a multiple of the batch size never left the
runtime a short batch to pad. So the rebuilt model also answers the first pairs
in calls of 1, 2 and 3 rows (:data:`SHORT_CALLS`: short batches, padded), and
each probe row alone, cut from the longest pair so that its last real token
lies just past a bucket's end (a bucket cut one token short drops it) or at the
smallest bucket's end or the full length. ``max_abs_diff`` covers the probes;
label agreement and near ties are about the pairs.

When the rebuilt GELU differs from the source's (e.g. ``--crude_gelu`` on an
erf-trained model) the rebuilt model is deliberately a different function; the
bound then grows by GELU_APPROXIMATION_TOLERANCE (measured, fp32: tanh vs erf
<= 3.1e-4; crude vs erf <= 2.0e-2 on large, 1.3e-2 on tiny with 2 labels in
512 flipped).

Two stages below float32 (:func:`prove`). The float16 bound (5e-3) is wider
than some real mistakes: a rebuilt graph computing the tanh GELU where the
source uses erf moved probabilities by 1.3e-3 on the tiny demo model, as much
as float16 rounding does, and passed. So a model at float16 or bfloat16 is
proven in two stages on the same rows, the original run once: first a float32
twin of the rebuilt graph (built by the same code with the same options, GELU
included, only computing in float32; run in this process behind the
runtime's host part) at the float32 bound (plus the GELU allowance only when
the user chose another GELU), which a mistake in the graph fails; then the
model itself at its dtype's bound, which then only has to cover rounding. The
report's top-level numbers are the model's; ``float32_twin`` holds the first
stage's (null for a float32 model, whose single stage is already the tight
one). ``passed`` needs both. What the twin does not cover: the export itself
(the SavedModel written to disk, a Neuron trace), which only the second stage
and the reference pairs check, at the dtype's bound.
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import numpy as np

from ..common.cli import counted
from ..common.errors import ConfigError
from .host import softmax
from .weights import BertWeights

# max |difference in probability| accepted per matmul dtype (measurements in the module docstring)
TOLERANCES = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}
# Extra allowance when the rebuilt GELU approximates the source's differently (keyed by the
# approximation involved: tanh <-> erf, or crude <-> anything); measured above.
GELU_APPROXIMATION_TOLERANCE = {"tanh": 2e-3, "crude": 6e-2}
ORIGINAL_BATCH = 16  # rows per call of the original model (its batch is dynamic)
# Sizes of the rebuilt model's first calls, before ORIGINAL_BATCH rows a call: a served model gets
# batches short of its compiled batch size, which the runtime pads, and the proof must run them too.
SHORT_CALLS = (1, 2, 3)


@dataclass
class TwinStage:
    """The first stage of a proof below float32: the float32 twin of the rebuilt graph (module docstring)."""

    max_abs_diff: float  # max |p_original - p_twin| over pairs, probe rows and classes
    mean_abs_diff: float  # its mean, for context
    label_agreement: float  # fraction of pairs whose argmax agrees
    near_ties: int  # as EquivalenceReport's, for the twin
    tolerance: float  # the float32 bound (tolerance_for), whatever --tolerance says
    passed: bool  # max_abs_diff <= tolerance
    rebuilt: str  # what ran as the twin


@dataclass
class EquivalenceReport:
    """Outcome of the proof (the manifest's ``equivalence`` section). The numbers are the rebuilt
    model's (at its dtype); ``float32_twin`` the first stage's when it ran (see :func:`prove`)."""

    pairs: int  # number of sentence pairs compared
    probe_rows: int  # rows compared beyond the pairs: one per compiled sequence length (probe_features)
    data: str  # where they came from: a TSV path or "generated (seed N)"
    max_abs_diff: float  # max |p_original - p_rebuilt| over pairs, probe rows and classes
    mean_abs_diff: float  # its mean, for context
    label_agreement: float  # fraction of pairs whose argmax agrees
    near_ties: int  # pairs whose original top-two gap is <= 2 * max_abs_diff: the only ones that may flip
    tolerance: float  # the bound max_abs_diff must not exceed
    passed: bool  # max_abs_diff <= tolerance, and the float32 twin's stage passed when it ran
    original: str  # what ran as the original (see module docstring)
    rebuilt: str  # what ran as the rebuilt model
    dtype: str | None = None  # the rebuilt model's compute dtype, when the caller named it
    float32_twin: TwinStage | None = None  # the first stage, below float32 only; None: not run

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: the verdict, then each stage's max |dp| and bound (the twin's first)."""
        verdict = "PASSED" if self.passed else "FAILED"
        stages = ""
        if self.float32_twin is not None:
            t = self.float32_twin
            stages = (f"float32 twin of the graph: max |dp| = {t.max_abs_diff:.3g} (tolerance {t.tolerance:.3g}"
                      f"{'' if t.passed else ', FAILED: the graph differs'}); then the {self.dtype} model: ")
        return (f"equivalence {verdict}: {self.pairs} pairs + {self.probe_rows} probe rows, {stages}"
                f"max |dp| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), "
                f"mean |dp| = {self.mean_abs_diff:.3g}, label agreement {self.label_agreement:.2%}")

    def failure(self) -> str:
        """Why the proof failed, naming the stage: the graph (the twin) or the rounding (the model)."""
        mine = f"max |dp| = {self.max_abs_diff:.3g}"
        t = self.float32_twin
        if t is not None and not t.passed:
            within = "<=" if self.max_abs_diff <= self.tolerance else ">"
            return (f"the rebuilt graph differs from the original, not by rounding: its float32 twin (the same "
                    f"graph built with the same options, computed in float32) is off by max |dp| = "
                    f"{t.max_abs_diff:.3g} > tolerance {t.tolerance:.3g} (the {self.dtype} model: {mine} "
                    f"{within} its rounding bound {self.tolerance:.3g})")
        graph_ok = ("" if t is None else f" (its float32 twin passed, max |dp| = {t.max_abs_diff:.3g} <= "
                    f"{t.tolerance:.3g}: the graph matches; {self.dtype} rounding exceeds its bound)")
        return f"rebuilt model differs from the original: {mine} > tolerance {self.tolerance:.3g}{graph_ok}"


def tolerance_for(dtype: str, gelu: str, source_gelu: str) -> float:
    """The default bound for a rebuilt model at ``dtype`` with ``gelu`` vs a ``source_gelu`` original."""
    bound = TOLERANCES[dtype]
    if gelu != source_gelu:
        kind = "crude" if "crude" in (gelu, source_gelu) else "tanh"
        bound += GELU_APPROXIMATION_TOLERANCE[kind]
    return bound


def tsv_pairs(tsv: pathlib.Path) -> list[tuple[str, str]]:
    """Every (text_a, text_b) pair of an MRPC TSV, in file order; ConfigError if it holds none or is
    not one (read_mrpc_tsv's errors)."""
    from ..common.data import read_mrpc_tsv

    pairs = read_mrpc_tsv(tsv)
    if not pairs:
        raise ConfigError(f"--tsv {tsv} holds no pairs")
    return [(p.text_a, p.text_b) for p in pairs]


def check_tsv_pairs(tsv: pathlib.Path, n: int) -> None:
    """ConfigError unless ``tsv`` holds at least ``n`` pairs: cut to what the file had, a proof on
    --pairs N would prove fewer pairs than asked, without a word."""
    have = len(tsv_pairs(tsv))
    if have < n:
        raise ConfigError(f"--tsv {tsv} holds only {counted(have, 'pair')}, fewer than "
                          f"--pairs {n}; pass --pairs {have} (or fewer) or a longer file")


def load_pairs(tsv: pathlib.Path | None, n: int, seed: int = 0) -> tuple[list[tuple[str, str]], str]:
    """n sentence pairs generated from ``seed``, or an MRPC TSV's first n (fewer if it holds fewer:
    callers that need n check first with :func:`check_tsv_pairs`); plus a description."""
    if tsv is not None:
        return tsv_pairs(tsv)[:n], str(tsv)
    from ..common.data import generate_pairs

    return [(p.text_a, p.text_b) for p in generate_pairs(n, seed=seed)], f"generated (seed {seed})"


class SavedModelOriginal:
    """A run_classifier SavedModel run through the TF1 loader in its own Session."""

    def __init__(self, path: pathlib.Path, weights: BertWeights) -> None:
        import tensorflow as tf

        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph)
        with self._graph.as_default():
            tf.compat.v1.saved_model.loader.load(self._session, ["serve"], str(path))
        self._signature = weights.signature

    def predict(self, input_ids, input_mask, segment_ids) -> np.ndarray:
        n = len(input_ids)
        feed_values = {"input_ids": input_ids, "input_mask": input_mask, "segment_ids": segment_ids,
                       "label_ids": np.zeros([n], np.int32), "is_real_example": np.ones([n], np.int32)}
        feed = {name: feed_values[key] for key, name in self._signature.inputs.items() if key in feed_values}
        out = self._session.run(self._signature.output, feed)
        # an export that returns logits only: the served model is their softmax (run_classifier's)
        return softmax(out) if self._signature.logits else out

    def close(self) -> None:
        self._session.close()


def open_original(weights: BertWeights, seq_length: int):
    """The original model as a ``predict(ids, mask, segments) -> probs`` object."""
    if weights.source.format == "savedmodel":
        return SavedModelOriginal(weights.source.path, weights)
    from .reference import ReferenceModel

    return ReferenceModel(weights.shape, weights.tensors, seq_length, weights.gelu)


def describe_original(weights: BertWeights) -> str:
    if weights.source.format == "savedmodel":
        logits = weights.signature is not None and weights.signature.logits
        return "the SavedModel (TF1 loader, Session" + (", softmax of its logits)" if logits else ")")
    return f"reference BERT graph ({weights.gelu} GELU) fed the {weights.source.format} weights"


def probe_features(features, lengths) -> SimpleNamespace:
    """Rows [len(probe_lengths(lengths)), S] that put a real token at each bucket edge, from
    ``features`` (tokenized pairs [N, S]) and the compiled sequence lengths ``lengths``.

    Row for length L: the longest pair's first L-1 real tokens (repeated, less [CLS], when it is
    shorter; segment as its last token's), then its last real token ([SEP]) at position L-1; padding
    after. Alone in a batch it runs at the shortest bucket >= L. No rows for no pairs.
    """
    ids, mask, segments = (np.asarray(a) for a in (features.input_ids, features.input_mask, features.segment_ids))
    targets = [L for L in probe_lengths(lengths) if L <= ids.shape[1]] if len(ids) else []
    out = SimpleNamespace(**{name: np.zeros([len(targets), ids.shape[1]], ids.dtype)
                             for name in ("input_ids", "input_mask", "segment_ids")})
    if not targets:
        return out
    S, longest = ids.shape[1], int(np.argmax(mask.sum(axis=1)))
    real = max(int(mask[longest].sum()), 2)  # under 2 real tokens: [CLS] and the token after it
    head, last, last_type = ids[longest, : real - 1], ids[longest, real - 1], segments[longest, real - 1]
    body = head[1:] if len(head) > 1 else head  # what repeats past the pair's end: [CLS] once is enough
    more = max(S - real, 0)
    tokens = np.concatenate([head, np.resize(body, more)])  # [>= S-1]: the first L-1 of a row of L
    types = np.concatenate([segments[longest, : real - 1], np.full(more, last_type)])
    for i, length in enumerate(targets):
        out.input_ids[i, : length - 1], out.input_ids[i, length - 1] = tokens[: length - 1], last
        out.segment_ids[i, : length - 1], out.segment_ids[i, length - 1] = types[: length - 1], last_type
        out.input_mask[i, :length] = 1
    return out


def probe_lengths(lengths) -> list[int]:
    """Real-token counts of the probe rows for compiled sequence lengths ``lengths``: the smallest
    and the largest exactly, and one past each other's end (so the next one up must run it)."""
    lengths = sorted(set(int(b) for b in lengths))
    if not lengths:
        return []
    return sorted({lengths[0], lengths[-1]} | {b + 1 for b in lengths[:-1]})


def _slices(n: int, first: tuple[int, ...]):
    """Slices covering rows 0..n-1 in order: calls of ``first`` rows, then ORIGINAL_BATCH a call."""
    start = 0
    for size in first:
        if start < n:
            yield slice(start, min(start + size, n))
            start += size
    yield from (slice(s, s + ORIGINAL_BATCH) for s in range(start, n, ORIGINAL_BATCH))


@dataclass
class OriginalAnswers:
    """The original model's probabilities on a proof's rows, computed once for every stage."""

    features: object  # the pairs, tokenized: input_ids, input_mask, segment_ids [N,S]
    probes: SimpleNamespace  # the probe rows [K,S] (probe_features) for ``lengths``
    lengths: tuple[int, ...]  # the compiled sequence lengths the probes were cut for
    probabilities: np.ndarray  # [N+K,C] float32: the pairs' rows, then the probes'
    data: str  # where the pairs came from
    original: str  # what ran as the original


def _run(model, calls, desc: str, progress: bool) -> np.ndarray:
    """``model.predict`` on each (arrays, rows) of ``calls``, in order, concatenated as float32."""
    from tqdm import tqdm

    out = [np.asarray(model.predict(*(a[rows] for a in arrays)), np.float32)
           for arrays, rows in tqdm(calls, desc=desc, unit="call", disable=not progress, leave=False)]
    return np.concatenate(out)


def run_original(original, features, lengths, data: str, original_name: str,
                 progress: bool = True) -> OriginalAnswers:
    """Run ``original`` on ``features`` and on the probe rows for the compiled sequence ``lengths``
    (ORIGINAL_BATCH rows a call: its batch is dynamic)."""
    lengths = tuple(sorted(int(b) for b in lengths))
    probes = probe_features(features, lengths)
    calls = [((features.input_ids, features.input_mask, features.segment_ids), rows)
             for rows in _slices(len(features.input_ids), ())]
    calls += [((probes.input_ids, probes.input_mask, probes.segment_ids), rows)
              for rows in _slices(len(probes.input_ids), ())]
    probabilities = _run(original, calls, "equivalence: original", progress)
    return OriginalAnswers(features, probes, lengths, probabilities, data, original_name)


def measure(answers: OriginalAnswers, rebuilt, tolerance: float, rebuilt_name: str, progress: bool = True,
            dtype: str | None = None) -> EquivalenceReport:
    """Run ``rebuilt`` on the rows ``answers`` holds (short calls first, each probe alone: it sets the
    bucket) and measure it against the original's probabilities. ValueError (a caller's bug) when its
    compiled sequence lengths are not those the probes were cut for."""
    lengths = tuple(sorted(int(b) for b in (getattr(rebuilt, "seq_buckets", None) or [])))
    if lengths != answers.lengths:
        raise ValueError(f"{rebuilt_name} is compiled for sequence lengths {list(lengths)}, but the probe rows "
                         f"were cut for {list(answers.lengths)}")
    f, p = answers.features, answers.probes
    pairs, extra = (f.input_ids, f.input_mask, f.segment_ids), (p.input_ids, p.input_mask, p.segment_ids)
    n, k = len(pairs[0]), len(extra[0])
    calls = [(pairs, rows) for rows in _slices(n, SHORT_CALLS)] + [(extra, slice(i, i + 1)) for i in range(k)]
    p_orig, p_new = answers.probabilities, _run(rebuilt, calls, f"equivalence: {dtype or 'rebuilt'}", progress)
    diff = np.abs(p_orig.astype(np.float64) - p_new.astype(np.float64))
    max_diff = float(diff.max())
    agreement = float(np.mean(p_orig[:n].argmax(-1) == p_new[:n].argmax(-1)))
    top_two = np.sort(p_orig[:n].astype(np.float64), axis=-1)[:, -2:]
    near_ties = int(np.sum(top_two[:, 1] - top_two[:, 0] <= 2 * max_diff))
    return EquivalenceReport(
        pairs=n, probe_rows=k, data=answers.data, max_abs_diff=max_diff, mean_abs_diff=float(diff.mean()),
        label_agreement=agreement, near_ties=near_ties, tolerance=float(tolerance),
        passed=bool(np.isfinite(max_diff) and max_diff <= tolerance),
        original=answers.original, rebuilt=rebuilt_name, dtype=dtype,
    )


def prove(answers: OriginalAnswers, rebuilt, tolerance: float, rebuilt_name: str, dtype: str,
          twin=None, progress: bool = True) -> EquivalenceReport:
    """The proof of ``rebuilt`` (computing in ``dtype``) against the original's ``answers``.

    ``twin``: None, or ``(model, tolerance, name)``, the float32 twin of the same graph (module
    docstring), required below float32 and refused at it (ValueError: a caller's bug). It runs
    first; both stages always run, so a failed report states both, and passes only if both do.
    """
    if (twin is None) != (dtype == "float32"):
        raise ValueError(f"a {dtype} model needs {'no' if dtype == 'float32' else 'a'} float32 twin (got {twin!r})")
    first = None
    if twin is not None:
        model, twin_tolerance, twin_name = twin
        r = measure(answers, model, twin_tolerance, twin_name, progress, dtype="float32")
        first = TwinStage(r.max_abs_diff, r.mean_abs_diff, r.label_agreement, r.near_ties, r.tolerance, r.passed,
                          r.rebuilt)
    report = measure(answers, rebuilt, tolerance, rebuilt_name, progress, dtype=dtype)
    if first is None:
        return report
    return replace(report, float32_twin=first, passed=report.passed and first.passed)
