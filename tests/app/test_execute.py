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


def test_a_failed_save_keeps_the_image_and_names_the_copy(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tempfile

    from PIL import Image

    from linfusion.app.execute import save_png_or_keep
    from linfusion.app.params import GenerationError, GenerationParams

    real_save = app_execute.save_png
    out = tmp_path / "full" / "x.png"
    out.parent.mkdir()

    def save(image, params, path):
        if path.parent == out.parent:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, params, path)

    monkeypatch.setattr(app_execute, "save_png", save)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "kept"))
    (tmp_path / "kept").mkdir()
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    params = GenerationParams("a cat", width=16, height=8)
    with pytest.raises(GenerationError, match="No space left on device.*the image is kept at") as raised:
        save_png_or_keep(image, params, out)
    (kept,) = (tmp_path / "kept").glob("linfusion-x-*.png")
    assert str(kept) in str(raised.value)
    with Image.open(kept) as saved:
        assert saved.getpixel((0, 0)) == (10, 20, 30) and "a cat" in saved.info["parameters"]

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(GenerationError, match="nor a copy in .*the image is lost"):
        save_png_or_keep(image, params, out)
