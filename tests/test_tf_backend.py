"""The tf backend on a tiny run_classifier SavedModel the test builds itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from bertpool.clients.client import Client  # noqa: E402
from bertpool.common.data import generate_pairs  # noqa: E402
from bertpool.common.tokenizer import BertTokenizer  # noqa: E402
from bertpool.compile.demo_model import build_demo_model  # noqa: E402
from bertpool.workers.backends import BackendConfig, SavedModelBackend, load_backend, run_padded  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("tiny") / "model", size="tiny", seed=3)


@pytest.fixture(scope="module")
def compiled_tiny(tiny_model, tmp_path_factory):
    """tiny_model compiled for the cpu target."""
    from bertpool.compile.build import CompileOptions, compile_model

    compiled = tmp_path_factory.mktemp("compiled") / "cpu"
    compile_model(CompileOptions(input=tiny_model, output=compiled, target="cpu", progress=False))
    return compiled


def run_worker(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """bertpool-worker ``args`` against an address no broker binds (what is checked at load fails first),
    started as by hand: without the TF log level a supervisor (or an in-process CLI test) would set."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "bertpool.workers.worker", "--worker-address",
                           f"ipc://{tmp_path}/nobody", *args], capture_output=True, text=True, timeout=300, env=env)


def reference_probabilities(model_dir, pairs) -> np.ndarray:
    """Run the original export directly through its signature, with all its inputs."""
    features = BertTokenizer(model_dir / "vocab.txt").encode_pairs(pairs)
    fn = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    n = len(pairs)
    out = fn(input_ids=tf.constant(features.input_ids), input_mask=tf.constant(features.input_mask),
             segment_ids=tf.constant(features.segment_ids), label_ids=tf.zeros([n], tf.int32),
             is_real_example=tf.ones([n], tf.int32))
    return out["probabilities"].numpy()


def test_saved_model_backend_matches_the_signature(tiny_model):
    backend = load_backend(BackendConfig(name="tf", model_dir=str(tiny_model)))
    assert isinstance(backend, SavedModelBackend)
    assert backend.seq_length == 128 and backend.vocab_path == tiny_model / "vocab.txt"
    assert backend.vocab_size == 2048  # the tiny model's word embedding rows, from its checkpoint's index
    pairs = [(p.text_a, p.text_b) for p in generate_pairs(6, seed=1)]
    f = BertTokenizer(backend.vocab_path).encode_pairs(pairs)
    got = run_padded(backend, f.input_ids, f.input_mask, f.segment_ids, batch_size=4)
    want = reference_probabilities(tiny_model, pairs)
    assert got.shape == (6, 2)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_tf_backend_served_end_to_end(start_pool, tiny_model):
    pool = start_pool("--backend", "tf", "--model", str(tiny_model), "--batch-timeout-ms", "5",
                      parallel=2)
    pairs = [(p.text_a, p.text_b) for p in generate_pairs(24, seed=2)]
    with Client(pool.address, timeout_s=60) as client:
        results = client.predict_many(pairs)
    want = reference_probabilities(tiny_model, pairs)
    got = np.stack([r.probabilities for r in results])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [r.label for r in results] == list(np.argmax(want, axis=1))


def test_compiled_model_served_end_to_end_matches_the_original(start_pool, tiny_model, compiled_tiny):
    compiled = compiled_tiny
    pool = start_pool("--backend", "tf", "--model", str(compiled), "--batch-timeout-ms", "5", parallel=2)
    pairs = [(p.text_a, p.text_b) for p in generate_pairs(20, seed=4)]
    with Client(pool.address, timeout_s=60) as client:
        results = client.predict_many(pairs)
    want = reference_probabilities(tiny_model, pairs)
    got = np.stack([r.probabilities for r in results])
    np.testing.assert_allclose(got, want, atol=1e-5)  # the float32 equivalence bound
    assert [r.label for r in results] == list(np.argmax(want, axis=1))


@pytest.mark.parametrize("tokens", [4, 2049])
def test_worker_refuses_a_vocab_of_another_size_than_the_models_embeddings(tiny_model, tmp_path, tokens):
    """bertpool-compile's check, at load: a smaller --vocab served every word as [UNK] (wrong answers, no
    error); a larger one failed at warm-up with a traceback (ids past the 2048 rows)."""
    from bertpool.common.vocab import write_vocab
    from bertpool.compile.vocab import generate_vocab

    vocab = tmp_path / "vocab.txt"
    if tokens < 130:
        vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    else:
        write_vocab(vocab, generate_vocab(tokens))
    proc = run_worker(tmp_path, "--model", str(tiny_model), "--vocab", str(vocab))
    assert proc.returncode == 2, proc.stderr
    assert (f"vocabulary {vocab} has {tokens} tokens but bert/embeddings/word_embeddings has 2048 rows; give "
            f"--vocab the model's own vocab.txt, or drop --vocab") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_refuses_a_model_whose_ready_the_broker_would_refuse(compiled_tiny, tmp_path):
    """A manifest source.sha256 longer than READY's labels allow: the broker dropped each READY unheard and
    the worker re-registered forever. Now the load fails (exit 2) saying why."""
    model = tmp_path / "longhash"
    shutil.copytree(compiled_tiny, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["source"]["sha256"] = "ab" * 200
    (model / "manifest.json").write_text(json.dumps(manifest))
    proc = run_worker(tmp_path, "--model", str(model))
    assert proc.returncode == 2, proc.stderr
    assert "the broker would refuse this worker's READY, so it could never register: hash: must be a str of " \
           "at most 128 characters" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # TensorFlow ran (the model loaded) in a worker started by hand: its C++ INFO lines (this one says
    # which CPU instructions the build skips) stay out of the log, as in a supervisor's workers.
    assert "cpu_feature_guard" not in proc.stderr, proc.stderr
    assert load_backend(BackendConfig(name="tf", model_dir=str(compiled_tiny))).vocab_size == 2048
