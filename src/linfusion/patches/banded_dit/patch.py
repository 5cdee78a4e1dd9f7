"""The banded DiT as a patch: :class:`BandedDiT` takes ``PixArtTransformer2DModel.forward``'s arguments and
runs the passes of :mod:`.engine`; :func:`apply_banded_dit` installs it as ``transformer.forward``, reversibly."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..banded_shell import DEFAULT_BAND_BYTES, BandedForward, install_banded_forward
from ..base import Patch
from .checks import UnsupportedDiT, check_banded_dit, check_call
from .engine import DiTRun, dit_conditioning, run_blocks


class BandedDiT(BandedForward):
    """The banded forward of one PixArt transformer, what :func:`apply_banded_dit` installs as its ``forward``.

    Takes the arguments of ``PixArtTransformer2DModel.forward`` and returns what it returns.
    """

    error = UnsupportedDiT
    label = "the transformer"
    patch_name = "banded DiT"

    def __init__(
        self,
        transformer: nn.Module,
        band_bytes: int = DEFAULT_BAND_BYTES,
        store_device: torch.device | str | None = None,
        device_store_bytes: int | None = None,
    ) -> None:
        super().__init__(transformer, band_bytes, store_device, device_store_bytes)

    @property
    def transformer(self) -> nn.Module:
        """The transformer this forward belongs to."""
        return self.model

    def _run(self, sample: torch.Tensor, captions: torch.Tensor, timestep: Any, options: dict[str, Any],
             dry: bool) -> tuple[torch.Tensor, DiTRun]:  # fmt: skip
        transformer = self.transformer
        check_call(transformer, sample, options)
        check_banded_dit(transformer)
        with self.call_store(transformer.pos_embed.proj.weight.device, dry) as store:
            run = DiTRun(store, dry=dry)
            conditioning = run.measured(
                lambda: dit_conditioning(transformer, sample, captions, timestep, options)
            )
            result = run_blocks(run, transformer, sample, conditioning, self.band_bytes)
        return result, run

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
        return self.inference(
            hidden_states,
            lambda: self._run(hidden_states, encoder_hidden_states, timestep, options, dry=False)[0],
            return_dict,
        )

    def output(self, sample: torch.Tensor) -> Any:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)


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
    banded = BandedDiT(
        transformer, band_bytes=band_bytes, store_device=store_device, device_store_bytes=device_store_bytes
    )
    return install_banded_forward(banded)


__all__ = ["DEFAULT_BAND_BYTES", "BandedDiT", "apply_banded_dit"]
