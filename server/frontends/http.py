"""HTTP on ``--http-port`` (aiohttp, on the server's own event loop, beside gRPC): OIP v2 REST and a plain upload.

Routes:

- ``GET /v2/health/live`` (200 while the process serves), ``GET /v2/health/ready`` (200, or 503 while
  draining): public, outside admission, so Kubernetes probes answer during a drain.
- ``GET /v2`` (server metadata), ``GET /v2/models/{task}[/versions/{v}]`` (model metadata),
  ``.../ready``, ``.../config``, ``POST .../infer``: the Open Inference Protocol's REST form, with
  Triton's binary-data extension (``server.frontends.http_oip``), so ``tritonclient.http`` works as with Triton.
- ``POST /v2/repository/index``, ``POST /v2/repository/models/{task}/load``, ``.../unload``: OIP's repository
  extension on the task registry, behind the admin token, as over gRPC (``server.frontends.oip_grpc``).
- ``POST /v1/tasks/{task}:classify``: ``multipart/form-data`` with a ``clip`` file part
  (``curl -F clip=@video.mp4``) and optional fields ``top_k``, ``request_id`` and the sampling
  overrides (``num_frames``, ``mode``, ...; also as query parameters); answers JSON (labels, scores,
  task version, timings), as ``Classify`` over gRPC; ``/v1/tasks/a,b:classify`` classifies the clip for
  several tasks (one upload, one decode per distinct sampling) and answers one result or error per task.
- ``GET /v1/tasks/{task}:live`` (a WebSocket: a live stream's bytes in, one JSON message per window out),
  ``GET /v1/tasks`` (the served tasks) and ``GET /live`` (the page that streams a camera to the socket):
  ``server.frontends.http_live``.

Every endpoint but health goes through the data plane's request scope (:func:`server.frontends.http_common.endpoint`;
the live socket enters it after the upgrade): the same bearer tokens
(``Authorization`` header), admission ticket (drain, queue, in-flight clip bytes), error mapping
(:func:`server.errors.http_status_for`, body ``{"error": ...}``; aiohttp's own 404 and 405 too,
``server.frontends.http_errors``) and metrics
(``stadapter_requests_total{method="HTTP <name>"}``) as gRPC. Bodies are read in chunks: each chunk is
held on the ticket as it arrives, a declared size above the bound is refused before reading, and a
body that stops arriving for ``--stream-idle-timeout-s`` is ended.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, Awaitable, Optional

from aiohttp import BodyPartReader, web

from server.dataplane.catalog import SERVER_NAME, server_version
from server.dataplane.inference import Answer, ClassifyArgs, ItemError
from server.dataplane.plane import DataPlane
from server.dataplane.scope import Call
from server.engine.admission import Ticket
from server.engine.pipeline import Classification
from server.errors import HTTP_STATUS, BadRequest, StreamIdle
from server.frontends.http_common import classification_json, endpoint
from server.frontends.http_errors import error_response, json_errors
from server.frontends.http_form import MAX_FIELD_BYTES, MAX_FORM_PARTS, check_field_name, int_field, set_field, typed_field
from server.frontends.http_live import HttpLive
from server.frontends.http_oip import HEADER_LENGTH, clips_of, encode_response, header_length, parse_header
from server.frontends.oip_model import PARAMETERS, output_tensors, requested_outputs, split_top_k
from server.frontends.oip_tensors import read_json_parameters
from server.limits import ServerLimits
from server.observability.access_log import access_middleware, adopt_request_id
from stadapter.config import brief

CHUNK = 1 << 16
_JSON = "application/json"

class HttpService(HttpLive):
    """The handlers, on the data plane the gRPC services use."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    @property
    def limits(self) -> ServerLimits:
        return self.plane.limits

    def application(self) -> web.Application:
        # access lines and X-Request-Id around everything; aiohttp's own errors (404, 405) as JSON inside
        app = web.Application(middlewares=[access_middleware, json_errors])
        r = app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        for base in ("/v2/models/{task}", "/v2/models/{task}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.model_config)
            r.add_post(base + "/infer", self.infer)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{task}/load", self.repository_load)
        r.add_post("/v2/repository/models/{task}/unload", self.repository_unload)
        r.add_post("/v1/tasks/{task:[^/:]+}:classify", self.classify)  # {task}: a name, or names "a,b"
        self.add_live_routes(r)  # the live socket, the task list, the page (server.frontends.http_live)
        return app

    # --- health: public, outside admission ---

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.plane.server_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["task"], request.match_info.get("version", "")
        try:
            await self.plane.model(name, version)  # NOT_FOUND (404) for an unknown task or version
        except Exception as e:  # noqa: BLE001 - the error is the answer
            return error_response(e)[0]
        ready = self.plane.model_ready(name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    # --- metadata ---

    @endpoint("ServerMetadata", "public")
    async def server_metadata(self, request: web.Request, call: Call) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": server_version(),
                                  "extensions": ["model_repository", "model_configuration", "binary_tensor_data"]})

    @endpoint("ModelMetadata", "classify")
    async def model_metadata(self, request: web.Request, call: Call) -> web.Response:
        m = await self.plane.model_metadata(request.match_info["task"], request.match_info.get("version", ""))
        return web.json_response({
            "name": m.name, "versions": list(m.versions), "platform": m.platform,
            "inputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in m.inputs],
            "outputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in m.outputs],
        })

    @endpoint("ModelConfig", "classify")
    async def model_config(self, request: web.Request, call: Call) -> web.Response:
        c = await self.plane.model_config(request.match_info["task"], request.match_info.get("version", ""))
        types = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}
        return web.json_response({
            "name": c.name, "platform": c.platform, "max_batch_size": 0,
            "version_policy": {"specific": {"versions": [c.version]}},
            "input": [{"name": n, "data_type": types[d], "dims": list(sh)} for n, d, sh in c.inputs],
            "output": [{"name": n, "data_type": types[d], "dims": list(sh)} for n, d, sh in c.outputs],
            "parameters": {key: {"string_value": value} for key, value in c.parameters.items()},
        })

    # --- inference ---

    @endpoint("ModelInfer", "classify", timed=True)
    async def infer(self, request: web.Request, call: Call) -> web.Response:
        ticket = call.ticket
        tv = await self.plane.model(request.match_info["task"], request.match_info.get("version", ""))
        limit = self.limits.max_inflight_clip_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise BadRequest(f"the request body is {declared} bytes, above the server's --max-inflight-clip-bytes "
                             f"of {limit}; send fewer or smaller clips per call")
        json_len = header_length(request.headers.get(HEADER_LENGTH))
        body = await self._read(request, ticket, limit)
        if json_len is not None and json_len > len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {json_len} but the body has only {len(body)} bytes")
        header = parse_header(body[:json_len] if json_len is not None else body)
        params = read_json_parameters(header.parameters, PARAMETERS)
        top_k = split_top_k(params)
        wanted = requested_outputs([name for name, _ in header.outputs])
        clips = clips_of(header, memoryview(body)[json_len:] if json_len is not None else b"")
        del body  # the clips are copies; the ticket keeps holding the bytes until the request ends
        self.plane.check_clips(clips)
        results = await self.plane.classify_clips(call, tv, clips, top_k, params, None)
        payload, length = encode_response(tv.name, str(tv.version), header.id, header, wanted,
                                          output_tensors(tv, results))
        if length is None:
            return web.Response(body=payload, content_type=_JSON)
        return web.Response(body=payload, content_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    @endpoint("Classify", "classify", timed=True)
    async def classify(self, request: web.Request, call: Call) -> web.Response:
        ticket = call.ticket
        task = request.match_info["task"]
        if not request.content_type.startswith("multipart/form-data"):
            raise BadRequest(f"send the clip as multipart/form-data with a 'clip' file part (curl -F clip=@video.mp4 "
                             f"...); got Content-Type {brief(request.content_type)}")
        fields: dict[str, str] = {}
        for key, value in request.query.items():
            set_field(fields, key, value)
        clip: Optional[bytearray] = None
        reader = await request.multipart()
        for _ in range(MAX_FORM_PARTS + 1):
            part = await self._idle(reader.next(), 0)
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart parts are not accepted; send a flat form")
            if part.name == "clip":
                if clip is not None:
                    raise BadRequest("the form has more than one 'clip' part; one clip per request")
                clip = await self._read_part(part, ticket)
            else:
                check_field_name(part.name or "", is_file=part.filename is not None)  # before its bytes are read
                set_field(fields, part.name or "", await self._read_field(part))
        else:
            raise BadRequest(f"the form has more than {MAX_FORM_PARTS} parts")
        if clip is None:
            raise BadRequest("the form has no 'clip' part; send the video as a file field: curl -F clip=@video.mp4")
        top_k = int_field(fields.pop("top_k", "0"), "top_k")
        request_id = call.request_id(fields.pop("request_id", ""))
        adopt_request_id(request_id)  # a form field's id is the logged and echoed one, unless a header gave one
        overrides = {k: typed_field(k, v) for k, v in fields.items()}
        several = task.split(",") if "," in task else []  # /v1/tasks/a,b:classify: one upload, one result per task
        args = ClassifyArgs("" if several else task, several, clip, top_k, overrides, request_id)
        return web.json_response(answer_json(await self.plane.classify(call, args, None, "HTTP Classify")))

    # --- repository extension (admin token), as RepositoryIndex / RepositoryModelLoad / ...Unload over gRPC ---

    @endpoint("RepositoryIndex", "admin")
    async def repository_index(self, request: web.Request, call: Call) -> web.Response:
        """Every served task with its served version and that version's residency (``device``, ``host``, ``disk``):
        tritonclient.http's ``get_model_repository_index`` list, whose entries are dicts it does not check."""
        return web.json_response([{"name": e.name, "version": e.version, "state": e.state, "residency": e.residency}
                                  for e in self.plane.repository_index()])

    @endpoint("RepositoryModelLoad", "admin")
    async def repository_load(self, request: web.Request, call: Call) -> web.Response:
        """Re-read the repository (a task copied in is picked up); 200 when the task (or ``task@N``) is served."""
        tv = await self.plane.repository_load(request.match_info["task"])
        return web.json_response({"name": tv.name, "version": str(tv.version), "state": "READY"})

    @endpoint("RepositoryModelUnload", "admin")
    async def repository_unload(self, request: web.Request, call: Call) -> web.Response:
        """Unregister the task (every version; ``task@N``: that one), as ``UnregisterTask``: its files go."""
        name, version = await self.plane.unregister(request.match_info["task"], "HTTP repository unload")
        return web.json_response({"name": name, "version": str(version)})

    # --- reading bodies: bounded, held on the ticket, idle-limited ---

    async def _idle(self, aw: Awaitable, held: int):
        idle = self.limits.stream_idle_timeout_s
        try:
            return await asyncio.wait_for(aw, idle)
        except asyncio.TimeoutError:
            raise StreamIdle(f"the request body sent nothing for {idle:g} s (--stream-idle-timeout-s) after "
                             f"{held} bytes; it was ended and its bytes freed") from None
        except ValueError as e:  # aiohttp's multipart reader: a form without its closing boundary, a bad delimiter
            raise BadRequest(f"the multipart form is cut short or malformed (a form ends with its closing "
                             f"boundary line): {brief(str(e))}") from None

    async def _collect(self, read, ticket: Ticket, limit: int, too_big: str) -> bytearray:
        """Chunks from ``read()`` until it returns none, each held on the ticket; past ``limit`` bytes, ``too_big``."""
        buf = bytearray()
        while True:
            chunk = await self._idle(read(), len(buf))
            if not chunk:
                return buf
            if len(buf) + len(chunk) > limit:
                raise BadRequest(too_big)
            ticket.hold(len(chunk))
            buf += chunk

    async def _read(self, request: web.Request, ticket: Ticket, limit: int) -> bytearray:
        return await self._collect(request.content.readany, ticket, limit,
                                   f"the request body exceeds the server's --max-inflight-clip-bytes of {limit}")

    async def _read_part(self, part: BodyPartReader, ticket: Ticket) -> bytearray:
        limit = self.limits.max_clip_bytes
        return await self._collect(lambda: part.read_chunk(CHUNK), ticket, limit,
                                   f"the clip exceeds the server's --max-clip-bytes of {limit} bytes")

    async def _read_field(self, part: BodyPartReader) -> str:
        buf = bytearray()
        while True:
            chunk = await self._idle(part.read_chunk(CHUNK), len(buf))
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_FIELD_BYTES:
                raise BadRequest(f"form field {brief(part.name or '')} is longer than {MAX_FIELD_BYTES} bytes")
        try:
            return buf.decode()
        except UnicodeDecodeError:
            raise BadRequest(f"form field {brief(part.name or '')} is not UTF-8 text") from None


def _item_json(name: str, o: Classification | ItemError) -> dict[str, Any]:
    if isinstance(o, Classification):
        return classification_json(o, None)
    return {"task": name, "error": {"code": o.code.name, "status": HTTP_STATUS.get(o.code, 500), "message": o.message}}


def answer_json(a: Answer) -> dict[str, Any]:
    """A classify answer: one task's, or a several-task request's results, one per task, in order."""
    if a.one is not None:
        return classification_json(a.one, a.request_id)
    return {"request_id": a.request_id, "results": [_item_json(i.name, i.outcome) for i in a.items],
            "timings": {"decode_ms": a.decode_s * 1e3, "total_ms": a.total_s * 1e3, "decodes": a.decodes}}


class HttpServer:
    """The aiohttp runner and site of one server; :meth:`stop` after the drain."""

    def __init__(self, runner: web.AppRunner, port: int):
        self.runner = runner
        self.port = port

    @classmethod
    async def start(cls, service: HttpService, host: str, port: int, tls_cert: Optional[Path] = None,
                    tls_key: Optional[Path] = None) -> "HttpServer":
        ctx = None
        if tls_cert and tls_key:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(tls_cert), str(tls_key))
        runner = web.AppRunner(service.application(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ctx, reuse_port=False)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = runner.addresses[0][1]
        return cls(runner, int(bound))

    async def stop(self) -> None:
        await self.runner.cleanup()
