"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService`` beside ``stadapter.v1``.

Every served task is a model; its version is the task version. ``ModelInfer``
takes one input, ``CLIP`` (BYTES, shape ``[N]``, one encoded video file per
element) and optional request parameters (``top_k`` and the sampling overrides:
``num_frames``, ``mode``, ``stride``, ``temporal_views``, ``spatial_views``,
``autorotate``, ``seek``), and answers ``LABELS`` (BYTES ``[N, k]``) and ``SCORES``
(FP32 ``[N, k]``), best first, in raw form as Triton does. The repository
extension maps to the task registry behind the admin token: index lists the served
tasks (each entry's ``reason``, the one free-text field of Triton's ``ModelIndex``, says its residency,
``residency=device|host|disk``: the state stays ``READY`` whatever the tier), load re-reads the repository
and succeeds when the task is served, unload unregisters the task (its files are removed, as ``UnregisterTask``
does).

The protocol's stubs are tritonclient's (``tritonclient.grpc.service_pb2``; Triton's
service is KServe's plus extensions), so tritonclient and perf_analyzer talk to it
as to Triton. The same tokens, limits, admission, metrics (``method`` label) and
error mapping as the native API apply: the data plane's request scope, through :func:`server.frontends.grpc_helpers.rpc`.
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from server.dataplane.catalog import SERVER_NAME, server_version
from server.dataplane.scope import Call
from server.engine.pipeline import Classification
from server.errors import BadRequest
from server.frontends.grpc_helpers import Servicer, deadline_of, rpc
from server.frontends.oip_model import PARAMETERS, check_input, output_tensors, requested_outputs, split_top_k
from server.frontends.oip_tensors import read_parameters, split_bytes_elements
from server.registry.registry import TaskVersion

OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
_CONFIG_TYPES = {"BYTES": mc.TYPE_STRING, "FP32": mc.TYPE_FP32}
RESIDENCY_REASON = "residency="  # a repository index entry's reason: this and the residency (device, host, disk)


def residency_reason(residency: str) -> str:
    """A repository index entry's ``reason``: Triton's ``ModelIndex`` has no other field a residency fits."""
    return RESIDENCY_REASON + residency


class InferenceService(Servicer, oip_grpc.GRPCInferenceServiceServicer):
    """KServe v2 over gRPC: a codec on the data plane ``stadapter.v1`` serves too."""

    # --- health: public and outside admission, so probes answer while the server drains ---

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.plane.server_ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    # --- metadata ---

    @rpc("ServerMetadata", "public")
    async def ServerMetadata(self, request, context, call: Call) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=server_version(),
                                          extensions=["model_repository", "model_configuration"])

    @rpc("ModelMetadata", "classify", timed=True)
    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context, call: Call):
        m = await self.plane.model_metadata(request.name, request.version)
        T = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=m.name, versions=list(m.versions), platform=m.platform,
            inputs=[T(name=n, datatype=d, shape=list(s)) for n, d, s in m.inputs],
            outputs=[T(name=n, datatype=d, shape=list(s)) for n, d, s in m.outputs],
        )

    @rpc("ModelConfig", "classify", timed=True)
    async def ModelConfig(self, request: oip.ModelConfigRequest, context, call: Call):
        c = await self.plane.model_config(request.name, request.version)
        cfg = mc.ModelConfig(
            name=c.name, platform=c.platform, max_batch_size=0,
            input=[mc.ModelInput(name=n, data_type=_CONFIG_TYPES[d], dims=list(s)) for n, d, s in c.inputs],
            output=[mc.ModelOutput(name=n, data_type=_CONFIG_TYPES[d], dims=list(s)) for n, d, s in c.outputs],
        )
        cfg.version_policy.specific.versions.append(c.version)
        for key, value in c.parameters.items():
            cfg.parameters[key].string_value = value
        return oip.ModelConfigResponse(config=cfg)

    # --- inference ---

    @rpc("ModelInfer", "classify", timed=True)
    async def ModelInfer(self, request: oip.ModelInferRequest, context, call: Call) -> oip.ModelInferResponse:
        call.task = request.model_name
        tv = await self.plane.model(request.model_name, request.model_version)
        params = read_parameters(request.parameters, PARAMETERS)
        top_k = split_top_k(params)
        wanted = requested_outputs([o.name for o in request.outputs])
        clips = self._clips(request)
        call.ticket.hold(sum(len(c) for c in clips))
        results = await self.plane.classify_clips(call, tv, clips, top_k, params, deadline_of(context))
        return self._answer(request, tv, results, wanted)

    def _clips(self, request: oip.ModelInferRequest) -> list[bytes]:
        t = request.inputs[0] if request.inputs else None
        n = check_input([i.name for i in request.inputs], t.datatype if t else "", t.shape if t else ())
        assert t is not None
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise BadRequest(f"raw_input_contents holds {len(request.raw_input_contents)} buffers for 1 input")
            clips = split_bytes_elements(request.raw_input_contents[0], n)
        else:
            clips = list(t.contents.bytes_contents)
            if len(clips) != n:
                raise BadRequest(f"input {t.name!r} has shape [{n}] but holds {len(clips)} clip(s)")
        self.plane.check_clips(clips)
        return clips

    @staticmethod
    def _answer(request: oip.ModelInferRequest, tv: TaskVersion, results: list[Classification],
                wanted: tuple[str, ...]) -> oip.ModelInferResponse:
        tensors = output_tensors(tv, results)
        resp = oip.ModelInferResponse(model_name=tv.name, model_version=str(tv.version), id=request.id)
        for name in wanted:
            datatype, shape, raw = tensors[name]
            resp.outputs.add(name=name, datatype=datatype, shape=shape)
            resp.raw_output_contents.append(raw)
        return resp

    # --- repository extension (admin token) ---

    @rpc("RepositoryIndex", "admin")
    async def RepositoryIndex(self, request, context, call: Call) -> oip.RepositoryIndexResponse:
        M = oip.RepositoryIndexResponse.ModelIndex
        return oip.RepositoryIndexResponse(models=[M(name=e.name, version=e.version, state=e.state,
                                                     reason=residency_reason(e.residency))
                                                   for e in self.plane.repository_index()])

    @rpc("RepositoryModelLoad", "admin")
    async def RepositoryModelLoad(self, request: oip.RepositoryModelLoadRequest, context, call: Call):
        call.task = request.model_name
        await self.plane.repository_load(request.model_name)
        return oip.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload", "admin")
    async def RepositoryModelUnload(self, request: oip.RepositoryModelUnloadRequest, context, call: Call):
        call.task = request.model_name
        if not request.model_name:
            raise BadRequest("the request names no model")
        await self.plane.unregister(request.model_name, "OIP repository unload")
        return oip.RepositoryModelUnloadResponse()


def add_to_server(service: InferenceService, server: grpc.aio.Server) -> None:
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)


__all__ = ["InferenceService", "add_to_server"]
