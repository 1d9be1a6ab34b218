"""RegisterTask's work, whatever carries the upload: its chunks written to a fresh upload folder (names and sizes
bounded), the bundle validated and published by the registry, the folder removed whatever happens, and the
result counted in ``stadapter_registrations_total``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import threading
from pathlib import Path
from typing import IO, AsyncIterator, Callable, Optional, Protocol

from server.dataplane.scope import Call
from server.errors import BadRequest, status_for
from server.limits import ServerLimits
from server.observability.metrics import Metrics
from server.registry.registry import UPLOAD_FILES, TaskRegistry, TaskVersion
from stadapter.bundle import ADAPTER_FILE, TASK_FILE
from stadapter.config import brief

log = logging.getLogger("server.dataplane")

_UPLOAD_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class UploadChunk(Protocol):
    """One piece of an upload (``stadapter.v1.RegisterTaskChunk``): a file's bytes, and the upload's id."""

    upload_id: str
    filename: str
    data: bytes


Chunks = Callable[[Callable[[], int]], AsyncIterator[UploadChunk]]  # given "bytes received so far", the chunks


class Registration:
    """The registration operation of :class:`server.dataplane.plane.DataPlane`."""

    registry: TaskRegistry
    metrics: Metrics

    @property
    def limits(self) -> ServerLimits:  # pragma: no cover - DataPlane's
        raise NotImplementedError

    async def register(self, call: Call, chunks: Chunks) -> TaskVersion:
        """Register the bundle the chunks carry; returns the version published (a retry with the same upload id
        gets the same one). A client that hangs up mid-upload (or after its last chunk) is counted with the code
        it saw; the upload folder goes in every case."""
        upload = self.registry.upload_path()
        owner = _UploadOwner()
        try:
            await asyncio.to_thread(upload.mkdir)  # a cancellation during it still reaches the finally below
            upload_id = await self._receive(chunks, upload)
            tv = await asyncio.to_thread(self._register_owned, upload, owner, upload_id)
        except BaseException as e:  # CancelledError too
            ended = call.wire.ended(e)
            code = ended if ended is not None else status_for(e)[0]
            self.metrics.registrations.labels(code.name.lower()).inc()
            raise
        finally:
            if owner.claim("cleanup"):  # shielded: a second cancellation cannot stop the removal
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, upload, ignore_errors=True))
        call.task = tv.name
        self.metrics.registrations.labels("ok").inc()
        log.info("registered task %s version %d", tv.name, tv.version)
        return tv

    def _register_owned(self, upload: Path, owner: "_UploadOwner", upload_id: str) -> TaskVersion:
        """register_upload consumes the folder; it publishes only if the cleanup has not taken it by then (the
        claim is made right before the publishing rename: a call cancelled while its bundle is validated, or
        before this job's thread starts, publishes nothing)."""
        return self.registry.register_upload(upload, upload_id=upload_id, claim=lambda: owner.claim("register"))

    async def _receive(self, chunks: Chunks, upload: Path) -> str:
        """Write the upload's files; returns its upload id (from the first chunk, "" when the client sent none)."""
        bundle = self.limits.bundle
        limits = {TASK_FILE: bundle.max_json_bytes, ADAPTER_FILE: bundle.max_tensor_bytes}
        sizes = {name: 0 for name in UPLOAD_FILES}
        handles: dict[str, IO[bytes]] = {}
        upload_id: Optional[str] = None
        try:
            async for chunk in chunks(lambda: sum(sizes.values())):
                if upload_id is None:
                    upload_id = _check_upload_id(chunk.upload_id)
                elif chunk.upload_id and chunk.upload_id != upload_id:
                    raise BadRequest(f"chunk with upload id {brief(chunk.upload_id)} inside upload "
                                     f"{brief(upload_id)}; the first chunk names the upload")
                name = chunk.filename
                if name not in sizes:
                    raise BadRequest(f"unexpected file {brief(name)} in the upload; a bundle is {TASK_FILE} + {ADAPTER_FILE}")
                data = chunk.data  # a copy out of the message: taken once
                sizes[name] += len(data)
                if sizes[name] > limits[name]:
                    raise BadRequest(f"{name} exceeds the limit of {limits[name]} bytes")
                if name not in handles:
                    handles[name] = open(upload / name, "wb")
                await asyncio.to_thread(handles[name].write, data)
        finally:
            for h in handles.values():
                h.close()
        missing = [n for n in UPLOAD_FILES if n not in handles]
        if missing:
            raise BadRequest(f"the upload lacks {missing}; a bundle is {TASK_FILE} + {ADAPTER_FILE}")
        return upload_id or ""


class _UploadOwner:
    """Exactly one party takes an upload folder: registration (in its thread) or the cleanup."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[str] = None

    def claim(self, who: str) -> bool:
        with self._lock:
            if self._owner is None:
                self._owner = who
            return self._owner == who


def _check_upload_id(upload_id: str) -> str:
    if upload_id and not _UPLOAD_ID.fullmatch(upload_id):
        raise BadRequest(f"upload id {brief(upload_id)} is not 1-128 characters of A-Z a-z 0-9 . _ : -")
    return upload_id
