"""The shell the banded UNet and the banded DiT share, so that each family keeps only its own model.

- :class:`UnsupportedBanding`: the refusal both raise (each family subclasses it with its own name);
- :func:`check_eval_mode` and :func:`check_basic_block`: the checks both make of a model;
- :class:`BandedForward`: what a banded patch installs as the model's ``forward``: its band size, where
  its store lives, the host arena kept between calls, the refusal of gradients, diffusers' output;
- :func:`install_banded_forward`: that forward as a reversible patch (which also gives the arena back);
- :class:`BandedCost`: what one traced call costs, read from the accounts of its run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..banding import BandPasses, BandStore, HostArena
from .base import Patch, set_attribute

DEFAULT_BAND_BYTES = 256 * 2**20

CostT = TypeVar("CostT", bound="BandedCost")


class UnsupportedBanding(NotImplementedError):
    """The model (or the call) has something a banded forward cannot compute exactly (the message says
    what); each family raises its own subclass."""

    engine = "the banded forward"

    @classmethod
    def require(cls, condition: bool, where: str, what: str) -> None:
        """Raise this refusal naming ``where`` and ``what`` unless ``condition`` holds."""
        if not condition:
            raise cls(f"{cls.engine} does not support {where}: {what}")


def check_eval_mode(model: nn.Module, error: type[UnsupportedBanding], where: str, name: str) -> None:
    """Refuse active dropout, whose masks the bands would draw apart (``name``: what to call ``eval()`` on)."""
    dropping = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0]
    error.require(not dropping, where, f"active dropout (call {name}.eval())")


def check_basic_block(block: Any, where: str, norm_type: str, error: type[UnsupportedBanding]) -> None:
    """Refuse a transformer block other than diffusers' ``BasicTransformerBlock`` with ``norm_type``, a
    positional embedding of its own or a cross-only ``attn1``: the band passes compute only that block."""
    from diffusers.models.attention import BasicTransformerBlock

    error.require(type(block) is BasicTransformerBlock, where, f"a {type(block).__name__}")
    error.require(block.norm_type == norm_type, where, f"norm_type={block.norm_type}")
    error.require(
        block.pos_embed is None and not block.only_cross_attention,
        where,
        "a block position embedding or a cross-only attn1",
    )


class BandedForward:
    """The shell of a banded forward: what both families keep between calls and do around a call.

    A subclass sets ``error`` (its refusal), ``label`` (the model in messages) and ``patch_name``, and
    wraps its result in diffusers' output class in :meth:`output`.
    """

    error: type[UnsupportedBanding] = UnsupportedBanding
    label = "the model"
    patch_name = "banded forward"

    def __init__(
        self,
        model: nn.Module,
        band_bytes: int = DEFAULT_BAND_BYTES,
        store_device: torch.device | str | None = None,
        device_store_bytes: int | None = None,
    ) -> None:
        if band_bytes < 1:
            raise ValueError(f"band_bytes must be >= 1; got {band_bytes}")
        self.model = model
        self.band_bytes = band_bytes
        self.store_device = store_device
        self.device_store_bytes = device_store_bytes
        self.last_store_peak: dict[str, int] = {}
        self.host_arena: HostArena | None = None

    @contextmanager
    def call_store(self, device: torch.device, dry: bool) -> Iterator[BandStore]:
        """The store of one call on ``device``; a real call with a separate store uses the host arena kept
        between calls (pinned for a GPU model) and grows it to what the call needed."""
        arena = None
        if not dry and self.store_device is not None:
            if self.host_arena is None:
                self.host_arena = HostArena(pin=device.type == "cuda")
            arena = self.host_arena
            arena.begin()
        store = BandStore(device, self.store_device, self.device_store_bytes or 0, arena=arena)
        yield store
        self.last_store_peak = dict(store.peak)
        if arena is not None:
            arena.finish()

    def release_host_memory(self) -> None:
        """Give back the host arena kept between calls (the next call rebuilds it)."""
        if self.host_arena is not None:
            self.host_arena.drop()
            self.host_arena = None

    def inference(self, inputs: torch.Tensor, compute: Callable[[], torch.Tensor], return_dict: bool) -> Any:
        """``compute()`` without gradients, returned as the model's own ``forward`` returns it; refused
        when gradients are wanted (the bands free what a backward pass would need)."""
        if torch.is_grad_enabled():
            needs_grad = inputs.requires_grad or any(p.requires_grad for p in self.model.parameters())
            self.error.require(
                not needs_grad, "the call", "gradients (inference only: call it under torch.no_grad())"
            )
        with torch.no_grad():
            sample = compute()
        return self.output(sample) if return_dict else (sample,)

    def output(self, sample: torch.Tensor) -> Any:
        """``sample`` in the output class of the model's ``forward`` (for ``return_dict=True``)."""
        raise NotImplementedError


def install_banded_forward(banded: BandedForward) -> Patch:
    """Install ``banded`` as its model's ``forward``; removing the patch also gives its host arena back.

    Refused on a model with accelerate hooks: they wrap ``forward`` and would move whole activations.
    """
    banded.error.require(
        not hasattr(banded.model, "_hf_hook"),
        banded.label,
        "accelerate hooks (apply this patch before CPU offload)",
    )
    patch = set_attribute(banded.model, "forward", banded, patch_name=banded.patch_name)
    patch.on_remove(banded.release_host_memory)
    return patch


@dataclass(frozen=True)
class BandedCost:
    """What one banded call costs (activations only: the weights come on top of ``device_peak``).

    FLOPs count multiply-adds as two, as ``torch.utils.flop_counter.FlopCounterMode`` does.
    """

    device_peak: int  # bytes on the model's device: its share of the store plus one band's working memory
    host_peak: int  # bytes kept on the store device (0 without a separate store)
    flops: int  # the banded forward
    plain_flops: int  # the unbanded forward
    moved_bytes: int  # bytes copied between the store device and the model's device
    passes: int  # passes over the whole latent or sequence (each a synchronisation point)

    @property
    def flop_overhead(self) -> float:
        return self.flops / self.plain_flops

    @classmethod
    def of_run(cls: type[CostT], run: BandPasses, plain_flops: int) -> CostT:
        """The cost of the call ``run`` traced, whose unbanded forward takes ``plain_flops``."""
        return cls(
            device_peak=max(run.working_peak, run.store.peak["device"]),
            host_peak=run.store.peak["host"],
            flops=run.flops,
            plain_flops=plain_flops,
            moved_bytes=run.transfers.fetched + run.transfers.written,
            passes=run.passes,
        )


__all__ = [
    "DEFAULT_BAND_BYTES",
    "BandedCost",
    "BandedForward",
    "UnsupportedBanding",
    "check_basic_block",
    "check_eval_mode",
    "install_banded_forward",
]
