"""The KServe v2 gateway end to end: Triton's own clients -> gateway -> broker -> echo workers.

Real processes: bertpool-serve with --gateway-http/--gateway-grpc (the gateway as its child), or
bertpool-broker + bertpool-gateway for the error cases that need a pool with no workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("grpc")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from bertpool.clients.bench import wait_for_workers  # noqa: E402
from bertpool.clients.client import Client  # noqa: E402
from bertpool.common.data import SHARED_MRPC_DEV_FILE, default_pairs, read_mrpc_tsv, shared_file  # noqa: E402
from conftest import free_tcp_port, stop_processes  # noqa: E402

MODEL = "bertpool-mrpc"
S = 128


def mrpc_pairs(n: int) -> list[tuple[str, str]]:
    """MRPC dev pairs when ../shared/data has them, else the bundled MRPC-like sample."""
    tsv = shared_file(SHARED_MRPC_DEV_FILE)
    pairs = read_mrpc_tsv(tsv) if tsv else default_pairs()
    return [(p.text_a, p.text_b) for p in pairs[:n]]


def wait_live(http: str, proc: subprocess.Popen, log_path, timeout_s: float = 60.0, what: str = "live") -> None:
    """Block until GET /v2/health/``what`` answers 200 (bounded), or fail with the process log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://{http}/v2/health/{what}", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"gateway never {what} (exit {proc.poll()}):\n{log_path.read_text(errors='replace')}")


def wait_ready(http: str, proc: subprocess.Popen, log_path, timeout_s: float = 60.0) -> None:
    """Block until the gateway says ready (a worker is registered): before that, inference is 503."""
    wait_live(http, proc, log_path, timeout_s, what="ready")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL the process's whole session (its broker and workers included)."""
    stop_processes(proc, timeout_s=20)


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Served:
    def __init__(self, address: str, http: str, grpc: str) -> None:
        self.address, self.http, self.grpc = address, http, grpc

    def url(self, path: str) -> str:
        return f"http://{self.http}{path}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """bertpool-serve (2 echo workers) with its gateway child on HTTP and gRPC."""
    tmp = tmp_path_factory.mktemp("gateway")
    front, back = f"ipc://{tmp}/front.ipc", f"ipc://{tmp}/back.ipc"
    http, grpc = f"127.0.0.1:{free_tcp_port()}", str(free_tcp_port())  # a bare port: 127.0.0.1
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bertpool.pool.serve", "--address", front,
                                 "--worker-address", back, "--parallel", "2", "--stats-interval-s", "0",
                                 "--batch-timeout-ms", "2", "--gateway-http", http, "--gateway-grpc", grpc],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(http, proc, log_path)
        yield Served(front, http, f"127.0.0.1:{grpc}")
    finally:
        stop(proc)
    assert proc.returncode == 0, log_path.read_text()


def native(served: Served, pairs) -> np.ndarray:
    with Client(served.address, timeout_s=30) as client:
        return np.stack([r.probabilities for r in client.predict_many(pairs)])


def native_features(served: Served, ids, mask, segs) -> np.ndarray:
    with Client(served.address, timeout_s=30) as client:
        futures = [client.submit_features(ids[i], mask[i], segs[i]) for i in range(len(ids))]
        return np.stack([f.result().probabilities for f in futures])


def random_features(n: int, seed: int = 0, dtype=np.int32):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 30, size=(n, S)).astype(dtype)  # within the echo backend's tiny vocabulary
    lengths = rng.integers(5, S, size=n)
    mask = (np.arange(S)[None, :] < lengths[:, None]).astype(dtype)
    segs = ((np.arange(S)[None, :] > lengths[:, None] // 2) & (mask == 1)).astype(dtype)
    return ids * mask, mask, segs


def text_inputs(module, pairs, binary: bool = True, shape_2d: bool = False):
    a = np.array([p[0].encode() for p in pairs], dtype=object)
    b = np.array([p[1].encode() for p in pairs], dtype=object)
    if shape_2d:
        a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    inputs = []
    for name, arr in (("text_a", a), ("text_b", b)):
        t = module.InferInput(name, list(arr.shape), "BYTES")
        if module is httpclient:
            t.set_data_from_numpy(arr, binary_data=binary)
        else:
            t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def feature_inputs(module, arrays, datatype="INT32", binary: bool = True):
    inputs = []
    for name, arr in zip(("input_ids", "input_mask", "segment_ids"), arrays):
        t = module.InferInput(name, list(arr.shape), datatype)
        if module is httpclient:
            t.set_data_from_numpy(arr, binary_data=binary)
        else:
            t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


# ------------------------------------------------------------------- inference

@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_text_matches_native(served, n, binary):
    pairs = mrpc_pairs(n)
    client = httpclient.InferenceServerClient(served.http)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary),
               httpclient.InferRequestedOutput("label", binary_data=binary)]
    result = client.infer(MODEL, text_inputs(httpclient, pairs, binary), outputs=outputs, request_id="r1")
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (n, 2)
    np.testing.assert_array_equal(probs, native(served, pairs))
    np.testing.assert_array_equal(result.as_numpy("label"), probs.argmax(axis=1))
    assert result.as_numpy("label").dtype == np.int64
    assert result.get_response()["id"] == "r1"


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("datatype", ["INT32", "INT64"])
def test_http_features_match_native(served, n, datatype):
    arrays = random_features(n, seed=n, dtype=np.int32 if datatype == "INT32" else np.int64)
    client = httpclient.InferenceServerClient(served.http)
    result = client.infer(MODEL, feature_inputs(httpclient, arrays, datatype))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), native_features(served, *arrays))


def test_http_text_shape_n_by_1_and_one_output(served):
    pairs = mrpc_pairs(3)
    client = httpclient.InferenceServerClient(served.http)
    result = client.infer(MODEL, text_inputs(httpclient, pairs, shape_2d=True),
                          outputs=[httpclient.InferRequestedOutput("label")])
    assert result.as_numpy("probabilities") is None
    np.testing.assert_array_equal(result.as_numpy("label"), native(served, pairs).argmax(axis=1))


def test_http_versioned_url_and_plain_json(served):
    """curl-style JSON with nested data and a version in the URL."""
    pairs = mrpc_pairs(2)
    status, meta = http_get(served.url(f"/v2/models/{MODEL}"))
    version = meta["versions"][0]
    body = {"id": "x", "inputs": [
        {"name": "text_a", "datatype": "BYTES", "shape": [2, 1], "data": [[pairs[0][0]], [pairs[1][0]]]},
        {"name": "text_b", "datatype": "BYTES", "shape": [2, 1], "data": [[pairs[0][1]], [pairs[1][1]]]}]}
    status, doc = http_post(served.url(f"/v2/models/{MODEL}/versions/{version}/infer"), json.dumps(body).encode())
    assert status == 200, doc
    assert doc["model_name"] == MODEL and doc["model_version"] == version and doc["id"] == "x"
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["probabilities"]["shape"] == [2, 2] and out["probabilities"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["probabilities"]["data"], np.float32).reshape(2, 2),
                               native(served, pairs))
    assert out["label"] == {"name": "label", "datatype": "INT64", "shape": [2],
                            "data": native(served, pairs).argmax(axis=1).tolist()}


@pytest.mark.parametrize("n", [1, 8])
def test_grpc_text_matches_native(served, n):
    pairs = mrpc_pairs(n)
    client = grpcclient.InferenceServerClient(served.grpc)
    result = client.infer(MODEL, text_inputs(grpcclient, pairs), request_id="g1")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), native(served, pairs))
    np.testing.assert_array_equal(result.as_numpy("label"), native(served, pairs).argmax(axis=1))
    assert result.get_response().id == "g1"


@pytest.mark.parametrize("n", [1, 4])
def test_grpc_features_match_native(served, n):
    arrays = random_features(n, seed=10 + n, dtype=np.int64)
    client = grpcclient.InferenceServerClient(served.grpc)
    result = client.infer(MODEL, feature_inputs(grpcclient, arrays, "INT64"),
                          outputs=[grpcclient.InferRequestedOutput("probabilities")])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), native_features(served, *arrays))
    assert result.as_numpy("label") is None


# ------------------------------------------------------------- health, metadata

def test_http_health_and_metadata(served):
    client = httpclient.InferenceServerClient(served.http)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert http_get(served.url("/v2/health/live")) == (200, {"live": True})
    assert http_get(served.url("/v2/health/ready")) == (200, {"ready": True})
    server = client.get_server_metadata()
    assert server["name"] == "bertpool" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["platform"] == "bertpool" and len(meta["versions"]) == 1
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "text_a": ("BYTES", [-1]), "text_b": ("BYTES", [-1]), "input_ids": ("INT32", [-1, S]),
        "input_mask": ("INT32", [-1, S]), "segment_ids": ("INT32", [-1, S])}
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, 2]), "label": ("INT64", [-1])}
    assert client.get_model_metadata(MODEL, model_version=meta["versions"][0]) == meta
    assert client.is_model_ready(MODEL, model_version=meta["versions"][0])


def test_grpc_health_and_metadata(served):
    client = grpcclient.InferenceServerClient(served.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    server = client.get_server_metadata()
    assert server.name == "bertpool" and "binary_tensor_data" in server.extensions
    meta = client.get_model_metadata(MODEL, as_json=True)
    http_meta = httpclient.InferenceServerClient(served.http).get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == http_meta["versions"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == \
        [(t["name"], t["datatype"], t["shape"]) for t in http_meta["inputs"]]


# ----------------------------------------------------------------------- errors

def test_unknown_model_is_404_and_not_found(served):
    assert http_get(served.url("/v2/models/nope"))[0] == 404
    assert http_get(served.url(f"/v2/models/{MODEL}/versions/nope"))[0] == 404
    status, doc = http_get(served.url("/v2/models/nope/ready"))
    assert status == 404 and "nope" in doc["error"]
    with pytest.raises(InferenceServerException) as exc:
        httpclient.InferenceServerClient(served.http).infer("nope", text_inputs(httpclient, mrpc_pairs(1)))
    assert exc.value.status() == "404" and "unknown model 'nope'" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        grpcclient.InferenceServerClient(served.grpc).infer("nope", text_inputs(grpcclient, mrpc_pairs(1)))
    assert exc.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as exc:
        grpcclient.InferenceServerClient(served.grpc).get_model_metadata("nope")
    assert exc.value.status() == "StatusCode.NOT_FOUND"


def _text(shape, data, datatype="BYTES", name="text_a"):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


BAD_REQUESTS = {
    "not json": (b"{nope", "not valid JSON"),
    "not an object": (b"[1, 2]", "JSON object"),
    "no inputs": (json.dumps({"inputs": []}).encode(), "inputs"),
    "bad datatype": (json.dumps({"inputs": [_text([1], ["a"], "FP32"), _text([1], ["b"], name="text_b")]}).encode(),
                     "datatype FP32, expected BYTES"),  # refused on its declaration, before its data
    "unknown datatype": (json.dumps({"inputs": [_text([1], ["a"], "STRING")]}).encode(), "unknown datatype"),
    "wrong datatype": (json.dumps({"inputs": [_text([1], [1], "INT32"), _text([1], ["b"], name="text_b")]}).encode(),
                       "expected BYTES"),
    "bad shape": (json.dumps({"inputs": [_text([1, 2], ["a", "b"]), _text([1, 2], ["c", "d"], name="text_b")]}).encode(),
                  "expected [N] or [N,1]"),
    "data vs shape": (json.dumps({"inputs": [_text([2], ["a"]), _text([2], ["c", "d"], name="text_b")]}).encode(),
                      "needs 2"),
    "missing input": (json.dumps({"inputs": [_text([1], ["a"])]}).encode(), "missing input(s) text_b"),
    "unknown input": (json.dumps({"inputs": [_text([1], ["a"], name="image")]}).encode(), "unknown input(s) image"),
    "row mismatch": (json.dumps({"inputs": [_text([1], ["a"]), _text([2], ["c", "d"], name="text_b")]}).encode(),
                     "rows"),
    "feature shape": (json.dumps({"inputs": [{"name": n, "datatype": "INT32", "shape": [1, 3], "data": [1, 1, 1]}
                                             for n in ("input_ids", "input_mask", "segment_ids")]}).encode(),
                      f"expected [N,{S}]"),
    "empty text": (json.dumps({"inputs": [_text([1], [" "]), _text([1], ["b"], name="text_b")]}).encode(),
                   "empty text"),
    "unknown output": (json.dumps({"inputs": [_text([1], ["a"]), _text([1], ["b"], name="text_b")],
                                   "outputs": [{"name": "logits"}]}).encode(), "unknown output 'logits'"),
    "bad binary size": (json.dumps({"inputs": [{**_text([1], None), "parameters": {"binary_data_size": 99}}]}).encode(),
                        "binary_data_size"),
    "id beyond int32": (json.dumps({"inputs": [{"name": n, "datatype": "INT64", "shape": [1, S], "data": [2 ** 40] * S}
                                               for n in ("input_ids", "input_mask", "segment_ids")]}).encode(),
                        "does not fit INT32"),
    "text too long": (json.dumps({"inputs": [_text([1], ["x " * 15000]), _text([1], ["b"], name="text_b")]}).encode(),
                      "more than 20000"),
    # Triton's classification extension is refused, not answered with raw tensors instead.
    "classification": (json.dumps({"inputs": [_text([1], ["a"]), _text([1], ["b"], name="text_b")],
                                   "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}).encode(),
                       "classification (class_count 1) is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_400_with_a_message(served, case):
    body, fragment = BAD_REQUESTS[case]
    status, doc = http_post(served.url(f"/v2/models/{MODEL}/infer"), body)
    assert status == 400, doc
    assert fragment in doc["error"]


def test_bad_header_length_is_400(served):
    body = json.dumps({"inputs": [_text([1], ["a"]), _text([1], ["b"], name="text_b")]}).encode()
    n = len(body)
    # Forms Python's int() reads as n but HTTP's digits-only grammar does not: once accepted as n.
    for header in ("abc", "0", str(n + 1), "-5", f"+{n}", f"{n // 10}_{n % 10}", "1e3", "0x10"):
        status, doc = http_post(served.url(f"/v2/models/{MODEL}/infer"), body,
                                {"Inference-Header-Content-Length": header})
        assert status == 400 and "Inference-Header-Content-Length" in doc["error"], (header, doc)


def test_a_declared_content_length_over_the_limit_is_413_at_once(served):
    """A Content-Length over --max-body-bytes is refused on its headers: the gateway used to wait for
    the body (forever, for a client that never sends it) before answering 413."""
    with socket.create_connection(served.http.split(":"), timeout=10) as conn:
        conn.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {17 << 20}\r\n"
                     "\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):  # bounded: the socket's timeout
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head, reply
    assert "over the 16777216 bytes allowed" in json.loads(body)["error"]


def test_element_heavy_bodies_are_refused_before_they_are_decoded(served):
    """Each input's elements are bounded by what the model takes (a row each for text) before its data
    is decoded: 64 x 1024 empty strings used to be decoded (a Python loop per element, on the event
    loop every request shares) only to be refused for their shape; 16 MiB of them took seconds."""
    raw = struct.pack("<I", 0) * (64 * 1024)
    header = json.dumps({"inputs": [{"name": n, "datatype": "BYTES", "shape": [64, 1024],
                                     "parameters": {"binary_data_size": len(raw)}} for n in ("text_a", "text_b")]})
    status, doc = http_post(served.url(f"/v2/models/{MODEL}/infer"), header.encode() + raw * 2,
                            {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "has 65536 elements, more than the 1024 one request may carry" in doc["error"], doc


def test_grpc_bad_requests_are_invalid_argument(served):
    client = grpcclient.InferenceServerClient(served.grpc)
    a = grpcclient.InferInput("text_a", [1], "BYTES")
    a.set_data_from_numpy(np.array([b"a"], dtype=object))
    with pytest.raises(InferenceServerException) as exc:  # text_b missing
        client.infer(MODEL, [a])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT" and "text_b" in exc.value.message()
    f = grpcclient.InferInput("text_b", [1], "FP32")
    f.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer(MODEL, [a, f])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT" and "expected BYTES" in exc.value.message()
    ids = random_features(1)
    inputs = feature_inputs(grpcclient, [x[:, :64] for x in ids])
    with pytest.raises(InferenceServerException) as exc:
        client.infer(MODEL, inputs)
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT" and f"[N,{S}]" in exc.value.message()


def test_oversized_bodies_are_413_and_resource_exhausted(served):
    big = b"x" * (17 << 20)  # over the default 16 MiB bound
    status, doc = http_post(served.url(f"/v2/models/{MODEL}/infer"), big)
    assert status == 413 and "error" in doc
    client = grpcclient.InferenceServerClient(served.grpc)
    a = grpcclient.InferInput("text_a", [1], "BYTES")
    a.set_data_from_numpy(np.array([big], dtype=object))
    with pytest.raises(InferenceServerException) as exc:
        client.infer(MODEL, [a, a])
    assert exc.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert httpclient.InferenceServerClient(served.http).is_server_live()  # still serving


def test_unknown_path_and_method_are_v2_errors(served):
    status, doc = http_get(served.url("/v3/whatever"))
    assert status == 404 and "error" in doc
    status, doc = http_post(served.url("/v2/health/live"), b"{}")
    assert status == 405 and "error" in doc
    request = urllib.request.Request(served.url(f"/v2/models/{MODEL}/infer"), method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=10)
    assert exc.value.code == 405 and "POST" in exc.value.headers["Allow"]  # RFC 9110: a 405 says what is allowed
    assert "error" in json.loads(exc.value.read())


def test_an_unreadable_body_encoding_is_400(served):
    for encoding in ("gzip", "deflate"):
        status, doc = http_post(served.url(f"/v2/models/{MODEL}/infer"), b"not compressed at all",
                                {"Content-Encoding": encoding})
        assert status == 400 and "cannot read the request body" in doc["error"], doc
    test_http_text_matches_native(served, 1, False)


def test_an_empty_outputs_list_asks_for_every_output(served):
    body = json.dumps({"inputs": [_text([1], ["a"]), _text([1], ["b"], name="text_b")], "outputs": []}).encode()
    status, doc = http_post(served.url(f"/v2/models/{MODEL}/infer"), body)
    assert status == 200 and {o["name"] for o in doc["outputs"]} == {"probabilities", "label"}, doc


def test_grpc_refuses_classification_and_data_given_twice(served):
    import grpc
    from tritonclient.grpc import service_pb2 as pb  # the same v2 messages (ours would clash in this process)
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    client = grpcclient.InferenceServerClient(served.grpc)
    with pytest.raises(InferenceServerException) as exc:
        client.infer(MODEL, text_inputs(grpcclient, mrpc_pairs(1)),
                     outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT" and "classification" in exc.value.message()
    request = pb.ModelInferRequest(model_name=MODEL)
    for name, text in (("text_a", b"a"), ("text_b", b"b")):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(text)  # in contents, and again in raw_input_contents
        request.raw_input_contents.append(len(text).to_bytes(4, "little") + text)
    with grpc.insecure_channel(served.grpc) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "both" in err.value.details()


# ------------------------------- a broker without workers, or with one slow one: ready, busy, deadline

def _broker_and_gateway(tmp_path, *worker_args: str):
    """bertpool-broker (--max-queue 2), with one bertpool-worker started with ``worker_args`` (none:
    no worker), and bertpool-gateway (the CLI) on free ports; yields a Served, stops them all."""
    front, back = f"ipc://{tmp_path}/front.ipc", f"ipc://{tmp_path}/back.ipc"
    http, grpc = f"127.0.0.1:{free_tcp_port()}", f"127.0.0.1:{free_tcp_port()}"
    procs = []
    log_path = tmp_path / "gateway.log"

    def start(name: str, *argv: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        return procs[-1]

    start("broker", "bertpool.broker.broker", "--address", front, "--worker-address", back,
          "--max-queue", "2", "--stats-interval-s", "0")
    try:
        if worker_args:
            start("worker", "bertpool.workers.worker", "--worker-address", back, *worker_args)
            wait_for_workers(front, 1, timeout_s=60)
        gateway = start("gateway", "bertpool.gateway.gateway", "--broker", front, "--http", http, "--grpc", grpc,
                        "--model-version", "7")
        wait_live(http, gateway, log_path)
        yield Served(front, http, grpc)
    finally:
        for p in reversed(procs):
            stop(p)
    assert gateway.returncode == 0, log_path.read_text()


@pytest.fixture
def workerless(tmp_path):
    """A broker with no worker, behind a gateway."""
    yield from _broker_and_gateway(tmp_path)


@pytest.fixture
def slow(tmp_path):
    """A broker with one echo worker that holds one request at a time for 3 s, behind a gateway."""
    yield from _broker_and_gateway(tmp_path, "--backend", "echo", "--echo-delay-ms", "3000", "--batch-size", "1",
                                   "--capacity", "1")


def test_not_ready_without_workers(workerless):
    assert http_get(f"http://{workerless.http}/v2/health/live") == (200, {"live": True})
    status, doc = http_get(f"http://{workerless.http}/v2/health/ready")
    assert status == 400 and doc["ready"] is False
    assert doc["error"].startswith("no worker is registered with the broker at ipc://"), doc  # why, not just no
    status, doc = http_get(f"http://{workerless.http}/v2/models/{MODEL}/ready")
    assert status == 400 and doc["error"].startswith("no worker is registered with the broker"), doc
    assert http_get(f"http://{workerless.http}/v2/models/{MODEL}")[1]["versions"] == ["7"]
    client = grpcclient.InferenceServerClient(workerless.grpc)
    assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready(MODEL)
    assert not httpclient.InferenceServerClient(workerless.http).is_server_ready()


def test_inference_while_not_ready_is_503_and_unavailable_at_once(workerless):
    """With no worker a request would only wait out its deadline in the broker's queue: it fails at
    once, as Triton's does for a model that is not ready, saying why (not 504 after the whole wait)."""
    pairs = mrpc_pairs(1)
    with pytest.raises(InferenceServerException) as exc:
        httpclient.InferenceServerClient(workerless.http).infer(MODEL, text_inputs(httpclient, pairs),
                                                                timeout=20_000_000)  # microseconds
    assert exc.value.status() == "503" and "no worker is registered" in exc.value.message(), exc.value
    with pytest.raises(InferenceServerException) as exc:
        grpcclient.InferenceServerClient(workerless.grpc).infer(MODEL, text_inputs(grpcclient, pairs),
                                                                client_timeout=20)
    assert exc.value.status() == "StatusCode.UNAVAILABLE" and "no worker" in exc.value.message()


class _ProbeClient:
    """A Client stand-in for the readiness probe: its STATS does what ``stats`` (a function) does."""

    def __init__(self, stats) -> None:
        self.config = type("Config", (), {"address": "ipc:///nowhere"})()
        self.calls = 0
        self._stats = stats

    def stats(self, timeout_s: float):
        self.calls += 1
        self.timeout_s = timeout_s
        return self._stats()


def _gateway_with(client, **settings):
    from bertpool.gateway.gateway import Gateway, GatewayConfig
    from bertpool.gateway.kserve import ModelInfo

    return Gateway(GatewayConfig(ready_cache_s=0.0, **settings), ModelInfo(MODEL, "1", S), client)


def test_the_readiness_probe_waits_for_stats_as_long_as_configured():
    import asyncio

    client = _ProbeClient(lambda: {"workers": {"w": {}}})
    assert asyncio.run(_gateway_with(client, ready_probe_timeout_s=0.25).ready()) is True
    assert client.timeout_s == 0.25


@pytest.mark.parametrize("settings", [{"ready_probe_timeout_s": 0}, {"ready_probe_timeout_s": float("nan")},
                                      {"ready_probe_timeout_s": float("inf")}, {"ready_cache_s": -1},
                                      {"ready_cache_s": float("nan")}, {"ready_cache_s": 3600}])
def test_readiness_settings_out_of_range_are_config_errors(settings):
    from bertpool.common.errors import ConfigError
    from bertpool.gateway.gateway import GatewayConfig

    with pytest.raises(ConfigError, match=next(iter(settings))):
        GatewayConfig(**settings)


def test_a_readiness_probe_that_fails_unexpectedly_is_not_ready_and_runs_again():
    """A probe that raised anything but a pool error stayed stuck: every later readiness check re-raised."""
    import asyncio

    def broken():
        raise RuntimeError("a bug in the probe")

    client = _ProbeClient(broken)
    gateway = _gateway_with(client)

    async def twice():
        return [await gateway.ready(), await gateway.ready()]

    assert asyncio.run(twice()) == [False, False] and client.calls == 2


def test_not_ready_says_why_the_broker_did_not_answer():
    """A broker refusing the gateway's CURVE key left /v2/health/ready saying "no worker is ready" (the
    reason was only in the gateway's log): the probe's reason is the answer's."""
    import asyncio

    from bertpool.common.errors import BrokerUnavailable

    def refused():
        raise BrokerUnavailable("the broker at tcp://b:5555 refused our CURVE public key K (ZAP status 400)")

    gateway = _gateway_with(_ProbeClient(refused))
    assert asyncio.run(gateway.ready()) is False
    assert gateway.not_ready_why.startswith("the broker did not answer: the broker at tcp://b:5555 refused our "
                                            "CURVE public key"), gateway.not_ready_why


def test_a_request_waits_for_the_readiness_probe_no_longer_than_its_deadline():
    """A stale "not ready" is asked again before a request is refused; that wait is bounded by the
    request's own deadline (504), not the probe's 2 s."""
    import asyncio

    from bertpool.gateway.kserve import KServeError

    release = threading.Event()
    gateway = _gateway_with(_ProbeClient(lambda: release.wait(30) and {"workers": {}}))

    async def refused():
        started = time.monotonic()
        try:
            await gateway._refuse_unless_ready(0.1)
        except KServeError as exc:
            return exc.status, time.monotonic() - started
        finally:
            release.set()  # let the probe's thread end
        return None, time.monotonic() - started

    status, waited = asyncio.run(refused())
    assert status == 504 and waited < 5


def test_deadline_is_504_and_deadline_exceeded(slow):
    pairs = mrpc_pairs(1)
    with pytest.raises(InferenceServerException) as exc:
        httpclient.InferenceServerClient(slow.http).infer(MODEL, text_inputs(httpclient, pairs),
                                                          timeout=200_000)  # microseconds
    assert exc.value.status() == "504" and "deadline" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        grpcclient.InferenceServerClient(slow.grpc).infer(MODEL, text_inputs(grpcclient, pairs),
                                                          timeout=200_000)
    assert exc.value.status() == "StatusCode.DEADLINE_EXCEEDED"


def test_busy_is_503_and_unavailable(slow):
    pairs = mrpc_pairs(6)  # 6 rows: 1 held by the worker, 2 queued (--max-queue 2), the rest BUSY
    with pytest.raises(InferenceServerException) as exc:
        httpclient.InferenceServerClient(slow.http).infer(MODEL, text_inputs(httpclient, pairs),
                                                          timeout=5_000_000)
    assert exc.value.status() == "503" and "busy" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        grpcclient.InferenceServerClient(slow.grpc).infer(MODEL, text_inputs(grpcclient, pairs),
                                                          timeout=5_000_000)
    assert exc.value.status() == "StatusCode.UNAVAILABLE"


def test_a_request_whose_rows_fail_together_logs_no_unretrieved_futures(slow, tmp_path):
    """Rows failing together (past their common deadline here) used to leave each failure past the
    first unread: asyncio then logged "Future exception was never retrieved" with a traceback for
    each (up to a thousand for a 1024-row request). The gateway's log is written before it answers."""
    with pytest.raises(InferenceServerException) as exc:  # 3 rows: one at the worker, two queued, none BUSY
        httpclient.InferenceServerClient(slow.http).infer(MODEL, text_inputs(httpclient, mrpc_pairs(3)),
                                                          timeout=300_000)
    assert exc.value.status() == "504", exc.value.message()
    log = (tmp_path / "gateway.log").read_text(errors="replace")
    assert "never retrieved" not in log and "Traceback" not in log, log


def serve_with_gateway(tmp_path, http: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    """bertpool-serve (1 echo worker; clients at ipc://TMP/f) with a gateway child on ``http``, and
    ``extra`` flags, logging to a file."""
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bertpool.pool.serve", "--address", f"ipc://{tmp_path}/f",
                                 "--worker-address", f"ipc://{tmp_path}/b", "--parallel", "1",
                                 "--stats-interval-s", "0", "--gateway-http", http, *extra],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log_path


def gateway_pid(serve: subprocess.Popen) -> int:
    """The pid of ``serve``'s gateway child."""
    children = Path(f"/proc/{serve.pid}/task/{serve.pid}/children").read_text().split()
    gateways = [int(pid) for pid in children
                if "bertpool.gateway.gateway" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert len(gateways) == 1, gateways
    return gateways[0]


def call_in_flight(tmp_path, log_path, call) -> tuple[threading.Thread, list]:
    """Run ``call()`` (a gateway call) on a thread, and return once the pool at ipc://TMP/f holds its
    request: the thread and the list its result (or exception) is appended to."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the test reports it
            outcome.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    deadline = time.monotonic() + 30
    with Client(f"ipc://{tmp_path}/f", timeout_s=10) as client:
        while not any(w["inflight"] for w in client.stats()["workers"].values()):
            assert time.monotonic() < deadline and caller.is_alive(), (outcome, log_path.read_text())
            time.sleep(0.02)
    return caller, outcome


def test_serve_refuses_to_start_when_its_gateway_cannot(tmp_path):
    with socket.socket() as taken:  # the gateway's port is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc, log_path = serve_with_gateway(tmp_path, f"127.0.0.1:{taken.getsockname()[1]}")
        try:
            assert proc.wait(120) == 2
        finally:
            stop(proc)
    log = log_path.read_text(errors="replace")
    assert "bertpool-serve: error: the gateway (bertpool-gateway) exited with code 2 before listening" in log, log
    assert "Traceback" not in log


def test_serve_stops_loudly_when_its_gateway_dies(tmp_path):
    http = f"127.0.0.1:{free_tcp_port()}"
    proc, log_path = serve_with_gateway(tmp_path, http)
    try:
        wait_live(http, proc, log_path)
        os.kill(gateway_pid(proc), signal.SIGKILL)
        assert proc.wait(60) == 1  # the pool does not serve on without the gateway it was asked for
    finally:
        stop(proc)
    log = log_path.read_text(errors="replace")
    assert "the gateway (bertpool-gateway) exited with code -9; stopping" in log, log


def test_sigterm_lets_grpc_calls_in_flight_finish(tmp_path):
    """A gRPC call in flight when the gateway is told to stop is answered, as an HTTP one is (within
    its deadline), not cancelled."""
    http, grpc_port = f"127.0.0.1:{free_tcp_port()}", free_tcp_port()
    proc, log_path = serve_with_gateway(tmp_path, http, "--echo-delay-ms", "1500", "--gateway-grpc", str(grpc_port))
    try:
        wait_ready(http, proc, log_path)  # before that a call is refused at once
        call, outcome = call_in_flight(tmp_path, log_path, lambda: _grpc_infer(f"127.0.0.1:{grpc_port}"))
        os.kill(gateway_pid(proc), signal.SIGTERM)
        call.join(30)
        assert outcome and isinstance(outcome[0], np.ndarray) and outcome[0].shape == (1, 2), outcome
    finally:
        stop(proc)


def test_serve_stops_its_gateway_listening_first_on_sigterm(tmp_path):
    """SIGTERM to bertpool-serve: its gateway stops listening at once (a client or a load balancer
    finds it closed and goes elsewhere) while the call in flight is still answered. It used to listen
    on, answering 503 from the draining pool, until the workers had finished."""
    http = f"127.0.0.1:{free_tcp_port()}"
    proc, log_path = serve_with_gateway(tmp_path, http, "--echo-delay-ms", "3000")
    try:
        wait_ready(http, proc, log_path)
        call, outcome = call_in_flight(tmp_path, log_path, lambda: httpclient.InferenceServerClient(
            http, network_timeout=30).infer(MODEL, text_inputs(httpclient, mrpc_pairs(1))).as_numpy("probabilities"))
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _accepts(http):
            assert time.monotonic() < deadline and call.is_alive(), "the gateway listened until the call was answered"
            time.sleep(0.02)
        call.join(30)
        assert outcome and isinstance(outcome[0], np.ndarray) and outcome[0].shape == (1, 2), outcome
        assert proc.wait(60) == 0
    finally:
        stop(proc)


def test_sigterm_stops_both_listeners_at_once(tmp_path):
    """On SIGTERM HTTP and gRPC stop listening together and then drain together: HTTP used to go on
    accepting (and serving) new requests for as long as gRPC's calls in flight took to finish."""
    http, grpc_port = f"127.0.0.1:{free_tcp_port()}", free_tcp_port()
    proc, log_path = serve_with_gateway(tmp_path, http, "--echo-delay-ms", "3000", "--gateway-grpc", str(grpc_port))
    try:
        wait_ready(http, proc, log_path)
        call, outcome = call_in_flight(tmp_path, log_path, lambda: _grpc_infer(f"127.0.0.1:{grpc_port}"))
        os.kill(gateway_pid(proc), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _accepts(f"127.0.0.1:{grpc_port}"):  # gRPC stopped listening (the call is still in flight)
            assert time.monotonic() < deadline and call.is_alive(), "gRPC still listening"
            time.sleep(0.02)
        assert not _accepts(http), "HTTP still accepts connections while gRPC's calls drain"
        call.join(30)
        assert outcome and isinstance(outcome[0], np.ndarray) and outcome[0].shape == (1, 2), outcome
    finally:
        stop(proc)


def _accepts(address: str) -> bool:
    """Whether something accepts TCP connections at host:port. A connect reset by the peer counts as
    no: the listening socket closed while our connection waited in its backlog (a listener closing
    just as we knock; seen once in CI), so nothing accepted it."""
    try:
        socket.create_connection(address.split(":"), timeout=5).close()
        return True
    except (ConnectionRefusedError, ConnectionResetError):
        return False


def _grpc_infer(address: str):
    """One text pair over gRPC: its probabilities, or the exception it raised."""
    try:
        reply = grpcclient.InferenceServerClient(address).infer(MODEL, text_inputs(grpcclient, mrpc_pairs(1)),
                                                                client_timeout=30)
        return reply.as_numpy("probabilities")
    except Exception as exc:  # the test reports it
        return exc


def test_gateway_cli_refuses_bad_flags(tmp_path):
    for args, fragment in ((["--http", "off", "--grpc", "off"], "nothing to serve"),
                           (["--http", "nohost:"], "HOST:PORT"),
                           (["--broker", "http://x"], "--broker"),
                           (["--model", str(tmp_path / "absent")], "not a directory"),
                           (["--model", str(tmp_path)], "neither a compiled bertpool model"),  # an empty directory
                           (["--max-body-bytes", "3000000000"], "--max-body-bytes must be in"),
                           (["--broker", "tcp://127.0.0.1:*"], "PORT in 1..65535"),
                           # refused up front; grpc failed to bind only once HTTP listened, in a C-level log line
                           (["--http", "18790", "--grpc", "127.0.0.1:18790"],
                            "--http 18790 and --grpc 127.0.0.1:18790 would listen on the same port"),
                           (["--model-version", "a/b"], "--model-version must be one URL path segment"),
                           (["--model-version", ""], "--model-version must be one URL path segment")):
        out = subprocess.run([sys.executable, "-m", "bertpool.gateway.gateway", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and fragment in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("bertpool-gateway: error: "), out.stderr
        assert "Traceback" not in out.stderr and "add_port" not in out.stderr, out.stderr


def test_an_address_the_gateway_cannot_listen_on_is_named_by_its_flag():
    """The OS's error names neither flag nor address ("[Errno -2] Name or service not known"), and
    grpc's says only "Failed to bind to address" (why, in a C-level log line): the error says both."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = f"127.0.0.1:{taken.getsockname()[1]}"
        for flag, other, value, why in (("--http", "--grpc", "nosuchhost.invalid:18790", ""),
                                        ("--grpc", "--http", "nosuchhost.invalid:18790", "cannot resolve"),
                                        ("--http", "--grpc", in_use, "address already in use"),
                                        ("--grpc", "--http", in_use, "address already in use")):
            out = subprocess.run([sys.executable, "-m", "bertpool.gateway.gateway", flag, value, other, "off"],
                                 capture_output=True, text=True, timeout=60)
            last = out.stderr.strip().splitlines()[-1]
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
            assert last.startswith(f"bertpool-gateway: error: {flag} {value}: cannot listen there: "), out.stderr
            assert why in last.lower(), out.stderr


def test_serve_refuses_listeners_on_one_port_before_starting_anything(tmp_path):
    """As it refuses one --address and --worker-address: the metrics endpoint, the gateway's HTTP and
    gRPC, and the broker's tcp endpoints each need a port of their own. The second one used to fail
    only after the broker (and perhaps the gateway) had started."""
    port = free_tcp_port()
    for args, message in ((["--metrics-address", str(port), "--gateway-http", str(port)],
                           f"--metrics-address {port} and --gateway-http {port}"),
                          (["--gateway-http", f"127.0.0.1:{port}", "--gateway-grpc", f"0.0.0.0:{port}"],
                           f"--gateway-http 127.0.0.1:{port} and --gateway-grpc 0.0.0.0:{port}"),
                          (["--metrics-address", f"0.0.0.0:{port}", "--gateway-grpc", str(port)],
                           f"--metrics-address 0.0.0.0:{port} and --gateway-grpc {port}"),
                          (["--address", f"tcp://*:{port}", "--gateway-http", str(port)],
                           f"--address tcp://*:{port} and --gateway-http {port}"),
                          (["--worker-address", f"tcp://127.0.0.1:{port}", "--metrics-address", str(port)],
                           f"--worker-address tcp://127.0.0.1:{port} and --metrics-address {port}")):
        out = subprocess.run([sys.executable, "-m", "bertpool.pool.serve", "--address", f"ipc://{tmp_path}/f",
                              "--worker-address", f"ipc://{tmp_path}/b", "--parallel", "1",
                              "--stats-interval-s", "0", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines()[-1] == (f"bertpool-serve: error: {message} would listen on the "
                                                       f"same port ({port}); give each a port of its own"), out.stderr
        assert not out.stdout, out.stdout  # no banner: nothing started, the gateway child included


# ------------------------------------------------------------------------ fuzzing

def test_fuzzed_http_bodies_never_crash_the_gateway(served):
    """Random and near-valid JSON bodies get 200 or a 4xx v2 error, never a 500; then it still serves."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_gateway_kserve import json_values, near_valid

    url = served.url(f"/v2/models/{MODEL}/infer")

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(doc=near_valid | json_values, tail=st.binary(max_size=16), header=st.booleans())
    def fuzz(doc, tail, header):
        text = json.dumps(doc).encode()
        status, reply = http_post(url, text + tail, {"Inference-Header-Content-Length": str(len(text))}
                                  if header else {})
        assert status == 200 or status in (400, 404, 413) and reply["error"], (status, reply)

    fuzz()
    test_http_text_matches_native(served, 2, True)


@pytest.mark.parametrize("module, flags", [
    ("bertpool.gateway.gateway", ["--broker", "--http", "--grpc", "--model", "--model-name", "--model-version",
                                  "--timeout-s", "--max-body-bytes", "--max-rows", "--curve-server-key",
                                  "--curve-secret-key"]),
    ("bertpool.bench.gateway", ["--clients", "--cycle", "--model", "--modes", "--json"]),
    ("bertpool.pool.serve", ["--gateway-http", "--gateway-grpc", "--curve-gateway-secret-key"]),
])
def test_help_lists_the_gateway_flags(module, flags):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(flag in out.stdout for flag in flags), out.stdout


def test_a_stopping_gateway_child_gets_its_calls_deadline_before_sigkill():
    """bertpool-serve killed its gateway child 10 s after SIGTERM, while the gateway lets a call in
    flight run to its deadline (--timeout-s, 30 s by default): a call given 30 s was cut off. The
    child (started without --timeout-s) now gets that deadline and a few seconds more."""
    import argparse
    import inspect

    from bertpool.common.defaults import DEFAULT_GATEWAY_TIMEOUT_S
    from bertpool.gateway.gateway import GatewayConfig, add_gateway_arguments
    from bertpool.gateway.launch import GatewayChild, gateway_command

    assert "--timeout-s" not in gateway_command("tcp://127.0.0.1:5555", "8000", None, None)
    parser = argparse.ArgumentParser()
    add_gateway_arguments(parser)
    assert GatewayConfig().timeout_s == parser.parse_args([]).timeout_s == DEFAULT_GATEWAY_TIMEOUT_S
    grace = inspect.signature(GatewayChild.stop).parameters["timeout_s"].default
    assert grace > DEFAULT_GATEWAY_TIMEOUT_S
