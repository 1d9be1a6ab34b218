"""Shared by the video tests: counting the budget's calls, to see how much work came before a refusal."""

from __future__ import annotations

from typing import Callable

import pytest

from stadapter.video.limits import Budget


@pytest.fixture()
def budget_calls(monkeypatch) -> Callable[[str], list[int]]:
    """``budget_calls("frame")`` (or ``"packet"``): a list that grows by one at each call of that Budget method."""

    def watch(name: str) -> list[int]:
        calls: list[int] = []
        real = getattr(Budget, name)

        def counting(self, *args):
            calls.append(1)
            return real(self, *args)

        monkeypatch.setattr(Budget, name, counting)
        return calls

    return watch
