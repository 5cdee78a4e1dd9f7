"""Executing a prepared run: the allocator policy a plan needs."""

from __future__ import annotations

import pytest
import torch

from linfusion.app import execute as app_execute
from linfusion.app.execute import KEPT_MEMORY_FACTOR, returns_freed_memory


def test_freed_memory_is_returned_only_for_tight_cpu_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps freed memory for speed; a CPU plan without room for the heap that keeping builds up
    (``KEPT_MEMORY_FACTOR`` x its activations) runs with freed memory returned, so its resident peak follows the
    plan. GPU plans, and processes that never kept freed memory, are left alone. The factor is larger for
    stages with savers, whose long-lived tensors fragment the heap more."""
    from types import SimpleNamespace

    from linfusion.planner import Savers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def plan(peak: int, budget: int, savers: Savers) -> SimpleNamespace:
        stage = SimpleNamespace(peak=peak, weights=10, savers=savers)
        return SimpleNamespace(budget=budget, stages=[stage])

    chunked = Savers(feed_forward_chunk=4096)
    plain_room = 10 + int(90 * KEPT_MEMORY_FACTOR["no savers"])
    saver_room = 10 + int(90 * KEPT_MEMORY_FACTOR["savers"])
    monkeypatch.setattr(app_execute, "keeps_freed_memory", lambda: True)
    assert not returns_freed_memory(plan(100, plain_room, Savers()), cpu)
    assert returns_freed_memory(plan(100, plain_room - 1, Savers()), cpu)
    assert returns_freed_memory(plan(100, plain_room, chunked), cpu)  # savers fragment more
    assert not returns_freed_memory(plan(100, saver_room, chunked), cpu)
    assert not returns_freed_memory(plan(100, 100, chunked), cuda)
    assert not returns_freed_memory(None, cpu)
    monkeypatch.setattr(app_execute, "keeps_freed_memory", lambda: False)
    assert not returns_freed_memory(plan(100, 100, chunked), cpu)
