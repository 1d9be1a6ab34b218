"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService`` beside ``stadapter.v1``.

Every served task is a model; its version is the task version. ``ModelInfer``
takes one input, ``CLIP`` (BYTES, shape ``[N]``, one encoded video file per
element) and optional request parameters (``top_k`` and the sampling overrides:
``num_frames``, ``mode``, ``stride``, ``temporal_views``, ``spatial_views``,
``autorotate``, ``seek``), and answers ``LABELS`` (BYTES ``[N, k]``) and ``SCORES``
(FP32 ``[N, k]``), best first, in raw form as Triton does. The repository
extension maps to the task registry behind the admin token: index lists the served
tasks, load re-reads the repository and succeeds when the task is served, unload
unregisters the task (its files are removed, as ``UnregisterTask`` does).

The protocol's stubs are tritonclient's (``tritonclient.grpc.service_pb2``; Triton's
service is KServe's plus extensions), so tritonclient and perf_analyzer talk to it
as to Triton. The same tokens, limits, admission, metrics (``method`` label) and
error mapping as the native API apply, through :func:`server.service.rpc`.
"""

from __future__ import annotations

import asyncio
import json
import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from stadapter_api.wire import OIP_CLIP_INPUT, OIP_LABELS_OUTPUT, OIP_SCORES_OUTPUT

from .admission import Ticket
from .errors import BadRequest, TaskNotFound
from .oip_tensors import ParamSpec, element_count, fp32_bytes, join_bytes_elements, read_parameters, split_bytes_elements
from .pipeline import Classification
from .registry import TaskVersion
from .service import _Base, _deadline, _task_label, rpc

OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
SERVER_NAME = "stadapter"
PLATFORM = "stadapter"
OUTPUTS = (OIP_LABELS_OUTPUT, OIP_SCORES_OUTPUT)
PARAMETERS = (
    ParamSpec("top_k", "int64_param"),
    ParamSpec("num_frames", "int64_param"),
    ParamSpec("mode", "string_param"),
    ParamSpec("stride", "int64_param"),
    ParamSpec("temporal_views", "int64_param"),
    ParamSpec("spatial_views", "int64_param"),
    ParamSpec("autorotate", "bool_param"),
    ParamSpec("seek", "string_param"),
)


def _server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stadapter-serve")
    except PackageNotFoundError:
        return "0"


class InferenceService(_Base, oip_grpc.GRPCInferenceServiceServicer):
    """KServe v2 over gRPC on the task registry and the same pipeline as ``stadapter.v1``."""

    # --- health: public and outside admission, so probes answer while the server drains ---

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=not self.pipeline.admission.draining)

    async def ModelReady(self, request: oip.ModelReadyRequest, context) -> oip.ModelReadyResponse:
        tv = self.registry.tasks.get(request.name)
        ready = (tv is not None and not self.pipeline.admission.draining
                 and request.version in ("", str(tv.version)))
        return oip.ModelReadyResponse(ready=ready)

    # --- metadata ---

    @rpc("ServerMetadata", "public")
    async def ServerMetadata(self, request, context, ticket: Ticket) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(),
                                          extensions=["model_repository", "model_configuration"])

    @rpc("ModelMetadata", "classify")
    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context, ticket: Ticket):
        tv = self._model(request.name, request.version)
        T = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=tv.name, versions=[str(tv.version)], platform=PLATFORM,
            inputs=[T(name=OIP_CLIP_INPUT, datatype="BYTES", shape=[-1])],
            outputs=[T(name=OIP_LABELS_OUTPUT, datatype="BYTES", shape=[-1, -1]),
                     T(name=OIP_SCORES_OUTPUT, datatype="FP32", shape=[-1, -1])],
        )

    @rpc("ModelConfig", "classify")
    async def ModelConfig(self, request: oip.ModelConfigRequest, context, ticket: Ticket):
        tv = self._model(request.name, request.version)
        s = tv.spec
        cfg = mc.ModelConfig(
            name=tv.name, platform=PLATFORM, max_batch_size=0,
            input=[mc.ModelInput(name=OIP_CLIP_INPUT, data_type=mc.TYPE_STRING, dims=[-1])],
            output=[mc.ModelOutput(name=OIP_LABELS_OUTPUT, data_type=mc.TYPE_STRING, dims=[-1, -1]),
                    mc.ModelOutput(name=OIP_SCORES_OUTPUT, data_type=mc.TYPE_FP32, dims=[-1, -1])],
        )
        cfg.version_policy.specific.versions.append(tv.version)
        for key, value in (("labels", json.dumps(list(s.labels))), ("sampling", json.dumps(s.sampling.to_dict())),
                           ("description", s.description)):
            cfg.parameters[key].string_value = value
        return oip.ModelConfigResponse(config=cfg)

    # --- inference ---

    @rpc("ModelInfer", "classify")
    async def ModelInfer(self, request: oip.ModelInferRequest, context, ticket: Ticket) -> oip.ModelInferResponse:
        _task_label.set(request.model_name)
        tv = self._model(request.model_name, request.model_version)
        params = read_parameters(request.parameters, PARAMETERS)
        top_k = params.pop("top_k", 0)
        assert isinstance(top_k, int)  # read_parameters took it from int64_param
        if top_k < 0:
            raise BadRequest(f"request parameter top_k must be >= 0, got {top_k}")
        wanted = self._requested_outputs(request)
        clips = self._clips(request)
        ticket.hold(sum(len(c) for c in clips))
        deadline = _deadline(context)
        results = await asyncio.gather(
            *(self.pipeline.classify(ticket, tv.name, clip, top_k, params, deadline) for clip in clips),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return self._answer(request, tv, [r for r in results if isinstance(r, Classification)], wanted)

    def _model(self, name: str, version: str) -> TaskVersion:
        tv = self.registry.get(name)  # TaskNotFound: NOT_FOUND, naming the served tasks
        if version not in ("", str(tv.version)):
            raise TaskNotFound(f"model {name!r} is served at version {tv.version}; version {version[:32]!r} is not")
        return tv

    def _requested_outputs(self, request: oip.ModelInferRequest) -> tuple[str, ...]:
        names = tuple(o.name for o in request.outputs) or OUTPUTS
        unknown = sorted(set(names) - set(OUTPUTS))
        if unknown:
            raise BadRequest(f"unknown output(s) {[n[:64] for n in unknown]}; the outputs are {list(OUTPUTS)}")
        return names

    def _clips(self, request: oip.ModelInferRequest) -> list[bytes]:
        if len(request.inputs) != 1 or request.inputs[0].name != OIP_CLIP_INPUT:
            got = [i.name[:64] for i in request.inputs]
            raise BadRequest(f"the model takes one input, {OIP_CLIP_INPUT!r} (BYTES [N], one encoded clip per "
                             f"element); got inputs {got}")
        t = request.inputs[0]
        if t.datatype != "BYTES":
            raise BadRequest(f"input {OIP_CLIP_INPUT!r} must be BYTES, got {t.datatype[:32]!r}")
        n = element_count(t.shape)
        if n is None or n == 0:
            raise BadRequest(f"input {OIP_CLIP_INPUT!r} must have shape [N] with N >= 1 clips, got {list(t.shape)}")
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise BadRequest(f"raw_input_contents holds {len(request.raw_input_contents)} buffers for 1 input")
            clips = split_bytes_elements(request.raw_input_contents[0], n)
        else:
            clips = list(t.contents.bytes_contents)
            if len(clips) != n:
                raise BadRequest(f"input {OIP_CLIP_INPUT!r} has shape [{n}] but holds {len(clips)} clip(s)")
        for i, clip in enumerate(clips):
            if len(clip) > self.limits.max_clip_bytes:
                raise BadRequest(f"clip {i} is {len(clip)} bytes, above the server's --max-clip-bytes of "
                                 f"{self.limits.max_clip_bytes}")
        return clips

    @staticmethod
    def _answer(request: oip.ModelInferRequest, tv: TaskVersion, results: list[Classification],
                wanted: tuple[str, ...]) -> oip.ModelInferResponse:
        k = min(len(r.top) for r in results)
        labels = tv.spec.labels
        tensors = {
            OIP_LABELS_OUTPUT: ("BYTES", join_bytes_elements([labels[i].encode() for r in results for i, _ in r.top[:k]])),
            OIP_SCORES_OUTPUT: ("FP32", fp32_bytes([p for r in results for _, p in r.top[:k]])),
        }
        resp = oip.ModelInferResponse(model_name=tv.name, model_version=str(tv.version), id=request.id)
        for name in wanted:
            datatype, raw = tensors[name]
            resp.outputs.add(name=name, datatype=datatype, shape=[len(results), k])
            resp.raw_output_contents.append(raw)
        return resp

    # --- repository extension (admin token) ---

    @rpc("RepositoryIndex", "admin")
    async def RepositoryIndex(self, request, context, ticket: Ticket) -> oip.RepositoryIndexResponse:
        M = oip.RepositoryIndexResponse.ModelIndex
        return oip.RepositoryIndexResponse(models=[M(name=name, version=str(tv.version), state="READY")
                                                   for name, tv in sorted(self.registry.tasks.items())])

    @rpc("RepositoryModelLoad", "admin")
    async def RepositoryModelLoad(self, request: oip.RepositoryModelLoadRequest, context, ticket: Ticket):
        _task_label.set(request.model_name)
        await asyncio.to_thread(self.registry.sync)  # picks up a task copied into the repository
        self.registry.get(request.model_name)  # NOT_FOUND when it is not there (or does not load)
        return oip.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload", "admin")
    async def RepositoryModelUnload(self, request: oip.RepositoryModelUnloadRequest, context, ticket: Ticket):
        _task_label.set(request.model_name)
        if not request.model_name:
            raise BadRequest("the request names no model")
        await asyncio.to_thread(self.registry.unregister, request.model_name)
        self.metrics.unregistrations.labels("ok").inc()
        return oip.RepositoryModelUnloadResponse()


def add_to_server(service: InferenceService, server: grpc.aio.Server) -> None:
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)


__all__ = ["InferenceService", "add_to_server"]
