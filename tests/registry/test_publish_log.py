"""What the registry logs when it publishes versions: a line each for a few, one line for a large batch (a first scan
of thousands of task folders would otherwise write thousands of lines before the server is ready)."""

from __future__ import annotations

import logging

from factories import make_bundle

from server.registry import version as version_module
from server.registry.registry import TaskRegistry

LOGGER = "server.registry.registry"


def lines(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_a_large_publish_is_one_info_line_and_each_version_is_named_at_debug(two_task_repo, tiny_trunk, caplog,
                                                                              monkeypatch):
    monkeypatch.setattr(version_module, "PUBLISHED_LINES_MAX", 1)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    total = sum(tv.nbytes for tv in reg.tasks.values())
    assert lines(caplog, logging.INFO) == [f"serving 2 task versions ({total} adapter bytes in all; each named at DEBUG)"]
    assert sorted(lines(caplog, logging.DEBUG)) == [f"serving task {n} version 1 ({reg.tasks[n].nbytes} adapter bytes)"
                                                    for n in ("alpha", "beta")]
    caplog.clear()
    make_bundle(tiny_trunk, two_task_repo / "tasks" / "gamma" / "1", name="gamma", seed=3)
    reg.sync()  # one new version: its own INFO line, as before
    assert lines(caplog, logging.INFO) == [f"serving task gamma version 1 ({reg.tasks['gamma'].nbytes} adapter bytes)"]
