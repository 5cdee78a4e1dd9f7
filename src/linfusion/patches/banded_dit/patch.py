"""The banded DiT as a patch: :class:`BandedDiT` takes ``PixArtTransformer2DModel.forward``'s arguments and
runs the passes of :mod:`.engine`; :func:`apply_banded_dit` installs it as ``transformer.forward``, reversibly."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...banding import BandStore, HostArena
from ..base import Patch, set_attribute
from .checks import check_banded_dit, check_call, require
from .engine import DiTRun, dit_conditioning, run_blocks

DEFAULT_BAND_BYTES = 256 * 2**20


class BandedDiT:
    """The banded forward of one PixArt transformer, what :func:`apply_banded_dit` installs as its ``forward``.

    Takes the arguments of ``PixArtTransformer2DModel.forward`` and returns what it returns.
    """

    def __init__(
        self,
        transformer: nn.Module,
        band_bytes: int = DEFAULT_BAND_BYTES,
        store_device: torch.device | str | None = None,
        device_store_bytes: int | None = None,
    ) -> None:
        if band_bytes < 1:
            raise ValueError(f"band_bytes must be >= 1; got {band_bytes}")
        self.transformer = transformer
        self.band_bytes = band_bytes
        self.store_device = store_device
        self.device_store_bytes = device_store_bytes
        self.last_store_peak: dict[str, int] = {}
        self.host_arena: HostArena | None = None

    def _run(self, sample: torch.Tensor, captions: torch.Tensor, timestep: Any, options: dict[str, Any],
             dry: bool) -> tuple[torch.Tensor, DiTRun]:  # fmt: skip
        transformer = self.transformer
        check_call(transformer, sample, options)
        check_banded_dit(transformer)
        device = transformer.pos_embed.proj.weight.device
        arena = None
        if not dry and self.store_device is not None:
            if self.host_arena is None:
                self.host_arena = HostArena(pin=device.type == "cuda")
            arena = self.host_arena
            arena.begin()
        store = BandStore(device, self.store_device, self.device_store_bytes or 0, arena=arena)
        run = DiTRun(store, dry=dry)
        conditioning = run.measured(
            lambda: dit_conditioning(transformer, sample, captions, timestep, options)
        )
        result = run_blocks(run, transformer, sample, conditioning, self.band_bytes)
        self.last_store_peak = dict(store.peak)
        if arena is not None:
            arena.finish()
        return result, run

    def release_host_memory(self) -> None:
        """Give back the host arena kept between calls (the next call rebuilds it)."""
        if self.host_arena is not None:
            self.host_arena.drop()
            self.host_arena = None

    @torch.no_grad()
    def traced_cost(
        self, sample: torch.Tensor, captions: torch.Tensor, timestep: Any, **options: Any
    ) -> DiTRun:
        """A dry call on ``meta``: the run's accounts, for the cost model (nothing is computed)."""
        return self._run(sample, captions, timestep, options, dry=True)[1]

    def __call__(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        # attention_mask only reaches attn1, which LinFusion's layer ignores (as in the unbanded call)
        options = {
            "added_cond_kwargs": added_cond_kwargs,
            "cross_attention_kwargs": cross_attention_kwargs,
            "encoder_attention_mask": encoder_attention_mask,
        }
        if torch.is_grad_enabled():
            needs_grad = hidden_states.requires_grad or any(
                p.requires_grad for p in self.transformer.parameters()
            )
            require(not needs_grad, "the call", "gradients (inference only: call it under torch.no_grad())")
        with torch.no_grad():
            output, _ = self._run(hidden_states, encoder_hidden_states, timestep, options, dry=False)
        if not return_dict:
            return (output,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=output)


def apply_banded_dit(
    transformer: nn.Module,
    *,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_device: torch.device | str | None = None,
    device_store_bytes: int | None = None,
) -> Patch:
    """Make ``transformer(...)`` (and every pipeline using it) run band by band, exactly, in bounded memory.

    ``band_bytes``: working memory of one band on the transformer's device. ``store_device``: where the
    residual stream lives (None: the transformer's device; ``"cpu"``: a host arena, pinned for a GPU model,
    kept between calls until the patch is removed or :meth:`BandedDiT.release_host_memory`).
    ``device_store_bytes``: with a separate store, bytes of the stream that may stay on the device. Raises
    :class:`~.checks.UnsupportedDiT` before changing anything when the transformer has no exact banded
    form (softmax self-attention: mount LinFusion first). Apply it before
    :func:`linfusion.patches.savers.apply_sequential_cfg` (which then wraps it) and before accelerate's
    CPU offload hooks.
    """
    check_banded_dit(transformer)
    require(
        not hasattr(transformer, "_hf_hook"),
        "the transformer",
        "accelerate hooks (apply this patch before CPU offload)",
    )
    banded = BandedDiT(
        transformer, band_bytes=band_bytes, store_device=store_device, device_store_bytes=device_store_bytes
    )
    patch = set_attribute(transformer, "forward", banded, patch_name="banded DiT")
    patch.on_remove(banded.release_host_memory)
    return patch


__all__ = ["DEFAULT_BAND_BYTES", "BandedDiT", "apply_banded_dit"]
