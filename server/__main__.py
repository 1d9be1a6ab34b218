"""``python -m server --model-repository DIR ...`` (console script ``stadapter-server``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from server.app import DecoderHook


def main(argv: Optional[Sequence[str]] = None, wrap_decoder: Optional["DecoderHook"] = None) -> int:
    """Serve until SIGTERM/SIGINT; ``wrap_decoder``: see :meth:`server.app.Server.start` (benches, tests)."""
    from server.config import parse_args  # here: a spawned decoder re-imports this module, and must not import torch

    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import serve
    from stadapter.config import ConfigError
    from stadapter.trunk import TrunkError

    try:
        code = asyncio.run(serve(cfg, wrap_decoder))
    except (TrunkError, ConfigError, ValueError, OSError) as e:
        logging.getLogger("server").error("cannot start: %s", e)
        return 2
    # Served and stopped: freeze what is left, so the interpreter's last garbage collection at exit does not walk
    # every object torch made (seconds of a stopped server's life, per replica and per test).
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
