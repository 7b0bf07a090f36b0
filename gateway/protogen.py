"""Regenerate the gateway's gRPC modules from gateway/proto/grpc_service.proto with grpcio-tools.

The generated ``grpc_service_pb2.py`` and ``grpc_service_pb2_grpc.py`` are shipped beside the
.proto, so serving needs only grpcio and protobuf; grpcio-tools (the gateway-test extra) is needed only
to regenerate them (``scripts/gen-gateway-proto``) and to check that they are current
(tests/test_gateway_proto.py compares the descriptor they carry with a fresh compile).

The .proto is compiled as ``bertpool/gateway/proto/grpc_service.proto`` so the generated
gRPC module imports its messages as ``bertpool.gateway.proto.grpc_service_pb2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..common.errors import ConfigError

PROTO_DIR = Path(__file__).resolve().parent / "proto"
PROTO = PROTO_DIR / "grpc_service.proto"
PROTO_NAME = "bertpool/gateway/proto/grpc_service.proto"  # its name inside the descriptor pool
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py")


def _protoc(args: list[str]) -> None:
    """Run grpcio-tools' protoc in a child process: in-process it can crash a process that has
    loaded another protobuf runtime (TensorFlow's)."""
    if importlib.util.find_spec("grpc_tools") is None:
        raise ConfigError("regenerating the gateway's gRPC modules needs grpcio-tools "
                          "(pip install 'bertpool[gateway-test]')")
    out = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"protoc failed with exit code {out.returncode} on {PROTO}: {out.stderr.strip()}")


def _staged(tmp: Path) -> Path:
    """Copy the .proto to ``tmp/PROTO_NAME``; return the include root."""
    target = tmp / PROTO_NAME
    target.parent.mkdir(parents=True)
    shutil.copyfile(PROTO, target)
    return tmp


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile the .proto into ``out_dir``; return the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _staged(Path(tmp))
        _protoc(["-I", str(root), f"--python_out={root}", f"--grpc_python_out={root}", PROTO_NAME])
        written = []
        for name in GENERATED:
            dst = Path(out_dir) / name
            shutil.copyfile(root / Path(PROTO_NAME).parent / name, dst)
            written.append(dst)
    return written


def fresh_descriptor() -> bytes:
    """The FileDescriptorProto a fresh compile of the .proto gives, serialized."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as tmp:
        root = _staged(Path(tmp))
        out = root / "set.pb"
        _protoc(["-I", str(root), f"--descriptor_set_out={out}", PROTO_NAME])
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
        assert len(files) == 1, "the .proto imports nothing"
        _strip_json_names(files[0].message_type)  # descriptor sets carry them; generated code does not
        return files[0].SerializeToString(deterministic=True)


def _strip_json_names(messages) -> None:
    for message in messages:
        for f in message.field:
            f.ClearField("json_name")
        _strip_json_names(message.nested_type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gen-gateway-proto",
                                     description="Regenerate the gateway's gRPC modules from its .proto.")
    parser.parse_args(argv)
    try:
        for path in generate():
            print(f"wrote {path}")
    except ConfigError as exc:
        print(f"gen-gateway-proto: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
