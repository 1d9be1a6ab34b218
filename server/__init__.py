"""The gRPC inference server: one frozen trunk, many task adapters, mixed-task dynamic batching.

``python -m server --model-repository DIR`` (every flag: ``--help``, or docs/reference/flags.md).

Rooms, one job each (every room's ``__init__`` says its job in one sentence):

- top level: ``config`` (ServerConfig + flags), ``app`` (assembly, ready line, SIGTERM drain), ``errors``
  (exceptions and their status codes), ``limits`` (what one request may cost), ``malloc_tuning``,
  ``process`` (the server as a child process, for the demo, benches and tests), ``demo`` (``make demo``),
  ``reference`` (docs/reference/ flags.md and metrics.md, from the parser and the metrics registry);
- ``dataplane/``: the protocol-neutral core: the one request scope and the operations every frontend calls;
- ``engine/``: admission, pipeline (bytes to top-k), batcher, model (the batched forward on the model
  thread), slots (the device slot bank of adapters, LRU), response_cache, window_flow;
- ``decode/``: the decoder pool and its torch-free worker processes, frames in shared memory;
- ``registry/``: task versions on disk, register/unregister, polling, per-name locks and marks;
- ``frontends/``: codecs of stadapter.v1 gRPC, OIP gRPC and REST and the plain HTTP upload, and auth;
- ``observability/``: Prometheus metrics, logs, the access log.
"""

from typing import Any

__all__ = ["ServerConfig"]


def __getattr__(name: str) -> Any:  # PEP 562: `import server.demo` / `server.process` stay free of torch
    if name == "ServerConfig":
        from server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'server' has no attribute {name!r}")
