"""The tf backend on a tiny run_classifier SavedModel the test builds itself."""

from __future__ import annotations

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


def test_compiled_model_served_end_to_end_matches_the_original(start_pool, tiny_model, tmp_path):
    from bertpool.compile.build import CompileOptions, compile_model

    compiled = tmp_path / "cpu"
    compile_model(CompileOptions(input=tiny_model, output=compiled, target="cpu", progress=False))
    pool = start_pool("--backend", "tf", "--model", str(compiled), "--batch-timeout-ms", "5", parallel=2)
    pairs = [(p.text_a, p.text_b) for p in generate_pairs(20, seed=4)]
    with Client(pool.address, timeout_s=60) as client:
        results = client.predict_many(pairs)
    want = reference_probabilities(tiny_model, pairs)
    got = np.stack([r.probabilities for r in results])
    np.testing.assert_allclose(got, want, atol=1e-5)  # the float32 equivalence bound
    assert [r.label for r in results] == list(np.argmax(want, axis=1))
