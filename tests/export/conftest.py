"""Export tests see no TensorRT on the machine, so what they print does not depend on where they run."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_local_tensorrt(monkeypatch):
    import export.tensorrt as trt

    monkeypatch.setattr(trt, "installed_tensorrt_version", lambda *a, **k: None)
