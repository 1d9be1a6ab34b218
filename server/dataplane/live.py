"""The live operation of the data plane: a stream's windows answered as they come, counted in the metrics.

Protocol-neutral (``server.engine.live_flow`` does the work); a frontend encodes each :class:`LiveAnswer`.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncGenerator, AsyncIterator

from server.dataplane.scope import Call
from server.decode.live_streams import LiveDecoders
from server.engine.live_flow import LiveAnswer, LiveRequest, classify_live
from server.engine.pipeline import Pipeline
from server.observability.metrics import Metrics


class Live:
    """The live operation of :class:`server.dataplane.plane.DataPlane`."""

    pipeline: Pipeline
    metrics: Metrics
    live: LiveDecoders

    async def classify_live(self, call: Call, req: LiveRequest,
                            chunks: AsyncIterator[bytes]) -> AsyncGenerator[LiveAnswer, None]:
        """The stream's windows in time order; each window's lag (its last frame's chunk received to its answer
        taken by the frontend, i.e. sent) goes into ``stadapter_live_lag_seconds``."""
        answers = classify_live(self.pipeline, self.live, call.ticket, req, chunks)
        async with contextlib.aclosing(answers):
            async for a in answers:
                yield a
                self.metrics.live_windows.inc()
                self.metrics.live_lag_seconds.observe(max(0.0, (time.time_ns() - a.received_ns) / 1e9))
