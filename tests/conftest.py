from __future__ import annotations

import pytest

from factories import make_trunk_dir
from stadapter import load_trunk


@pytest.fixture(scope="session")
def tiny_trunk_dir(tmp_path_factory):
    """A random, seeded tiny trunk folder (trunk.json + visual.safetensors)."""
    return make_trunk_dir(tmp_path_factory.mktemp("trunk") / "trunk")


@pytest.fixture(scope="session")
def tiny_trunk(tiny_trunk_dir):
    return load_trunk(tiny_trunk_dir)
