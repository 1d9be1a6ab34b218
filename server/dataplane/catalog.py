"""What a server serves, told the same way to every frontend: its tasks (``stadapter.v1``'s list and describe),
each task as a model (OIP's metadata, config and readiness), and the model repository (index, load, unload) with
unregistering, counted in ``stadapter_unregistrations_total`` here and only here.

Each served version's residency is the nearest tier its weights are in: ``device`` (an adapter slot,
``server.engine.slots``), ``host`` (the host tier, ``server.registry.host_tier``) or ``disk`` (known from the
repository scan, weights not read: its next request reads them).

Every served task is a model with one input ``CLIP`` (BYTES ``[N]``, one encoded clip per element) and two
outputs, ``LABELS`` (BYTES ``[N, k]``) and ``SCORES`` (FP32 ``[N, k]``); its version is the task version.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Optional

from server.engine.pipeline import Pipeline
from server.errors import BadRequest, TaskNotFound
from server.observability.metrics import Metrics
from server.registry.registry import TaskRegistry, TaskVersion
from stadapter.config import brief
from stadapter_api.wire import OIP_CLIP_INPUT, OIP_LABELS_OUTPUT, OIP_SCORES_OUTPUT

log = logging.getLogger("server.dataplane")

SERVER_NAME = "stadapter"
PLATFORM = "stadapter"
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, datatype, shape) of each tensor
INPUT_SIGNATURE: Signature = ((OIP_CLIP_INPUT, "BYTES", (-1,)),)
OUTPUT_SIGNATURE: Signature = ((OIP_LABELS_OUTPUT, "BYTES", (-1, -1)), (OIP_SCORES_OUTPUT, "FP32", (-1, -1)))


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stadapter-serve")
    except PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class ModelMetadata:
    """One served version of a task as a model: what OIP's model metadata says."""

    name: str
    versions: tuple[str, ...]
    platform: str = PLATFORM
    inputs: Signature = INPUT_SIGNATURE
    outputs: Signature = OUTPUT_SIGNATURE


@dataclass(frozen=True)
class ModelConfig:
    """One served version of a task as a model: what OIP's model config says (``parameters``: string values)."""

    name: str
    version: int
    parameters: dict[str, str]
    platform: str = PLATFORM
    inputs: Signature = INPUT_SIGNATURE
    outputs: Signature = OUTPUT_SIGNATURE


DEVICE, HOST, DISK = "device", "host", "disk"  # the residencies, nearest tier first


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    state: str = "READY"
    residency: str = DISK


class Catalog:
    """The catalog operations of :class:`server.dataplane.plane.DataPlane`."""

    pipeline: Pipeline
    registry: TaskRegistry
    metrics: Metrics

    # --- tasks (stadapter.v1) ---

    def tasks(self) -> list[TaskVersion]:
        """The served tasks, by name."""
        return [tv for _, tv in sorted(self.registry.tasks.items())]

    def task(self, name: str) -> TaskVersion:
        return self.registry.get(name)  # NOT_FOUND, naming the served tasks

    def servable_versions(self, name: str) -> list[int]:
        return self.registry.servable_versions(name)

    def residency(self, tv: TaskVersion) -> str:
        """The nearest tier ``tv``'s weights are in now: :data:`DEVICE`, :data:`HOST` or :data:`DISK` (a slot keeps
        its copy after the host tier let the version go: it is ``device`` then)."""
        if self.pipeline.batcher.runner.slots.is_resident(tv):
            return DEVICE
        return HOST if tv.stack is not None else DISK

    # --- readiness ---

    def server_ready(self) -> bool:
        return not self.pipeline.admission.draining

    def model_ready(self, name: str, version: str) -> bool:
        """Served (at ``version``, when one is named) and the server not draining."""
        tv = self.registry.tasks.get(name)
        servable = version == "" or (version.isdigit() and int(version) in self.registry.servable_versions(name))
        return tv is not None and self.server_ready() and servable

    # --- models (OIP) ---

    async def model(self, name: str, version: str) -> TaskVersion:
        """Task ``name`` at ``version`` (empty: the served one; else a servable version, as ``name@N`` pins it,
        its first load off the event loop); NOT_FOUND for an unknown task or a version that is not servable."""
        if version:
            await self.registry.preload(f"{name}@{version}")
        tv = self.registry.get(name)  # TaskNotFound: NOT_FOUND, naming the served tasks (``name@N``: that version)
        if version in ("", str(tv.version)):
            return tv
        try:
            return self.registry.get(f"{tv.name}@{version}")  # the registry's pin: it decides what is servable
        except (TaskNotFound, BadRequest) as e:  # a malformed version names no model: NOT_FOUND, as in the protocol
            raise TaskNotFound(f"model {tv.name!r} is served at version {tv.version}; version {brief(version)} is "
                               f"not servable (servable versions: {self.registry.servable_versions(tv.name)})") from e

    async def model_metadata(self, name: str, version: str) -> ModelMetadata:
        tv = await self.model(name, version)
        return ModelMetadata(tv.name, (str(tv.version),))

    async def model_config(self, name: str, version: str) -> ModelConfig:
        tv = await self.model(name, version)
        s = tv.spec
        return ModelConfig(tv.name, tv.version, {"labels": json.dumps(list(s.labels)),
                                                 "sampling": json.dumps(s.sampling.to_dict()),
                                                 "description": s.description})

    # --- the model repository (admin) ---

    def repository_index(self) -> list[RepositoryEntry]:
        """Every served task with its served version and that version's residency."""
        return [RepositoryEntry(name, str(tv.version), residency=self.residency(tv))
                for name, tv in sorted(self.registry.tasks.items())]

    async def repository_load(self, name: str) -> TaskVersion:
        """Re-read the repository (a task copied in is picked up); the task (or ``task@N``) when it is served."""
        await asyncio.to_thread(self.registry.sync)
        return self.registry.get(name)  # NOT_FOUND when it is not there (or does not load)

    async def unregister(self, name: str, via: Optional[str] = None) -> tuple[str, int]:
        """Unregister task ``name`` (every version; ``task@N``: that one): its files go. Returns the task's name
        and the version that was served (or removed); counted by result. ``via``: the log line's note."""
        try:
            task, version = await asyncio.to_thread(self.registry.unregister, name)
        except TaskNotFound:
            self.metrics.unregistrations.labels("not_found").inc()
            raise
        self.metrics.unregistrations.labels("ok").inc()
        log.info("unregistered %s %s version %d%s", "one version of task" if "@" in name else "task", task, version,
                 f" ({via})" if via else "")
        return task, version
