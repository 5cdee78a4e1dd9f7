"""The patch protocol's primitives: exact undo of attributes and submodules, order checks, handles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linfusion.patches import Patch, PatchOrderError, hooks, replace_submodule, set_attribute


def test_set_attribute_restores_an_absent_attribute_by_deleting_it() -> None:
    module = nn.Linear(2, 2)
    x = torch.randn(3, 2)
    expected = module(x)
    with set_attribute(module, "forward", lambda x: x * 0):
        assert torch.equal(module(x), x * 0)
    assert "forward" not in module.__dict__  # the class method shows through again
    assert torch.equal(module(x), expected)


def test_set_attribute_restores_a_present_attribute() -> None:
    conv = nn.Conv2d(1, 1, 3, padding=1)
    patch = set_attribute(conv, "dilation", (2, 2))
    assert conv.dilation == (2, 2)
    patch.remove()
    assert conv.dilation == (1, 1)
    patch.remove()  # twice: harmless
    assert conv.dilation == (1, 1) and not patch.active


def test_removing_in_the_wrong_order_is_refused_and_changes_nothing() -> None:
    conv = nn.Conv2d(1, 1, 3, padding=1)
    outer = set_attribute(conv, "padding", (2, 2))
    inner = set_attribute(conv, "padding", (3, 3))
    with pytest.raises(PatchOrderError, match="remove the later patch first"):
        outer.remove()
    assert conv.padding == (3, 3) and outer.active
    inner.remove()
    assert conv.padding == (2, 2)
    outer.remove()
    assert conv.padding == (1, 1)


def test_replace_submodule_and_its_restore_hook() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    original = model[0]
    restored = []
    patch = replace_submodule(model, "0", nn.Identity(), on_restore=restored.append)
    assert isinstance(model[0], nn.Identity)
    patch.remove()
    assert model[0] is original and restored == [original]


def test_a_patch_groups_changes_and_undoes_them_in_reverse() -> None:
    events: list[str] = []
    group = Patch("group")
    group.on_remove(lambda: events.append("first registered"))
    group.on_remove(lambda: events.append("second registered"))
    assert group.changed
    with group:
        pass
    assert events == ["second registered", "first registered"]
    with pytest.raises(RuntimeError, match="removed"):
        group.on_remove(lambda: None)


def test_hooks_are_removed() -> None:
    module = nn.Linear(2, 2)
    calls = []
    with hooks("probe", [module.register_forward_hook(lambda *args: calls.append(1))]):
        module(torch.randn(1, 2))
    module(torch.randn(1, 2))
    assert calls == [1] and not module._forward_hooks
