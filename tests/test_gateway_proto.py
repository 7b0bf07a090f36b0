"""The gateway's shipped gRPC modules: current with their .proto, and wire-compatible with the
KServe v2 service that Triton's client calls (same package, service, messages, field numbers).

The gateway's modules and tritonclient's both define ``inference.*`` in protobuf's default pool,
so the gateway's are imported in a subprocess and compared as FileDescriptorProtos.
"""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

pytest.importorskip("grpc")
from google.protobuf import descriptor_pb2  # noqa: E402

DUMP = ("import base64, sys; from bertpool.gateway.proto import grpc_service_pb2 as pb; "
        "import bertpool.gateway.proto.grpc_service_pb2_grpc; "
        "sys.stdout.write(base64.b64encode(pb.DESCRIPTOR.serialized_pb).decode())")


@pytest.fixture(scope="module")
def shipped() -> descriptor_pb2.FileDescriptorProto:
    out = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(out.stdout))


def test_shipped_modules_are_current(shipped):
    pytest.importorskip("grpc_tools")
    from bertpool.gateway.protogen import fresh_descriptor

    fresh = descriptor_pb2.FileDescriptorProto.FromString(fresh_descriptor())
    assert shipped == fresh, "gateway/proto/*.py are stale: run scripts/gen-gateway-proto"


def _fields(message: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict:
    table = {}
    for f in message.field:
        oneof = message.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
        table[f"{prefix}{message.name}.{f.name}"] = (f.number, f.type, f.label, f.type_name, oneof)
    for nested in message.nested_type:
        table.update(_fields(nested, f"{prefix}{message.name}."))
    return table


def test_wire_compatible_with_tritonclient(shipped):
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert shipped.package == theirs.package == "inference"
    their_messages = {m.name: m for m in theirs.message_type}
    for message in shipped.message_type:
        assert message.name in their_messages, message.name
        assert _fields(message) == _fields(their_messages[message.name]), message.name
    [ours], their_services = list(shipped.service), {s.name: s for s in theirs.service}
    assert ours.name == "GRPCInferenceService"
    their_methods = {m.name: (m.input_type, m.output_type) for m in their_services[ours.name].method}
    assert {m.name: (m.input_type, m.output_type) for m in ours.method}.items() <= their_methods.items()
    assert {m.name for m in ours.method} == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                             "ModelMetadata", "ModelInfer"}
