"""The data plane: what every frontend serves, on the pipeline, registry, metrics and tokens of one server.

Frontends are codecs: they parse their protocol's request, enter :meth:`DataPlane.request` (the one request
scope, ``server.dataplane.scope``) and call the operations here, then encode the answer.
"""

from __future__ import annotations

from typing import AsyncContextManager, Optional

from server.dataplane.catalog import Catalog
from server.dataplane.inference import Inference
from server.dataplane.live import Live
from server.dataplane.registration import Registration
from server.dataplane.scope import Access, Call, Wire, request_scope
from server.decode.live_streams import LiveDecoders
from server.engine.pipeline import Pipeline
from server.frontends.auth import Auth
from server.limits import ServerLimits
from server.observability.metrics import Metrics
from server.registry.registry import TaskRegistry


class DataPlane(Catalog, Inference, Live, Registration):
    def __init__(self, pipeline: Pipeline, registry: TaskRegistry, metrics: Metrics, auth: Auth,
                 live: Optional[LiveDecoders] = None):
        self.pipeline = pipeline
        self.live = live if live is not None else LiveDecoders(pipeline.limits.live.max_streams)
        self.registry = registry
        self.metrics = metrics
        self.auth = auth

    @property
    def limits(self) -> ServerLimits:
        return self.pipeline.limits

    def request(self, wire: Wire, method: str, access: Access, timed: bool = False,
                task: str = "") -> AsyncContextManager[Call]:
        """The request scope (``server.dataplane.scope``) every frontend serves a request in."""
        return request_scope(self, wire, method, access, timed, task)

    def task_label(self, name: str) -> str:
        """The metrics' task label of ``name``: only served task names become label values (clients cannot blow
        up the series count), and only while at most ``--max-task-series`` tasks are served (``Metrics.task_label``);
        a pinned version counts under its task, anything else as ``_other``."""
        if not name:
            return ""
        name = name.partition("@")[0]
        return self.metrics.task_label(name) if name in self.registry.tasks else "_other"
