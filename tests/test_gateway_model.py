"""The gateway in front of a real (tiny, compiled) model on the tf backend: v2 clients get the
native client's probabilities, and the model's version is its compiled manifest's hash."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("aiohttp")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

from bertpool.clients.client import Client  # noqa: E402
from bertpool.common.tokenizer import BertTokenizer  # noqa: E402
from compile_fixtures import make_savedmodel, quiet_compile  # noqa: E402
from conftest import free_tcp_port  # noqa: E402
from test_gateway import MODEL, feature_inputs, http_get, mrpc_pairs, stop, text_inputs, wait_live  # noqa: E402

pytestmark = pytest.mark.slow


def test_gateway_matches_native_on_a_compiled_tiny_model(tmp_path):
    compiled = tmp_path / "cpu"
    quiet_compile(make_savedmodel(tmp_path / "saved", seed=5), compiled, target="cpu")
    front = f"ipc://{tmp_path}/front.ipc"
    http, grpc = f"127.0.0.1:{free_tcp_port()}", f"127.0.0.1:{free_tcp_port()}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bertpool.pool.serve", "--address", front,
                                 "--worker-address", f"ipc://{tmp_path}/back.ipc", "--parallel", "1",
                                 "--stats-interval-s", "0", "--backend", "tf", "--model", str(compiled),
                                 # One request per batch: a batch runs at the sequence bucket of its longest
                                 # row, so results are bit-equal only when both paths batch alike, which the
                                 # arrival times on a loaded machine do not promise; alone, each row's are fixed.
                                 "--batch-size", "1",
                                 "--gateway-http", http, "--gateway-grpc", grpc],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_live(http, proc, log_path)
        client = httpclient.InferenceServerClient(http)
        meta = client.get_model_metadata(MODEL)
        want_version = hashlib.sha256((compiled / "manifest.json").read_bytes()).hexdigest()[:16]
        assert meta["versions"] == [want_version]
        with Client(front, timeout_s=120) as native:  # waits for the worker to load
            pairs = mrpc_pairs(6)
            want = np.stack([r.probabilities for r in native.predict_many(pairs)])
        assert http_get(f"http://{http}/v2/health/ready")[0] == 200
        got_http = client.infer(MODEL, text_inputs(httpclient, pairs)).as_numpy("probabilities")
        got_grpc = grpcclient.InferenceServerClient(grpc).infer(MODEL, text_inputs(grpcclient, pairs))
        # Same math, but rows may be batched with different neighbours than the native run's, and a
        # CPU matmul's per-row rounding depends on the batch it is in: equal to float32 rounding.
        np.testing.assert_allclose(got_http, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_grpc.as_numpy("probabilities"), want, rtol=0, atol=1e-6)
        f = BertTokenizer(compiled / "vocab.txt").encode_pairs(pairs)
        arrays = (f.input_ids, f.input_mask, f.segment_ids)
        got_features = client.infer(MODEL, feature_inputs(httpclient, arrays)).as_numpy("probabilities")
        np.testing.assert_allclose(got_features, want, atol=1e-6)  # batched with other rows: same math
    finally:
        stop(proc)
