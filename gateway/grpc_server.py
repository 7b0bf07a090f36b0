"""The gateway's KServe v2 gRPC service: ``inference.GRPCInferenceService`` on grpc.aio.

Six RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer.
Errors are gRPC statuses: INVALID_ARGUMENT (bad request), NOT_FOUND (another model),
UNAVAILABLE (busy, no broker), DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (message over
--max-body-bytes, from grpc itself), INTERNAL. The request's gRPC deadline, when it has one,
bounds the pool deadline. Outputs always travel in ``raw_output_contents``.
"""

from __future__ import annotations

import logging
import socket

import grpc

from . import kserve
from .kserve import KServeError
from .proto import grpc_service_pb2 as pb
from .proto import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("bertpool.gateway.grpc")


def _metadata_response(doc: dict) -> pb.ModelMetadataResponse:
    def tensors(items):
        return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in items]
    return pb.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"],
                                    inputs=tensors(doc["inputs"]), outputs=tensors(doc["outputs"]))


def encode_response(model: kserve.ModelInfo, request: kserve.InferRequest, probabilities,
                    outputs: list[tuple[str, bool]]) -> pb.ModelInferResponse:
    arrays = kserve.output_arrays(probabilities)
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    for name, _ in outputs:
        datatype, array = arrays[name]
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Maps each RPC onto the gateway core (gateway.gateway.Gateway)."""

    def __init__(self, gateway) -> None:
        self._gw = gateway

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self._gw.ready())

    async def ModelReady(self, request, context):
        return await self._call(context, self._model_ready, request)

    async def ServerMetadata(self, request, context):
        doc = self._gw.server_metadata()
        return pb.ServerMetadataResponse(name=doc["name"], version=doc["version"], extensions=doc["extensions"])

    async def ModelMetadata(self, request, context):
        return await self._call(context, self._model_metadata, request)

    async def ModelInfer(self, request, context):
        return await self._call(context, self._infer, request, context)

    async def _model_ready(self, request):
        self._gw.model.check(request.name, request.version)
        return pb.ModelReadyResponse(ready=await self._gw.ready())

    async def _model_metadata(self, request):
        self._gw.model.check(request.name, request.version)
        return _metadata_response(self._gw.model.metadata())

    async def _infer(self, request, context):
        self._gw.model.check(request.model_name, request.model_version)
        decoded = kserve.decode_grpc(request, self._gw.limits)
        outputs = kserve.requested_outputs(decoded)
        probabilities = await self._gw.infer(decoded, deadline_s=context.time_remaining())
        return encode_response(self._gw.model, decoded, probabilities, outputs)

    @staticmethod
    async def _call(context, fn, *args):
        """Run ``fn``; a KServeError or a bug becomes a gRPC status (abort raises, so it is last)."""
        try:
            return await fn(*args)
        except KServeError as exc:
            code, message = getattr(grpc.StatusCode, exc.grpc_code), exc.message
        except Exception as exc:  # a bug: answer INTERNAL and keep serving
            log.exception("internal error in %s", getattr(fn, "__name__", fn))
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        await context.abort(code, message)


async def start_grpc(gateway, host: str, port: int) -> tuple[grpc.aio.Server, str]:
    """Start the gRPC server on host:port (0: any free port); return it and the bound address."""
    limit = gateway.config.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(gateway), server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError:  # newer grpcio raises "Failed to bind to address ..." where older returned 0
        bound = 0
    if bound == 0:
        raise OSError(_bind_problem(host, port))
    await server.start()
    return server, f"{host}:{bound}"


def _bind_problem(host: str, port: int) -> str:
    """Why grpc could not bind host:port, asked again of the OS: grpc's exception says only "Failed to
    bind" (the reason is in its C-level log line)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no clash
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                return f"cannot bind {sockaddr[0]}:{port}: {exc.strerror or exc}"
    return "grpc could not bind it (its log line above says why)"
