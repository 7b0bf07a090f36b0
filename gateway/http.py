"""The gateway's KServe v2 HTTP/REST endpoints (aiohttp).

    GET  /v2/health/live                            200 {"live": true}
    GET  /v2/health/ready                           200 {"ready": true}, or 400 {"ready": false, ...}
    GET  /v2                                        server metadata
    GET  /v2/models/{name}[/versions/{v}]           model metadata, 404 for another model
    GET  /v2/models/{name}[/versions/{v}]/ready     200 / 400 like server ready, 404 for another model
    POST /v2/models/{name}[/versions/{v}]/infer     inference (JSON, or JSON + binary tensor data)

Health answers follow the protocol: 200 means true, a 4xx status false. Every error is the v2
error object ``{"error": "..."}`` with its status (400 bad request, 404 unknown model or path,
405, 413 body over --max-body-bytes, 500, 503 busy or unavailable, 504 deadline exceeded).
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from . import kserve
from .kserve import KServeError

log = logging.getLogger("bertpool.gateway.http")

JSON = "application/json"


def _json(status: int, doc) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc).encode(), content_type=JSON)


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=kserve.error_json(message), content_type=JSON)


@web.middleware
async def _errors(request: web.Request, handler):
    """Every failure becomes a v2 error object; nothing a client sends escapes as a traceback."""
    try:
        return await handler(request)
    except KServeError as exc:
        return _error(exc.status, exc.message)
    except web.RequestPayloadError as exc:  # a body that cannot be read: bad gzip, a broken chunk
        return _error(400, f"cannot read the request body: {exc.__cause__ or exc}")
    except web.HTTPException as exc:  # unknown path 404, 405, body too large 413
        if exc.status < 400:
            raise
        detail = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        response = _error(exc.status, f"{exc.reason}: {detail}" if detail != exc.reason else exc.reason)
        if "Allow" in exc.headers:  # a 405 says which methods the path takes (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug: answer 500 and keep serving
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")


def _declared_oversize(request: web.Request, limit: int) -> web.Response | None:
    """The 413 for a Content-Length over ``limit``, answered at once (None when within it): aiohttp
    would first wait for (and read) up to ``limit`` bytes of a body it is going to refuse, holding
    the connection however long the client takes to send them, or forever if it never does. The
    connection closes after it: the unread body cannot be skipped."""
    if request.content_length is None or request.content_length <= limit:
        return None
    response = _error(413, f"request body of {request.content_length} bytes is over the {limit} bytes allowed "
                           "(--max-body-bytes)")
    response.force_close()
    return response


def build_app(gateway) -> web.Application:
    """The aiohttp application serving ``gateway`` (a gateway.gateway.Gateway)."""
    app = web.Application(client_max_size=gateway.config.max_body_bytes, middlewares=[_errors])

    async def live(request: web.Request) -> web.Response:
        return _json(200, {"live": True})

    async def ready(request: web.Request) -> web.Response:
        if await gateway.ready():
            return _json(200, {"ready": True})
        return _json(400, {"ready": False, "error": gateway.not_ready_why})

    async def server_metadata(request: web.Request) -> web.Response:
        return _json(200, gateway.server_metadata())

    def model_of(request: web.Request) -> None:
        gateway.model.check(request.match_info["model"], request.match_info.get("version"))

    async def model_metadata(request: web.Request) -> web.Response:
        model_of(request)
        return _json(200, gateway.model.metadata())

    async def model_ready(request: web.Request) -> web.Response:
        model_of(request)
        ok = await gateway.ready()
        doc = {"name": gateway.model.name, "ready": ok}
        return _json(200, doc) if ok else _json(400, {**doc, "error": gateway.not_ready_why})

    async def infer(request: web.Request) -> web.Response:
        model_of(request)
        refused = _declared_oversize(request, gateway.config.max_body_bytes)
        if refused is not None:
            return refused
        body = await request.read()
        decoded = kserve.decode_http(body, request.headers.get("Inference-Header-Content-Length"),
                                     gateway.limits)
        outputs = kserve.requested_outputs(decoded)
        probabilities = await gateway.infer(decoded)
        data, header_length = kserve.encode_http(gateway.model, decoded, probabilities, outputs)
        if header_length is None:
            return web.Response(status=200, body=data, content_type=JSON)
        return web.Response(status=200, body=data, content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(header_length)})

    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, model_metadata)
        app.router.add_get(base + "/ready", model_ready)
        app.router.add_post(base + "/infer", infer)
    return app


async def start_http(gateway, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Start serving on host:port (0: any free port); return the runner and the bound address."""
    # On stop, calls in flight get as long as their deadlines allow (aiohttp's own default is 60 s).
    runner = web.AppRunner(build_app(gateway), access_log=None, handle_signals=False,
                           shutdown_timeout=gateway.config.timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1] if runner.addresses else port
    return runner, f"{host}:{bound_port}"
