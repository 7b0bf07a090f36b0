"""Protocol round trips and validation: every bad body is a typed ProtocolError."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bertpool.common import protocol as P
from bertpool.common.errors import ConfigError, InputError, ProtocolError


@pytest.mark.parametrize("dtype", ["<i4", "<i8", "<f4", "<f2", "<f8", "u1", ">i4"])
@pytest.mark.parametrize("shape", [(0,), (3,), (2, 5), (1, 1, 4)])
def test_array_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    enc = P.encode_array(a)
    assert isinstance(enc["data"], bytes)  # raw bytes on the wire, never a list
    back = P.decode_array(P.unpack(P.pack({"a": enc}))["a"])
    assert back.shape == a.shape and np.array_equal(back, a)


def test_text_request_round_trip():
    body = P.unpack(P.text_request("r1", "A café.", "B"))
    assert P.check_id(body) == "r1"
    assert P.parse_request(body, 128) == ("text", ("A café.", "B"))


def test_features_request_round_trip():
    ids = np.arange(128, dtype=np.int32)
    body = P.unpack(P.features_request(7, ids, np.ones(128), np.zeros(128)))
    kind, (i, m, s) = P.parse_request(body, 128)
    assert kind == "features" and P.check_id(body) == 7
    assert np.array_equal(i, ids) and i.dtype == np.int32 and m.sum() == 128 and s.sum() == 0


def test_reply_and_error_round_trip():
    body = P.unpack(P.reply_body("x", np.array([0.25, 0.75], np.float32), {"compute_ms": 1.5}))
    assert body["id"] == "x" and body["label"] == 1
    assert np.allclose(P.decode_array(body["probabilities"]), [0.25, 0.75])
    assert body["timings"] == {"compute_ms": 1.5}
    err = P.unpack(P.error_body(None, P.E_BAD_TEXT, "empty"))
    assert err == {"id": None, "code": "bad_text", "message": "empty"}


def test_queue_time_frame():
    assert P.decode_queue_time(P.encode_queue_time(0.0125)) == pytest.approx(12.5)
    assert P.decode_queue_time(P.encode_queue_time(-1)) == 0.0
    assert P.decode_queue_time(b"bad") == 0.0


@pytest.mark.parametrize("raw", [b"", b"\xc1", msgpack.packb([1]), msgpack.packb("s"), b"\x92\x01"])
def test_unpack_rejects_non_maps(raw):
    with pytest.raises(ProtocolError) as err:
        P.unpack(raw)
    assert err.value.code == P.E_BAD_ENCODING


@pytest.mark.parametrize("body, code", [
    ({"text_a": "a", "text_b": "b"}, P.E_BAD_FIELD),           # no id
    ({"id": True, "text_a": "a", "text_b": "b"}, P.E_BAD_FIELD),
    ({"id": 1.5, "text_a": "a", "text_b": "b"}, P.E_BAD_FIELD),
    ({"id": "x" * 300, "text_a": "a", "text_b": "b"}, P.E_BAD_FIELD),
])
def test_bad_ids(body, code):
    with pytest.raises(ProtocolError) as err:
        P.check_id(body)
    assert err.value.code == code


@pytest.mark.parametrize("body, code, typ", [
    ({"id": 1}, P.E_BAD_FIELD, ProtocolError),
    ({"id": 1, "text_a": "a"}, P.E_BAD_FIELD, ProtocolError),
    ({"id": 1, "text_a": None, "text_b": "b"}, P.E_BAD_FIELD, ProtocolError),
    ({"id": 1, "text_a": "", "text_b": "b"}, P.E_BAD_TEXT, InputError),
    ({"id": 1, "text_a": "a", "text_b": " \t\n"}, P.E_BAD_TEXT, InputError),
    ({"id": 1, "text_a": b"\xff", "text_b": "b"}, P.E_BAD_TEXT, InputError),
    ({"id": 1, "text_a": "a", "text_b": b"b"}, P.E_BAD_TEXT, InputError),
    ({"id": 1, "text_a": "a" * (P.MAX_TEXT_CHARS + 1), "text_b": "b"}, P.E_BAD_TEXT, InputError),
    ({"id": 1, "input_ids": [1, 2], "input_mask": [1], "segment_ids": [0]}, P.E_BAD_FIELD, ProtocolError),
    ({"id": 1, "input_ids": P.encode_array(np.zeros(128, np.float32)),
      "input_mask": P.encode_array(np.zeros(128, np.int32)),
      "segment_ids": P.encode_array(np.zeros(128, np.int32))}, P.E_BAD_FIELD, ProtocolError),
    ({"id": 1, "input_ids": {"__nd__": True, "dtype": "O", "shape": [128], "data": b""},
      "input_mask": 0, "segment_ids": 0}, P.E_BAD_FIELD, ProtocolError),
])
def test_bad_requests(body, code, typ):
    with pytest.raises(typ) as err:
        P.parse_request(body, 128)
    assert err.value.code == code


def test_bin_text_is_refused_as_the_client_refuses_bytes():
    """Text travels as a msgpack str. A bin, even valid UTF-8, was accepted by the worker while the
    client raises TypeError for bytes: now both refuse it (bad_text, the code a non-UTF-8 bin got)."""
    with pytest.raises(InputError, match="text_a: msgpack bin") as err:
        P.parse_request(P.unpack(P.pack({"id": 1, "text_a": "é".encode(), "text_b": "b"})), 128)
    assert err.value.code == P.E_BAD_TEXT
    with pytest.raises(TypeError, match="text_a must be str"):
        P.check_text_arg("text_a", "é".encode())


def test_an_invalid_id_is_echoed_cut_short_and_never_as_a_valid_id():
    """An ERROR for a 10,000-character id echoed it in full; now at most MAX_ID_LEN characters plus a
    marker, which no valid id (<= MAX_ID_LEN characters) can equal."""
    echoed = P.peek_id(P.pack({"id": "x" * 10_000}))
    assert echoed == "x" * P.MAX_ID_LEN + "…"
    with pytest.raises(ProtocolError):
        P.check_id({"id": echoed})
    assert P.peek_id(P.pack({"id": "y" * P.MAX_ID_LEN})) == "y" * P.MAX_ID_LEN  # a valid one, untouched
    assert P.peek_id(P.pack({"id": 7})) == 7 and P.peek_id(P.pack({"id": [1]})) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_only_raise_protocol_errors(raw):
    try:
        body = P.unpack(raw)
        P.check_id(body)
        P.parse_request(body, 128)
    except ProtocolError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "text_a", "text_b", "input_ids", "input_mask",
                                        "segment_ids", "__nd__", "x"]), _values, max_size=6))
def test_fuzz_structured_bodies_only_raise_protocol_errors(body):
    try:
        P.check_id(body)
        P.parse_request(P.unpack(P.pack(body)), 128)
    except ProtocolError:
        pass


def test_reply_decoders_round_trip():
    kind, body = P.split_reply([P.VERSION, P.REPLY, P.reply_body("x", [0.25, 0.75], {"compute_ms": 1.5})])
    label, probabilities, timings = P.parse_prediction(body)
    assert kind == P.REPLY and label == 1 and np.allclose(probabilities, [0.25, 0.75])
    assert timings == {"compute_ms": 1.5}
    assert P.parse_error(P.unpack(P.error_body("x", P.E_BAD_TEXT, "empty"))) == (P.E_BAD_TEXT, "empty")
    assert P.parse_busy(P.unpack(P.busy_body("x", "full"))) == "full"
    stats = P.unpack(P.stats_reply("s1", {"queue": 3}))
    assert P.check_id(stats) == "s1" and P.parse_stats_reply(stats) == {"queue": 3}
    assert P.parse_stats_request(P.stats_request(7)) == 7


def test_membership_round_trip():
    ready = P.parse_ready(P.unpack(P.ready_body("w", "host:1.ab:core-0", "inc", 42, 8, "echo", 4)))
    assert ready == P.Ready("w", "host:1.ab:core-0", "inc", 42, 8, "echo", batch_size=4)
    assert P.parse_ready({"capacity": 1}) == P.Ready(None, None, None, None, 1, None)
    assert P.parse_ready({"capacity": 1}).requests_per_message == 1  # older workers: single REQUESTs
    many = P.parse_ready(P.unpack(P.ready_body("w", None, "inc", 1, 8, "echo", 4, requests_per_message=8)))
    assert (many.requests_per_message, many.batch_size) == (8, 4)
    big = P.parse_ready(P.unpack(P.ready_body("w", None, "inc", 1, 9000, "echo", 9000,
                                              requests_per_message=P.MAX_PER_MESSAGE)))
    assert (big.capacity, big.batch_size, big.requests_per_message) == (9000, 9000, P.MAX_PER_MESSAGE)
    timed = P.parse_ready(P.unpack(P.ready_body("w", None, "inc", 1, 8, "echo", 4, batch_timeout_ms=2.5)))
    assert (timed.batch_timeout_ms, many.batch_timeout_ms) == (2.5, None)  # optional: older workers send none
    assert P.parse_disconnect(P.unpack(P.disconnect_body("w", "inc"))) == "inc"
    beat = P.parse_from_worker(P.heartbeat_frames("inc"))  # from a worker's other socket: names its registration
    assert beat.kind == P.HEARTBEAT and P.beat_incarnation(beat.body) == "inc"
    assert P.beat_incarnation(P.heartbeat_body()) is None and P.beat_incarnation(b"\xc1") is None
    assert P.parse_disconnect({}) is None
    assert P.new_incarnation() != P.new_incarnation()


def test_ready_and_stats_carry_model_info_and_histograms():
    ready = P.parse_from_worker(P.ready_frames("w", None, "inc", 1, 8, "tf", 4, version="1.2",
                                               model={"hash": "ab", "dtype": "float16", "target": "neuron"})).ready
    assert (ready.model_hash, ready.dtype, ready.target, ready.version) == ("ab", "float16", "neuron", "1.2")
    assert P.parse_ready({"capacity": 1}).model_hash is None  # optional: older workers send none
    stats = P.parse_from_worker(P.stats_frames({"batches": 3}, "epoch-1", {"compute_seconds": {"counts": [1, 0, 2],
                                                                                              "sum": 0.5}}))
    assert stats.stats == {"batches": 3} and stats.epoch == "epoch-1"
    assert stats.histograms == {"compute_seconds": ([1, 0, 2], 0.5)}
    plain = P.parse_from_worker(P.stats_frames({"batches": 3}))
    assert plain.epoch is None and plain.histograms is None


@pytest.mark.parametrize("histograms", [
    [1, 2], {"h": [1, 2]}, {"h": {"counts": [1, -1], "sum": 0.0}}, {"h": {"counts": [], "sum": 0.0}},
    {"h": {"counts": [1] * (P.MAX_BUCKETS + 1), "sum": 0.0}}, {"h": {"counts": [True], "sum": 0.0}},
    {"h": {"counts": [1], "sum": -1.0}}, {"h": {"counts": [1], "sum": "x"}}, {"h": {"counts": [1]}},
    {f"h{i}": {"counts": [1], "sum": 0.0} for i in range(P.MAX_HISTOGRAMS + 1)}, {b"h": {"counts": [1], "sum": 0.0}},
    # Values that would stick in the pool totals for good: a sum of inf, NaN or one that doubles to inf,
    # a count float64 cannot hold exactly.
    {"h": {"counts": [1], "sum": float("inf")}}, {"h": {"counts": [1], "sum": float("nan")}},
    {"h": {"counts": [1], "sum": 1e308}}, {"h": {"counts": [1 << 53], "sum": 0.0}},
])
def test_bad_stats_histograms(histograms):
    frames = [P.VERSION, P.STATS, P.pack({"batches": 1, "histograms": histograms})]
    with pytest.raises(ProtocolError) as err:
        P.parse_from_worker(frames)
    assert err.value.code == P.E_BAD_FIELD


@pytest.mark.parametrize("counters", [{"inferences": 2**63}, {"batches": 1 << 53}, {"inferences": -1},
                                      {"reconnects": 2**64 - 1}])
def test_stats_counters_out_of_range_are_malformed(counters):
    """A counter of 2**63 was added to the pool totals (bertpool_inferences_total 9.2e18, for good)."""
    with pytest.raises(ProtocolError, match="outside") as err:
        P.parse_from_worker(P.stats_frames({"batches": 1, **counters}, "epoch"))
    assert err.value.code == P.E_BAD_FIELD
    top = P.parse_from_worker(P.stats_frames({"inferences": P.MAX_COUNT - 1}, "epoch", {"h": {"counts": [
        P.MAX_COUNT - 1], "sum": float(P.MAX_COUNT - 1)}}))
    assert top.stats == {"inferences": P.MAX_COUNT - 1}  # the largest allowed passes


@pytest.mark.parametrize("body", [{"capacity": 0}, {"capacity": True}, {"capacity": 1, "slot": 5},
                                  {"capacity": 1, "incarnation": "x" * 300}, {"capacity": 1, "model": "x"},
                                  {"capacity": 1, "model": {"hash": 5}}, {"capacity": 1, "version": "x" * 300},
                                  {"capacity": 1, "requests_per_message": 0},
                                  {"capacity": 1, "requests_per_message": P.MAX_PER_MESSAGE + 1},
                                  {"capacity": 1, "requests_per_message": 2.0},
                                  {"capacity": 1, "batch_size": True}, {"capacity": 1, "batch_size": -4},
                                  {"capacity": 1, "batch_timeout_ms": -1}, {"capacity": 1, "batch_timeout_ms": "5"},
                                  {"capacity": 1, "batch_timeout_ms": float("nan")},
                                  {"capacity": 1, "batch_timeout_ms": True}])
def test_bad_ready(body):
    with pytest.raises(ProtocolError) as err:
        P.parse_ready(body)
    assert err.value.code == P.E_BAD_FIELD


_REPLY_DECODERS = (P.check_id, P.parse_prediction, P.parse_error, P.parse_busy, P.parse_stats_reply,
                   P.parse_ready, P.parse_disconnect)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "label", "probabilities", "timings", "code", "message", "stats",
                                        "capacity", "slot", "incarnation", "pid", "model", "version", "__nd__", "dtype", "shape",
                                        "data"]), _values, max_size=6))
def test_fuzz_reply_bodies_only_raise_protocol_errors(body):
    for decode in _REPLY_DECODERS:
        try:
            decode(P.unpack(P.pack(body)))
        except ProtocolError:
            pass


# ------------------------------------------------------- frames and decoders

def test_backend_frames_round_trip():
    token = b"\x00" * 7 + b"\x05"
    m = P.parse_from_broker(P.request_frames(token, b"body", 0.0125, 2.5))
    assert (m.kind, m.token, m.body) == (P.REQUEST, token, b"body")
    assert m.queue_ms == pytest.approx(12.5) and m.deadline_ms == pytest.approx(2500)
    assert P.parse_from_broker(P.request_frames(token, b"b", 0, None)).deadline_ms is None
    assert P.parse_from_broker(P.heartbeat_frames()).kind == P.HEARTBEAT
    assert P.parse_from_broker(P.broker_disconnect_frames(P.DISCONNECT_SHUTDOWN)).reason == P.DISCONNECT_SHUTDOWN
    w = P.parse_from_worker(P.reply_frames(token, b"r"))
    assert (w.kind, w.token, w.body) == (P.REPLY, token, b"r")
    assert P.parse_from_worker(P.error_frames(token, b"e")).kind == P.ERROR
    assert P.parse_from_worker(P.ready_frames("w", "s", "inc", 1, 8, "echo", 4)).ready.capacity == 8
    assert P.parse_from_worker(P.stats_frames({"batches": 3, "flag": True})).stats == {"batches": 3}
    assert P.parse_from_worker(P.worker_disconnect_frames("w", "inc")).incarnation == "inc"
    assert P.parse_from_worker(P.heartbeat_frames()).kind == P.HEARTBEAT
    c = P.parse_from_client([P.VERSION, P.REQUEST, b"x"])
    assert (c.kind, c.body) == (P.REQUEST, b"x")


def test_many_requests_and_replies_in_one_message_round_trip():
    tokens = [i.to_bytes(8, "big") for i in range(3)]
    frames = P.requests_frames([(tokens[0], b"first", 0.0125, 2.5), (tokens[1], b"", 0, None),
                                (tokens[2], b"\x00third", 1e-7, -1.0)])
    assert len(frames) == 4  # version, kind, table, bodies: not a frame per request
    m = P.parse_from_broker(frames)
    assert m.kind == P.REQUESTS
    assert [(r.kind, r.token, r.body) for r in m.requests] == [
        (P.REQUEST, tokens[0], b"first"), (P.REQUEST, tokens[1], b""), (P.REQUEST, tokens[2], b"\x00third")]
    assert m.requests[0].queue_ms == pytest.approx(12.5) and m.requests[0].deadline_ms == pytest.approx(2500)
    assert m.requests[1].deadline_ms is None
    assert m.requests[2].deadline_ms == pytest.approx(0.001)  # expired: the least left, never "none"
    answers = [(P.REPLY, tokens[0], b"r0"), (P.ERROR, tokens[1], b""), (P.REPLY, tokens[2], b"r2" * 100)]
    frames = P.replies_frames(answers)
    assert len(frames) == 4
    w = P.parse_from_worker(frames)
    assert (w.kind, w.replies) == (P.REPLIES, answers)


_ENTRY = (b"t" * 8) + (0).to_bytes(8, "big") + (0).to_bytes(8, "big")  # a REQUESTS record, less its length


@pytest.mark.parametrize("decode, frames", [
    (P.parse_from_broker, [P.VERSION, P.REQUESTS, b"", b""]),  # no record
    (P.parse_from_broker, [P.VERSION, P.REQUESTS, _ENTRY + (3).to_bytes(4, "big"), b"ab"]),  # lengths short
    (P.parse_from_broker, [P.VERSION, P.REQUESTS, _ENTRY + (1).to_bytes(4, "big"), b"ab"]),  # lengths long
    (P.parse_from_broker, [P.VERSION, P.REQUESTS, _ENTRY + b"\x00", b""]),  # a partial record
    (P.parse_from_broker, [P.VERSION, P.REQUESTS, _ENTRY + (0).to_bytes(4, "big")]),  # no bodies frame
    (P.parse_from_broker, [P.VERSION, P.REQUESTS, (b"t" * 8) + (0).to_bytes(8, "big")
                           + (1 << 62).to_bytes(8, "big") + (0).to_bytes(4, "big"), b""]),  # deadline too far
    (P.parse_from_broker, [P.VERSION, P.REQUESTS, _ENTRY * (P.MAX_PER_MESSAGE + 1)
                           + b"\x00" * 4 * (P.MAX_PER_MESSAGE + 1), b""]),  # too many
    (P.parse_from_worker, [P.VERSION, P.REPLIES, b"t" * 8 + P.READY + (0).to_bytes(4, "big"), b""]),  # kind
    (P.parse_from_worker, [P.VERSION, P.REPLIES, b"t" * 8 + P.REPLY + (5).to_bytes(4, "big"), b"abc"]),
    (P.parse_from_worker, [P.VERSION, P.REPLIES, b"t" * 8 + P.REPLY, b""]),
    (P.parse_from_worker, [P.VERSION, P.REQUESTS, _ENTRY + (0).to_bytes(4, "big"), b""]),  # broker's kind
    (P.parse_from_broker, [P.VERSION, P.REPLIES, b"t" * 8 + P.REPLY + (0).to_bytes(4, "big"), b""]),  # worker's
])
def test_malformed_batched_messages_are_protocol_errors(decode, frames):
    with pytest.raises(ProtocolError):
        decode(frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=8, max_size=8), st.binary(max_size=30),
                          st.floats(0, 1e5), st.one_of(st.none(), st.floats(-1, 1e5))), min_size=1, max_size=20),
       st.binary(max_size=12), st.integers(0, 60))
def test_fuzz_batched_messages(requests, junk, cut):
    """Whole messages round-trip; truncated or padded tables and bodies are ProtocolErrors, never others."""
    frames = P.requests_frames(requests)
    assert [(r.token, r.body) for r in P.parse_from_broker(frames).requests] == [(t, b) for t, b, _, _ in requests]
    answers = [(P.REPLY if i % 2 else P.ERROR, t, b) for i, (t, b, _, _) in enumerate(requests)]
    assert P.parse_from_worker(P.replies_frames(answers)).replies == answers
    for broken in ([*frames[:2], frames[2][:-cut or None], frames[3]], [*frames[:3], frames[3] + junk],
                   [*frames[:2], frames[2] + junk, frames[3]]):
        for decode in (P.parse_from_broker, P.parse_from_worker):
            try:
                decode(broken)
            except ProtocolError:
                pass


def test_deadline_frame_bounds():
    assert P.decode_deadline(P.encode_deadline(-5)) == pytest.approx(0.001)  # expired: the least left
    assert P.decode_deadline(P.encode_deadline(1e9)) == P.MAX_DEADLINE_MS
    for bad in (b"\x00" * 8, b"\x01", (P.MAX_DEADLINE_MS * 1000 + 1).__int__().to_bytes(8, "big")):
        with pytest.raises(ProtocolError):
            P.decode_deadline(bad)
    assert P.request_deadline_ms(P.text_request(1, "a", "b")) is None
    assert P.request_deadline_ms(P.text_request(1, "a", "b", deadline_ms=5)) == 5.0
    with pytest.raises(ProtocolError):
        P.request_deadline_ms(P.pack({"deadline_ms": "soon"}))


@pytest.mark.parametrize("decode, frames", [
    (P.parse_from_worker, [P.VERSION, P.REPLY, b"short", b"x"]),
    (P.parse_from_worker, [P.VERSION, P.REQUEST, b"x"]),
    (P.parse_from_worker, [b"BP2", P.HEARTBEAT, b"\x80"]),
    (P.parse_from_worker, [P.VERSION, P.READY, b"\xc1"]),
    (P.parse_from_broker, [P.VERSION, P.REQUEST, b"t" * 8, b"x", b"q" * 8]),
    (P.parse_from_broker, [P.VERSION, P.REPLY, b"x"]),
    (P.parse_from_broker, []),
    (P.parse_from_client, [P.VERSION, P.REPLY, b"x"]),
    (P.parse_from_client, [P.VERSION]),
])
def test_malformed_frames_are_protocol_errors(decode, frames):
    with pytest.raises(ProtocolError):
        decode(frames)


_KINDS = st.sampled_from([P.REQUEST, P.REPLY, P.ERROR, P.BUSY, P.READY, P.STATS, P.HEARTBEAT, P.DISCONNECT,
                          P.REQUESTS, P.REPLIES])
_frame = st.one_of(st.binary(max_size=40), _KINDS, st.just(P.VERSION), st.binary(min_size=8, max_size=8),
                   st.builds(P.pack, st.dictionaries(st.sampled_from(
                       ["capacity", "incarnation", "slot", "reason", "id", "deadline_ms", "batches"]),
                       _values, max_size=4)))


@settings(max_examples=500, deadline=None)
@given(st.lists(_frame, max_size=7))
def test_fuzz_frame_decoders_only_raise_protocol_errors(frames):
    for decode in (P.parse_from_client, P.parse_from_worker, P.parse_from_broker):
        try:
            decode(frames)
        except ProtocolError:
            pass
    for frame in frames:
        for decode in (P.decode_deadline, P.request_deadline_ms):
            try:
                decode(frame)
            except ProtocolError:
                pass


def test_reply_bodies_decode_to_their_rows():
    probs = np.array([[0.9, 0.1], [0.25, 0.75], [0.5, 0.5]], np.float32)
    bodies = P.reply_bodies(["a", 7, "c"], probs.tolist(), [{"compute_ms": 1.0}, {}, {"batch_size": 3}])
    for body, rid, row, timings in zip(bodies, ["a", 7, "c"], probs, [{"compute_ms": 1.0}, {}, {"batch_size": 3}]):
        decoded = P.unpack(body)
        label, got, got_timings = P.parse_prediction(decoded)
        assert decoded["id"] == rid and label == int(np.argmax(row)) and got_timings == timings
        assert got.dtype == np.float32 and np.array_equal(got, row)
        assert P.decode_array(P.encode_array(row)).tobytes() == got.tobytes()  # encode_array's layout
    assert P.reply_body("a", probs[0], {"compute_ms": 1.0}) == bodies[0]


# ----------------------------------------------------------- configuration

@pytest.mark.parametrize("interval_s, liveness", [(1.0, 10**20), (1.0, 86_401), (3600, 25), (0.01, 8_640_001)])
def test_a_liveness_window_over_a_day_is_refused(interval_s, liveness):
    """--heartbeat-liveness 99999999999999999999 was accepted: dead workers (or brokers) were never noticed."""
    with pytest.raises(ConfigError, match="at most 86400 s"):
        P.check_heartbeat(interval_s, liveness)


@pytest.mark.parametrize("interval_s, liveness", [(1.0, 86_400), (3600, 24), (0.01, 3), (1.0, 20)])
def test_a_liveness_window_up_to_a_day_is_taken(interval_s, liveness):
    P.check_heartbeat(interval_s, liveness)


@pytest.mark.parametrize("endpoint, says", [
    ("tcp://999.1.1.1:5555", "'999.1.1.1' is not a valid host"),  # bound "fine" until "No such device"
    ("tcp://1.2.3:5555", "'1.2.3' is not a valid host"),
    ("tcp://ho st:5555", "'ho st' is not a valid host"),
    ("tcp://[::1]:5557", "IPv6 is not supported"),  # the sockets do not set ZMQ_IPV6: "No such device"
    ("tcp://[::]:5557", "IPv6 is not supported"),
    ("tcp://::1:5557", "IPv6 is not supported"),
    ("127.0.0.1", "must start with tcp:// or ipc://$"),  # listed inproc://, which every flag refuses
])
def test_check_endpoint_validates_the_tcp_host(endpoint, says):
    with pytest.raises(ConfigError, match=says):
        P.check_endpoint("frontend address", endpoint)


@pytest.mark.parametrize("endpoint", ["tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://127.0.0.1:5555",
                                      "tcp://localhost:5555", "tcp://my-host.example.com:5555", "tcp://eth0:5555",
                                      "ipc:///tmp/x", "inproc://in-process"])
def test_check_endpoint_takes_what_zeromq_binds_and_connects(endpoint):
    assert P.check_endpoint("frontend address", endpoint) == endpoint
