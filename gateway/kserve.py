"""KServe v2 (Open Inference Protocol) <-> bertpool: decode, validate and encode, no I/O.

A v2 inference request names tensors; bertpool's pool answers one row at a time. This module
turns a request (HTTP JSON, HTTP JSON + binary tensor data, or gRPC ModelInferRequest) into a
:class:`InferRequest` of decoded tensors, checks it against the served model's signature
(:func:`rows_of`), and encodes the N answers back into a response. Every problem with what a
client sent raises :class:`KServeError` carrying its HTTP status and gRPC status code; nothing
else escapes these functions for any input.

The served model's signature (:data:`INPUTS`, :data:`OUTPUTS`):

    text_a, text_b                   BYTES [N] or [N,1]     UTF-8 text pairs, or
    input_ids, input_mask, segment_ids  INT32|INT64 [N,S]   pre-tokenized features (S = seq_length)
    probabilities                    FP32  [N,2]            softmax over (not paraphrase, paraphrase)
    label                            INT64 [N]              argmax of probabilities

HTTP binary tensor data extension: the body is a JSON header of ``Inference-Header-Content-Length``
bytes followed by each binary input's data in input order; an input carries
``parameters.binary_data_size``. An output is returned binary when its ``parameters.binary_data``
is true, or (unset) when the request's ``parameters.binary_data_output`` is; binary outputs carry
``parameters.binary_data_size`` and follow the JSON header in output order. BYTES elements are each
preceded by their length as a 4-byte little-endian integer, in binary form and in gRPC raw contents.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.errors import BertpoolError
from ..common.protocol import MAX_TIMEOUT_S, fits_int32

TEXT_INPUTS = ("text_a", "text_b")
FEATURE_INPUTS = ("input_ids", "input_mask", "segment_ids")
OUTPUTS = ("probabilities", "label")

# Datatypes a v2 client may name, and the numpy dtype of their raw little-endian bytes.
NUMPY_DTYPES = {"BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
                "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"),
                "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
                "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
DATATYPES = frozenset(NUMPY_DTYPES) | {"BYTES"}

HTTP_TO_GRPC = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class KServeError(BertpoolError):
    """A request the gateway answers with an error: ``status`` (HTTP) and ``grpc_code``
    (the name of a grpc.StatusCode) say which; ``message`` is for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.grpc_code = HTTP_TO_GRPC[status]
        self.message = message


def bad_request(message: str) -> KServeError:
    return KServeError(400, message)


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway serves under the v2 model API."""
    name: str          # the model name clients use in URLs and requests
    version: str       # the compiled model's hash (or what --model-version says)
    seq_length: int | None  # S of the feature inputs; None: not known here (the workers check it)
    platform: str = "bertpool"

    def metadata(self) -> dict[str, Any]:
        """The v2 model metadata object (HTTP JSON; the gRPC response has the same fields)."""
        s = -1 if self.seq_length is None else self.seq_length
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [{"name": "text_a", "datatype": "BYTES", "shape": [-1]},
                           {"name": "text_b", "datatype": "BYTES", "shape": [-1]},
                           {"name": "input_ids", "datatype": "INT32", "shape": [-1, s]},
                           {"name": "input_mask", "datatype": "INT32", "shape": [-1, s]},
                           {"name": "segment_ids", "datatype": "INT32", "shape": [-1, s]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                            {"name": "label", "datatype": "INT64", "shape": [-1]}]}

    def check(self, name: str, version: str | None) -> None:
        """404 unless ``name`` (and ``version``, when given) is the served model."""
        if name != self.name:
            raise KServeError(404, f"unknown model '{name}': this server serves '{self.name}'")
        if version and version != self.version:
            raise KServeError(404, f"unknown version '{version}' of model '{name}': "
                                   f"the served version is '{self.version}'")


@dataclass
class Tensor:
    """One decoded input: ``data`` is a numpy array for numeric datatypes, a list of bytes for BYTES."""
    name: str
    datatype: str
    shape: list[int]
    data: Any


@dataclass
class InferRequest:
    """A decoded v2 inference request (before it is checked against the model)."""
    id: str = ""
    inputs: dict[str, Tensor] = field(default_factory=dict)
    outputs: list[tuple[str, bool | None]] | None = None  # (name, binary) requested; None: all
    binary_output: bool = False       # parameters.binary_data_output (HTTP)
    timeout_s: float | None = None    # parameters.timeout (microseconds on the wire)


# Feature columns allowed per row when the model's S is not known here (a SavedModel directory).
UNKNOWN_SEQ_LENGTH_BOUND = 1024


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for."""
    max_rows: int = 1024  # N: pool requests one v2 request may fan out into
    seq_length: int | None = None  # S of feature rows when known; bounds their elements before decoding

    def max_elements(self, name: str) -> int:
        """Most data elements input ``name`` (one of the model's) may carry: one a row for text
        ([N] or [N,1]), S a row for features. Checked before any data is decoded, so a body of many
        tiny elements costs no more than the largest request the model could take."""
        if name in TEXT_INPUTS:
            return self.max_rows
        return self.max_rows * (self.seq_length or UNKNOWN_SEQ_LENGTH_BOUND)


# ---------------------------------------------------------------- decoding helpers

def _check_shape(name: str, shape: Any) -> list[int]:
    if (not isinstance(shape, (list, tuple)) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 31 for d in shape)):
        raise bad_request(f"input '{name}': shape must be a list of at most 8 non-negative integers, "
                          f"got {_short(shape)}")
    return [int(d) for d in shape]


def _elements(name: str, shape: list[int], limit: int) -> int:
    n = math.prod(shape)
    if n > limit:
        raise bad_request(f"input '{name}': shape {shape} has {n} elements, more than the {limit} allowed")
    return n


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _flatten(name: str, data: Any, expected: int) -> list[Any]:
    """Row-major elements of JSON ``data`` (a flat or nested list); at most ``expected`` of them."""
    if not isinstance(data, list):
        data = [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 8:
                    raise bad_request(f"input '{name}': data nested deeper than its shape allows")
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > expected:
                raise bad_request(f"input '{name}': more data elements than its shape has ({expected})")
        else:
            stack.pop()
    return out


def _json_elements(name: str, datatype: str, shape: list[int], data: Any, limit: int) -> Any:
    expected = _elements(name, shape, limit)
    flat = _flatten(name, data, expected)
    if len(flat) != expected:
        raise bad_request(f"input '{name}': {len(flat)} data elements, but shape {shape} needs {expected}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise bad_request(f"input '{name}': BYTES data must be strings")
        return [v.encode("utf-8", "surrogatepass") for v in flat]
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "b":
        ok = all(isinstance(v, bool) for v in flat)
    elif dtype.kind in "iu":
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
    else:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)
    if not ok:
        raise bad_request(f"input '{name}': {datatype} data must be {_kind_word(dtype)}")
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise bad_request(f"input '{name}': a value does not fit {datatype}: {exc}") from None


def _kind_word(dtype: np.dtype) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers"}.get(dtype.kind, "numbers")


def decode_raw(name: str, datatype: str, shape: list[int], raw: bytes, limit: int) -> Any:
    """One input's binary data (HTTP extension or gRPC raw contents), checked against its shape."""
    expected = _elements(name, shape, limit)
    if datatype == "BYTES":
        items, pos, view = [], 0, memoryview(raw)
        while pos < len(raw):
            if pos + 4 > len(raw) or len(items) >= expected:
                raise bad_request(f"input '{name}': BYTES data is not {expected} length-prefixed elements")
            (size,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + size > len(raw):
                raise bad_request(f"input '{name}': a BYTES element's length {size} runs past its data")
            items.append(bytes(view[pos:pos + size]))
            pos += size
        if len(items) != expected:
            raise bad_request(f"input '{name}': {len(items)} BYTES elements, but shape {shape} needs {expected}")
        return items
    dtype = NUMPY_DTYPES[datatype]
    if len(raw) != expected * dtype.itemsize:
        raise bad_request(f"input '{name}': {len(raw)} bytes of data, but {datatype} {shape} takes "
                          f"{expected * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _datatype(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in DATATYPES:
        raise bad_request(f"input '{name}': unknown datatype {_short(value)}; v2 datatypes are "
                          f"{', '.join(sorted(DATATYPES))}")
    return value


def _declared(name: str, datatype: Any, shape: Any, limits: Limits) -> tuple[str, list[int], int]:
    """(datatype, shape, elements) of an input as declared, checked against the model's signature
    before its data is decoded: 400 for a name the model lacks, a datatype its input does not take,
    or more elements than its largest request holds. Decoding (a Python loop per BYTES element) is
    what a request costs the event loop; without this a 16 MiB body of empty strings for an unknown
    or wrongly shaped input took seconds to decode only to be refused afterwards."""
    datatype = _datatype(name, datatype)
    shape = _check_shape(name, shape)
    if name in TEXT_INPUTS:
        if datatype != "BYTES":
            raise bad_request(f"input '{name}': datatype {datatype}, expected BYTES")
    elif name in FEATURE_INPUTS:
        if datatype not in ("INT32", "INT64"):
            raise bad_request(f"input '{name}': datatype {datatype}, expected INT32 (or INT64)")
    else:
        raise bad_request(f"unknown input(s) {name}: the model takes {' and '.join(TEXT_INPUTS)}, or "
                          f"{', '.join(FEATURE_INPUTS)}")
    if shape:
        _rows_count(name, max(shape[0], 1), limits)  # the usual way to be too large, in the words rows_of uses
    elements, bound = math.prod(shape), limits.max_elements(name)
    if elements > bound:
        raise bad_request(f"input '{name}': shape {shape} has {elements} elements, more than the {bound} one "
                          f"request may carry ({limits.max_rows} rows of {bound // limits.max_rows})")
    return datatype, shape, elements


def _timeout_s(value: Any) -> float | None:
    """The request's ``timeout`` parameter (microseconds, as Triton clients send it) in seconds;
    None when absent or 0, which Triton reads as "no timeout of its own" (the gateway's applies)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TIMEOUT_S * 1e6:
        raise bad_request(f"parameter 'timeout' must be a number of microseconds >= 0, got {_short(value)}")
    return value / 1e6 or None


# ------------------------------------------------------------------- HTTP decoding

def decode_http(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """An HTTP infer body (JSON, or JSON + binary data when ``header_length`` is given)."""
    if header_length is not None:
        json_size = _header_length(header_length)
        if not 0 < json_size <= len(body):
            raise bad_request(f"Inference-Header-Content-Length {json_size} does not fit a body of {len(body)} bytes")
    else:
        json_size = len(body)
    try:
        doc = json.loads(body[:json_size])
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad_request(f"request body is not valid JSON: {_short(str(exc), 200)}") from None
    if not isinstance(doc, dict):
        raise bad_request("request body must be a JSON object")
    params = _params(doc.get("parameters"), "request")
    request = InferRequest(id=_request_id(doc.get("id")), timeout_s=_timeout_s(params.get("timeout")),
                           binary_output=_bool_param(params, "binary_data_output", "request"))
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("request needs 'inputs', a non-empty list")
    binary = memoryview(body)[json_size:]
    offset = 0
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request("every input must be an object with a string 'name'")
        name = item["name"]
        datatype, shape, elements = _declared(name, item.get("datatype"), item.get("shape"), limits)
        size = _params(item.get("parameters"), f"input '{name}'").get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise bad_request(f"input '{name}': binary_data_size {_short(size)} does not fit the "
                                  f"{len(binary) - offset} binary bytes left")
            data = decode_raw(name, datatype, shape, bytes(binary[offset:offset + size]), elements)
            offset += size
        elif "data" in item:
            data = _json_elements(name, datatype, shape, item["data"], elements)
        else:
            raise bad_request(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        _add_input(request, Tensor(name, datatype, shape, data))
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data follow the JSON header that no "
                          "input's binary_data_size accounts for")
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise bad_request("'outputs' must be a list")
        request.outputs = []
        for item in outputs:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise bad_request("every requested output must be an object with a string 'name'")
            p = _params(item.get("parameters"), f"output '{item['name']}'")
            _no_classification(item["name"], p.get("classification"))
            binary_flag = _bool_param(p, "binary_data", f"output '{item['name']}'") if "binary_data" in p else None
            request.outputs.append((item["name"], binary_flag))
    return request


def _header_length(value: str) -> int:
    """Inference-Header-Content-Length as a byte count: decimal ASCII digits only, as HTTP's own
    Content-Length (RFC 9110). Python's int() also takes '+12', '1_2' and non-ASCII digits, which
    no client means and a proxy would read differently."""
    digits = value.strip(" \t")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 20):
        raise bad_request(f"Inference-Header-Content-Length {_short(value)} is not an integer byte count "
                          "(decimal digits)")
    return int(digits)


def _no_classification(output: str, class_count: Any) -> None:
    """400 for Triton's classification extension (``class_count``), which this server does not offer:
    answering raw tensors instead would be a silent change of what was asked."""
    if class_count not in (None, 0):
        raise bad_request(f"output '{output}': classification (class_count {_short(class_count)}) is not "
                          "supported; ask for 'probabilities' and 'label'")


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where} 'parameters' must be an object")
    return value


def _bool_param(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise bad_request(f"{where} parameter '{key}' must be true or false, got {_short(value)}")
    return value


def _request_id(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):  # any length, as Triton: the body size limit bounds it
        raise bad_request("request 'id' must be a string")
    return value


def _add_input(request: InferRequest, tensor: Tensor) -> None:
    if tensor.name in request.inputs:
        raise bad_request(f"input '{tensor.name}' is given twice")
    request.inputs[tensor.name] = tensor


# ------------------------------------------------------------------- gRPC decoding

_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _grpc_param(param) -> Any:
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


def decode_grpc(msg, limits: Limits) -> InferRequest:
    """A gRPC ModelInferRequest (from the gateway's generated module)."""
    request = InferRequest(id=_request_id(msg.id), timeout_s=_timeout_s(_grpc_param(msg.parameters["timeout"]))
                           if "timeout" in msg.parameters else None)
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise bad_request(f"{len(raw)} raw_input_contents for {len(msg.inputs)} inputs: give every input's "
                          "data there, or none")
    if not msg.inputs:
        raise bad_request("request has no inputs")
    for i, item in enumerate(msg.inputs):
        name = item.name
        datatype, shape, elements = _declared(name, item.datatype, list(item.shape), limits)
        if raw:
            if item.contents.ByteSize():
                raise bad_request(f"input '{name}': data both in raw_input_contents and in contents")
            data = decode_raw(name, datatype, shape, raw[i], elements)
        else:
            if datatype not in _CONTENTS_FIELD:
                raise bad_request(f"input '{name}': {datatype} data can only travel in raw_input_contents")
            values = getattr(item.contents, _CONTENTS_FIELD[datatype])
            if len(values) != elements:
                raise bad_request(f"input '{name}': {len(values)} elements in contents, but shape {shape} "
                                  f"needs {elements}")
            values = list(values)
            if datatype == "BYTES":
                data = values
            else:
                try:
                    data = np.array(values, dtype=NUMPY_DTYPES[datatype]).reshape(shape)
                except (OverflowError, ValueError) as exc:
                    raise bad_request(f"input '{name}': a value does not fit {datatype}: {exc}") from None
        _add_input(request, Tensor(name, datatype, shape, data))
    for o in msg.outputs:
        if "classification" in o.parameters:
            _no_classification(o.name, _grpc_param(o.parameters["classification"]))
    if msg.outputs:
        request.outputs = [(o.name, None) for o in msg.outputs]
    return request


# ------------------------------------------------------------ model signature

@dataclass(frozen=True)
class Rows:
    """A checked request: N text pairs, or N feature rows (int32 [N,S] each)."""
    kind: str  # "text" or "features"
    items: list[Any]

    def __len__(self) -> int:
        return len(self.items)


def rows_of(request: InferRequest, model: ModelInfo, limits: Limits) -> Rows:
    """Check a decoded request against the model's inputs; return the N pool requests it makes."""
    names = set(request.inputs)
    unknown = names - set(TEXT_INPUTS) - set(FEATURE_INPUTS)
    if unknown:
        raise bad_request(f"unknown input(s) {', '.join(sorted(unknown))}: model '{model.name}' takes "
                          f"{' and '.join(TEXT_INPUTS)}, or {', '.join(FEATURE_INPUTS)}")
    if names & set(TEXT_INPUTS) and names & set(FEATURE_INPUTS):
        raise bad_request("give text inputs (text_a, text_b) or feature inputs (input_ids, input_mask, "
                          "segment_ids), not both")
    if names & set(TEXT_INPUTS):
        missing = [n for n in TEXT_INPUTS if n not in names]
        if missing:
            raise bad_request(f"missing input(s) {', '.join(missing)}: text pairs need text_a and text_b")
        return _text_rows(request, limits)
    missing = [n for n in FEATURE_INPUTS if n not in names]
    if missing:
        raise bad_request(f"missing input(s) {', '.join(missing)}: features need input_ids, input_mask "
                          "and segment_ids")
    return _feature_rows(request, model, limits)


def _rows_count(name: str, n: int, limits: Limits) -> int:
    if n < 1:
        raise bad_request(f"input '{name}' has no rows")
    if n > limits.max_rows:
        raise bad_request(f"input '{name}' has {n} rows, more than the {limits.max_rows} one request may carry")
    return n


def _text_rows(request: InferRequest, limits: Limits) -> Rows:
    columns = []
    for name in TEXT_INPUTS:
        t = request.inputs[name]
        if t.datatype != "BYTES":
            raise bad_request(f"input '{name}': datatype {t.datatype}, expected BYTES")
        if not (len(t.shape) == 1 or len(t.shape) == 2 and t.shape[1] == 1):
            raise bad_request(f"input '{name}': shape {t.shape}, expected [N] or [N,1]")
        _rows_count(name, t.shape[0], limits)
        texts = []
        for i, raw in enumerate(t.data):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise bad_request(f"input '{name}': element {i} is not valid UTF-8") from None
        columns.append(texts)
    a, b = columns
    if len(a) != len(b):
        raise bad_request(f"text_a has {len(a)} rows but text_b has {len(b)}")
    return Rows("text", list(zip(a, b)))


def _feature_rows(request: InferRequest, model: ModelInfo, limits: Limits) -> Rows:
    arrays = []
    for name in FEATURE_INPUTS:
        t = request.inputs[name]
        if t.datatype not in ("INT32", "INT64"):
            raise bad_request(f"input '{name}': datatype {t.datatype}, expected INT32 (or INT64)")
        if len(t.shape) != 2 or not t.shape[1] or model.seq_length not in (None, t.shape[1]):
            raise bad_request(f"input '{name}': shape {t.shape}, expected [N,{model.seq_length or 'S'}]")
        _rows_count(name, t.shape[0], limits)
        data = t.data
        if not fits_int32(data):
            raise bad_request(f"input '{name}': a value does not fit INT32")
        arrays.append(np.ascontiguousarray(data, dtype=np.int32))
    n = {a.shape[0] for a in arrays}
    if len(n) != 1:
        raise bad_request(f"input_ids, input_mask and segment_ids have different row counts {sorted(n)}")
    ids, mask, segs = arrays
    return Rows("features", [(ids[i], mask[i], segs[i]) for i in range(ids.shape[0])])


def requested_outputs(request: InferRequest) -> list[tuple[str, bool]]:
    """(name, binary) of each output to return, in order (all of them when none is named, as gRPC and
    Triton read an empty list too); 400 for a name the model lacks."""
    if not request.outputs:
        return [(name, request.binary_output) for name in OUTPUTS]
    out, seen = [], set()
    for name, binary in request.outputs:
        if name not in OUTPUTS:
            raise bad_request(f"unknown output '{name}': the model's outputs are {', '.join(OUTPUTS)}")
        if name in seen:
            raise bad_request(f"output '{name}' is requested twice")
        seen.add(name)
        out.append((name, request.binary_output if binary is None else binary))
    return out


# ------------------------------------------------------------------- encoding

def output_arrays(probabilities: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (datatype, array) of every output, from probabilities float32 [N,2]."""
    probs = np.ascontiguousarray(probabilities, dtype="<f4")
    return {"probabilities": ("FP32", probs), "label": ("INT64", np.argmax(probs, axis=1).astype("<i8"))}


def encode_http(model: ModelInfo, request: InferRequest, probabilities: np.ndarray,
                outputs: list[tuple[str, bool]]) -> tuple[bytes, int | None]:
    """The HTTP response body and, when binary outputs follow the JSON, its header length."""
    arrays = output_arrays(probabilities)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id:
        doc["id"] = request.id
    tensors, blobs = [], []
    for name, binary in outputs:
        datatype, array = arrays[name]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    doc["outputs"] = tensors
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def error_json(message: str) -> bytes:
    """The v2 error object."""
    return json.dumps({"error": message}).encode()
