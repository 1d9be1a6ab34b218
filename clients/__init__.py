"""Python SDK, CLI, load generator, Triton client and demo for the ST-Adapter video inference server.

The SDK needs only grpcio, protobuf and the generated ``stadapter_api`` stubs (no torch)::

    from clients import Client
    with Client("127.0.0.1:50051", token=None) as c:
        result = c.classify("clip.mp4", task="motion", top_k=3)
        print(result.top.label, result.top.score)

``clients.AsyncClient`` has the same methods for asyncio. Failures raise
:class:`ClientError` (``.code`` is the ``grpc.StatusCode``, ``.message`` the server's text).
"""

from .aio import AsyncClient
from .core import (
    DEFAULT_ADDRESS,
    ClassifyResult,
    ClientError,
    ClientOptions,
    Prediction,
    RetryPolicy,
    TaskInfo,
    TaskList,
    WindowResult,
)
from .live_remux import LiveURL
from .sync import Client

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ClientOptions",
    "ClassifyResult",
    "DEFAULT_ADDRESS",
    "LiveURL",
    "Prediction",
    "RetryPolicy",
    "TaskInfo",
    "TaskList",
    "WindowResult",
]
