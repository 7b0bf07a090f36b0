"""gateway.kserve: decoding and checking v2 requests, encoding responses (no processes)."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bertpool.common import errors as E
from bertpool.common import protocol as P
from bertpool.gateway import kserve
from bertpool.gateway.gateway import GatewayConfig, from_pool_error
from bertpool.gateway.kserve import KServeError, Limits, ModelInfo

MODEL = ModelInfo(name="m", version="v1", seq_length=8)
LIMITS = Limits(max_rows=4)


def bytes_blob(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def binary_request(inputs: list[tuple[str, str, list[int], bytes]], **extra) -> tuple[bytes, str]:
    doc = {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                      for n, d, s, b in inputs], **extra}
    header = json.dumps(doc).encode()
    return header + b"".join(b for *_, b in inputs), str(len(header))


def test_binary_text_and_features_decode():
    body, hl = binary_request([("text_a", "BYTES", [2], bytes_blob([b"a", "é".encode()])),
                               ("text_b", "BYTES", [2, 1], bytes_blob([b"", b"c"]))])
    rows = kserve.rows_of(kserve.decode_http(body, hl, LIMITS), MODEL, LIMITS)
    assert rows.kind == "text" and rows.items == [("a", ""), ("é", "c")]
    feats = [np.arange(16, dtype="<i8").reshape(2, 8) + i for i in range(3)]
    body, hl = binary_request([(n, "INT64", [2, 8], f.tobytes())
                               for n, f in zip(kserve.FEATURE_INPUTS, feats)])
    rows = kserve.rows_of(kserve.decode_http(body, hl, LIMITS), MODEL, LIMITS)
    assert rows.kind == "features" and len(rows) == 2
    np.testing.assert_array_equal(rows.items[1][2], feats[2][1])
    assert rows.items[0][0].dtype == np.int32


@pytest.mark.parametrize("raw, fragment", [
    (bytes_blob([b"a"]), "BYTES elements"),                    # 1 element for shape [2]
    (bytes_blob([b"a", b"b", b"c"]), "length-prefixed"),       # 3 for 2
    (struct.pack("<I", 50) + b"ab", "runs past"),              # length beyond the data
    (b"\x01\x00", "length-prefixed"),                          # a truncated length
])
def test_bad_binary_bytes(raw, fragment):
    body, hl = binary_request([("text_a", "BYTES", [2], raw)])
    with pytest.raises(KServeError, match=fragment) as exc:
        kserve.decode_http(body, hl, LIMITS)
    assert exc.value.status == 400 and exc.value.grpc_code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("name, datatype, shape, fragment", [
    ("text_a", "BYTES", [4, 1024], "more than the 4 one request may carry (4 rows of 1)"),
    ("input_ids", "INT32", [4, 9], "more than the 32 one request may carry (4 rows of 8)"),
    ("image", "BYTES", [1], "unknown input(s) image"),
    ("text_b", "INT32", [1], "expected BYTES"),
    ("segment_ids", "BYTES", [1, 8], "expected INT32 (or INT64)"),
])
def test_inputs_are_checked_against_the_signature_before_their_data_is_decoded(name, datatype, shape, fragment):
    """Decoding BYTES is a Python loop per element, on the event loop every request shares: the
    elements one input may carry are bounded by what the model takes (max_rows for text, max_rows x S
    for features), and an input the model lacks or a datatype it does not take is refused before any
    of it is decoded (they used to be decoded, up to max_rows x 1024 elements each, then refused)."""
    limits = Limits(max_rows=4, seq_length=8)
    count = int(np.prod(shape))
    raw = bytes_blob([b""] * count) if datatype == "BYTES" else b"\0" * (4 * count)
    body, hl = binary_request([(name, datatype, shape, raw)])
    with pytest.raises(KServeError, match=re.escape(fragment)) as exc:
        kserve.decode_http(body, hl, limits)
    assert exc.value.status == 400


def test_trailing_binary_and_numeric_size_mismatch():
    body, hl = binary_request([("text_a", "BYTES", [1], bytes_blob([b"a"]))])
    with pytest.raises(KServeError, match="no input's binary_data_size"):
        kserve.decode_http(body + b"zz", hl, LIMITS)
    body, hl = binary_request([("input_ids", "INT32", [1, 8], b"\0" * 31)])
    with pytest.raises(KServeError, match="takes 32"):
        kserve.decode_http(body, hl, LIMITS)


def test_limits_and_int32_range():
    rows = {"inputs": [{"name": n, "datatype": "BYTES", "shape": [5], "data": ["x"] * 5} for n in kserve.TEXT_INPUTS]}
    with pytest.raises(KServeError, match="more than the 4"):
        kserve.rows_of(kserve.decode_http(json.dumps(rows).encode(), None, LIMITS), MODEL, LIMITS)
    big = {"inputs": [{"name": n, "datatype": "INT64", "shape": [1, 8], "data": [1 << 40] * 8}
                      for n in kserve.FEATURE_INPUTS]}
    with pytest.raises(KServeError, match="does not fit INT32"):
        kserve.rows_of(kserve.decode_http(json.dumps(big).encode(), None, LIMITS), MODEL, LIMITS)
    with pytest.raises(KServeError, match="does not fit INT32"):
        bad = {"inputs": [{**i, "datatype": "INT32"} for i in big["inputs"]]}
        kserve.decode_http(json.dumps(bad).encode(), None, LIMITS)


def test_timeout_parameter_and_outputs():
    doc = {"inputs": [{"name": "text_a", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
           "parameters": {"timeout": 250_000, "binary_data_output": True},
           "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}]}
    request = kserve.decode_http(json.dumps(doc).encode(), None, LIMITS)
    assert request.timeout_s == 0.25
    assert kserve.requested_outputs(request) == [("label", False), ("probabilities", True)]
    for timeout in (-1, "1", True, 1e300):
        doc["parameters"]["timeout"] = timeout
        with pytest.raises(KServeError, match="timeout"):
            kserve.decode_http(json.dumps(doc).encode(), None, LIMITS)
    doc["parameters"]["timeout"] = 0  # Triton's "no timeout": the gateway's own --timeout-s applies
    assert kserve.decode_http(json.dumps(doc).encode(), None, LIMITS).timeout_s is None


def test_a_request_id_of_any_length_is_echoed():
    """Triton bounds no id (the body limit does); the reply names the request as it was named."""
    long_id = "request-" + "x" * 5000
    doc = {"id": long_id, "inputs": [{"name": "text_a", "datatype": "BYTES", "shape": [1], "data": ["a"]},
                                     {"name": "text_b", "datatype": "BYTES", "shape": [1], "data": ["b"]}]}
    request = kserve.decode_http(json.dumps(doc).encode(), None, LIMITS)
    body, hl = kserve.encode_http(MODEL, request, np.array([[0.5, 0.5]], np.float32), [("label", False)])
    assert json.loads(body[:hl] if hl else body)["id"] == long_id
    with pytest.raises(KServeError, match="'id' must be a string"):
        kserve.decode_http(json.dumps({**doc, "id": 7}).encode(), None, LIMITS)


def test_encode_http_binary_and_json():
    probs = np.array([[0.25, 0.75], [0.9, 0.1]], np.float32)
    request = kserve.InferRequest(id="7")
    body, hl = kserve.encode_http(MODEL, request, probs, [("probabilities", True), ("label", False)])
    header = json.loads(body[:hl])
    assert header["id"] == "7" and header["outputs"][0]["parameters"]["binary_data_size"] == 16
    np.testing.assert_array_equal(np.frombuffer(body[hl:], "<f4").reshape(2, 2), probs)
    assert header["outputs"][1]["data"] == [1, 0]
    body, hl = kserve.encode_http(MODEL, request, probs, [("label", False)])
    assert hl is None and json.loads(body)["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [2],
                                                             "data": [1, 0]}]


def test_model_check():
    MODEL.check("m", None)
    MODEL.check("m", "v1")
    for name, version in (("x", None), ("m", "v2")):
        with pytest.raises(KServeError) as exc:
            MODEL.check(name, version)
        assert exc.value.status == 404 and exc.value.grpc_code == "NOT_FOUND"


def test_a_savedmodel_directory_leaves_s_to_the_workers(tmp_path):
    """A SavedModel's S is in its signature, which needs TensorFlow to read: the gateway reports it as -1
    and passes feature rows of any length on, for the workers to check, instead of a wrong 128."""
    from bertpool.gateway.gateway import model_info

    (tmp_path / "saved_model.pb").write_bytes(b"not read here")
    model = model_info(GatewayConfig(model_dir=str(tmp_path)))
    assert model.seq_length is None
    assert {i["name"]: i["shape"] for i in model.metadata()["inputs"]}["input_ids"] == [-1, -1]
    feats = [np.ones((2, 64), "<i4")] * 3
    body, hl = binary_request([(n, "INT32", [2, 64], f.tobytes()) for n, f in zip(kserve.FEATURE_INPUTS, feats)])
    assert len(kserve.rows_of(kserve.decode_http(body, hl, LIMITS), model, LIMITS)) == 2
    body, hl = binary_request([(n, "INT32", [2, 0], b"") for n in kserve.FEATURE_INPUTS])
    with pytest.raises(KServeError, match=r"expected \[N,S\]"):
        kserve.rows_of(kserve.decode_http(body, hl, LIMITS), model, LIMITS)


@pytest.mark.parametrize("error, status", [
    (E.ServerBusy("full"), 503), (E.RequestTimeout("late"), 504), (E.ClientClosed("closed"), 503),
    (E.RemoteError(P.E_BAD_TEXT, "empty"), 400), (E.RemoteError(P.E_BAD_FIELD, "x"), 400),
    (E.RemoteError(P.E_DEADLINE, "late"), 504), (E.RemoteError(P.E_SHUTDOWN, "bye"), 503),
    (E.RemoteError(P.E_WORKER_LOST, "gone"), 503), (E.RemoteError(P.E_INFERENCE, "boom"), 500),
    (E.MalformedReply(P.E_BAD_FIELD, "x"), 500), (RuntimeError("bug"), 500),
    (E.InputError(P.E_BAD_TEXT, "too long"), 400),  # refused by the client before it was sent
])
def test_pool_errors_map_to_v2_statuses(error, status):
    assert from_pool_error(error).status == status


@pytest.mark.parametrize("flag", ["http", "grpc"])
def test_bad_listen_address_is_a_config_error_naming_its_flag(flag):  # every form: tests/test_cli.py
    with pytest.raises(E.ConfigError, match=f"--{flag} 'h:99999'"):
        GatewayConfig(**{flag: "h:99999"})



@pytest.mark.parametrize("field, value", [
    ("model_version", "a/b"), ("model_version", ""), ("model_version", "."), ("model_version", ".."),
    ("model_version", "1 2"), ("model_version", "v?1"), ("model_version", "v#1"), ("model_version", "50%"),
    ("model_version", "é"), ("model_name", ".."), ("model_name", "."), ("model_name", ""), ("model_name", "a/b"),
])
def test_model_name_and_version_must_be_one_url_path_segment(field, value):
    """Both are path segments of v2 URLs (/v2/models/NAME/versions/VERSION); a version is also sent by
    tritonclient as it is, not %-encoded. An empty version is refused, not reported: a request's empty
    version means "whichever is served"."""
    with pytest.raises(E.ConfigError, match="--" + field.replace("_", "-")):
        GatewayConfig(**{field: value})


def test_usable_model_versions_are_reported_as_given():
    from bertpool.gateway.gateway import model_info

    for version in ("1", "unversioned", "2024-01-01T00:00:00", "v1.0+cpu_~!$&'()*,;=@"):
        assert model_info(GatewayConfig(model_version=version)).version == version


@pytest.mark.parametrize("http, grpc", [
    ("18790", "18790"), ("18790", "127.0.0.1:18790"), ("0.0.0.0:18790", "127.0.0.1:18790"),
    ("10.1.2.3:18790", "0.0.0.0:18790"), ("[::1]:18790", "[::]:18790"), ("[::1]:18790", "[0::1]:18790"),
    ("LocalHost:18790", "localhost:18790"),
    ("localhost:18790", "127.0.0.1:18790"),  # names are resolved (IPv4): localhost binds 127.0.0.1
])
def test_http_and_grpc_on_one_port_are_refused(http, grpc):
    message = f"--http {http} and --grpc {grpc} would listen on the same port"
    with pytest.raises(E.ConfigError, match=re.escape(message)):
        GatewayConfig(http=http, grpc=grpc)


@pytest.mark.parametrize("http, grpc", [
    ("18790", "18791"), ("127.0.0.1:18790", "127.0.0.2:18790"), ("[::]:18790", "127.0.0.1:18790"),
    ("localhost:18790", "127.0.0.2:18790"),  # localhost resolves to 127.0.0.1 only
])
def test_http_and_grpc_on_ports_that_can_coexist_are_accepted(http, grpc):
    GatewayConfig(http=http, grpc=grpc)


@pytest.mark.parametrize("off", ["off", ""])
def test_a_listener_the_config_was_told_is_off_is_off_when_served(tmp_path, off):
    """--http and --grpc were parsed twice: by GatewayConfig (its port check, which skips 'off') and again
    by serve(), which read a config's grpc='off' as an address and failed only then ("the port must be a
    number"), after the config was accepted. The config parses them once, 'off' included, and serve()
    listens where it says."""
    import asyncio

    pytest.importorskip("aiohttp")
    from bertpool.gateway.gateway import serve
    from conftest import free_tcp_port

    port = free_tcp_port()
    # gRPC is the one off: its generated modules clash in one process with tritonclient.grpc's, which
    # other test files import (the whole suite runs in one process).
    config = GatewayConfig(broker=f"ipc://{tmp_path}/front.ipc", http=str(port), grpc=off)
    bound = {}

    async def serve_until_listening() -> None:
        stop = asyncio.Event()

        def listening(addresses, model) -> None:
            bound.update(addresses)
            stop.set()

        await asyncio.wait_for(serve(config, stop, listening), timeout=60)

    asyncio.run(serve_until_listening())
    assert list(bound) == ["http"] and bound["http"].endswith(f":{port}"), bound
    assert (config.http_address, config.grpc_address) == (("127.0.0.1", port), None)
    with pytest.raises(E.ConfigError, match="nothing to serve"):
        GatewayConfig(http=off, grpc="off")


def test_listeners_compare_zeromq_endpoints_and_skip_what_is_off():
    from bertpool.common.cli import check_distinct_listeners

    with pytest.raises(E.ConfigError, match=re.escape("--address tcp://*:5555 and --metrics-address 5555")):
        check_distinct_listeners({"--metrics-address": "5555"}, endpoints={"--address": "tcp://*:5555"})
    with pytest.raises(E.ConfigError,
                       match=re.escape("--worker-address tcp://[::1]:5556 and --gateway-grpc [::1]:5556")):
        check_distinct_listeners({"--gateway-grpc": "[::1]:5556"}, endpoints={"--worker-address": "tcp://[::1]:5556"})
    check_distinct_listeners({"--metrics-address": "", "--gateway-http": "5555", "--gateway-grpc": "off", "--x": None},
                             endpoints={"--address": "ipc:///tmp/5555", "--worker-address": "tcp://127.0.0.1:5556"})
    for value in ("x:", "tcp://127.0.0.1:5557"):  # each is parsed, naming its flag: an endpoint is no HOST:PORT
        with pytest.raises(E.ConfigError, match=re.escape(f"--gateway-http {value!r}")):
            check_distinct_listeners({"--gateway-http": value})

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=30)
NAMES = st.sampled_from([*kserve.TEXT_INPUTS, *kserve.FEATURE_INPUTS, "x", ""])
DATATYPES = st.sampled_from(["BYTES", "INT32", "INT64", "FP32", "BOOL", "UINT8", "bogus"])
near_valid_input = st.fixed_dictionaries(
    {"name": NAMES, "datatype": DATATYPES,
     "shape": st.lists(st.integers(-2, 9), max_size=3) | json_values},
    optional={"data": json_values | st.lists(st.integers(-2**40, 2**40) | st.text(max_size=4), max_size=20),
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-5, 50)}) | json_values})
near_valid = st.fixed_dictionaries(
    {"inputs": st.lists(near_valid_input, max_size=4)},
    optional={"outputs": st.lists(st.fixed_dictionaries({"name": NAMES | st.just("label")}), max_size=3) | json_values,
              "parameters": st.fixed_dictionaries({}, optional={"timeout": json_values,
                                                                 "binary_data_output": json_values}),
              "id": json_values})


def decode_all(body: bytes, header_length) -> None:
    try:
        request = kserve.decode_http(body, header_length, LIMITS)
        kserve.rows_of(request, MODEL, LIMITS)
        kserve.requested_outputs(request)
    except KServeError as exc:
        assert exc.status == 400 and exc.message


@settings(max_examples=300, deadline=None)
@given(doc=near_valid | json_values, tail=st.binary(max_size=16), header=st.booleans())
def test_fuzzed_bodies_raise_only_kserve_errors(doc, tail, header):
    text = json.dumps(doc).encode()
    decode_all(text + tail, str(len(text)) if header else None)
