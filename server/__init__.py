"""The gRPC inference server: one frozen trunk, many task adapters, mixed-task dynamic batching.

``python -m server --model-repository DIR`` (see :mod:`server.config` for every flag).

Modules, one job each: ``config`` (ServerConfig + flags), ``app`` (assembly, ready line,
SIGTERM drain), ``service`` (gRPC servicers, the one error-to-status wrapper), ``pipeline``
(admission, decode pool, top-k), ``batcher`` (dynamic batching), ``model`` (the batched
forward on the model thread), ``registry`` (task versions on disk, register/unregister,
polling), ``slots`` (the device slot bank of adapters, LRU), ``metrics`` (Prometheus), ``auth`` (tokens),
``errors`` (exceptions and their status codes), ``process`` (the server as a child process, for the
demo, benches and tests), ``demo`` (``make demo``).
"""

from typing import Any

__all__ = ["ServerConfig"]


def __getattr__(name: str) -> Any:  # PEP 562: `import server.demo` / `server.process` stay free of torch
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'server' has no attribute {name!r}")
