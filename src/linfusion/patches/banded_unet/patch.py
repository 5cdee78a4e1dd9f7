"""The banded UNet as a patch: :class:`BandedUNet` takes ``UNet2DConditionModel.forward``'s arguments,
builds the conditioning exactly as diffusers does, and runs the banded walk; :func:`apply_banded_unet`
installs it as ``unet.forward``, reversibly."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..banded_shell import DEFAULT_BAND_BYTES, BandedForward, install_banded_forward
from ..base import Patch
from .checks import UnsupportedUNet, check_banded_unet, check_call
from .schedule import BandRun, Conditioning, linear_flops
from .walk import walk_unet


class BandedUNet(BandedForward):
    """The banded forward of one UNet, what :func:`apply_banded_unet` installs as ``unet.forward``.

    Takes the arguments of ``UNet2DConditionModel.forward`` and returns what it returns.
    """

    error = UnsupportedUNet
    label = "the UNet"
    patch_name = "banded UNet"

    def __init__(
        self,
        unet: nn.Module,
        band_bytes: int = DEFAULT_BAND_BYTES,
        store_device: torch.device | str | None = None,
        device_store_bytes: int | None = None,
    ) -> None:
        super().__init__(unet, band_bytes, store_device, device_store_bytes)

    @property
    def unet(self) -> nn.Module:
        """The UNet this forward belongs to."""
        return self.model

    def _conditioning(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                      options: dict[str, Any]) -> Conditioning:  # fmt: skip
        """Time embedding and text context exactly as ``UNet2DConditionModel.forward`` builds them."""
        unet = self.unet
        emb = unet.time_embedding(
            unet.get_time_embed(sample=sample, timestep=timestep), options.get("timestep_cond")
        )
        class_emb = unet.get_class_embed(sample=sample, class_labels=options.get("class_labels"))
        if class_emb is not None:
            emb = (
                torch.cat([emb, class_emb], dim=-1)
                if unet.config.class_embeddings_concat
                else emb + class_emb
            )
        added = options.get("added_cond_kwargs")
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )
        cross_attention = dict(options.get("cross_attention_kwargs") or {})
        mask = options.get("encoder_attention_mask")
        if mask is not None:
            cross_attention["attention_mask"] = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        return Conditioning(emb, context, cross_attention)

    def _run(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
             options: dict[str, Any], dry: bool) -> tuple[torch.Tensor, BandRun]:  # fmt: skip
        unet = self.unet
        check_call(unet, sample, options)
        check_banded_unet(unet)
        with self.call_store(unet.conv_in.weight.device, dry) as store:
            run = BandRun(unet, self.band_bytes, store, dry=dry)
            if unet.config.center_input_sample:
                sample = 2 * sample - 1.0
            conditioning = self._conditioning(sample, timestep, encoder_hidden_states, options)
            run.count(self._embedding_flops(sample.shape[0], conditioning.context.shape[1]))
            down = options.get("down_block_additional_residuals")
            result = walk_unet(
                run,
                sample,
                conditioning,
                list(down) if down is not None else None,
                options.get("mid_block_additional_residual"),
            )
        return result, run

    def _embedding_flops(self, batch: int, context_tokens: int) -> int:
        unet = self.unet
        flops = linear_flops(unet.time_embedding, batch)
        if getattr(unet, "add_embedding", None) is not None:
            flops += linear_flops(unet.add_embedding, batch)
        if getattr(unet, "encoder_hid_proj", None) is not None:
            flops += linear_flops(unet.encoder_hid_proj, batch * context_tokens)
        return flops

    @torch.no_grad()
    def traced_cost(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                     **options: Any) -> BandRun:  # fmt: skip
        """A dry call on ``meta``: the run's accounts, for the cost model (nothing is computed)."""
        return self._run(sample, timestep, encoder_hidden_states, options, dry=True)[1]

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        options = {
            "class_labels": class_labels,
            "timestep_cond": timestep_cond,
            "attention_mask": attention_mask,
            "cross_attention_kwargs": cross_attention_kwargs,
            "added_cond_kwargs": added_cond_kwargs,
            "down_block_additional_residuals": down_block_additional_residuals,
            "mid_block_additional_residual": mid_block_additional_residual,
            "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
            "encoder_attention_mask": encoder_attention_mask,
        }
        return self.inference(
            sample,
            lambda: self._run(sample, timestep, encoder_hidden_states, options, dry=False)[0],
            return_dict,
        )

    def output(self, sample: torch.Tensor) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample)


def apply_banded_unet(
    unet: nn.Module,
    *,
    band_bytes: int = DEFAULT_BAND_BYTES,
    store_device: torch.device | str | None = None,
    device_store_bytes: int | None = None,
) -> Patch:
    """Make ``unet(...)`` (and every pipeline using it) run band by band, exactly, in bounded memory.

    ``band_bytes``: working memory of one band on the UNet's device. ``store_device``: where whole
    activations live (None: the UNet's device; ``"cpu"``: a host arena, pinned for a GPU UNet, kept
    between calls until the patch is removed or :meth:`BandedUNet.release_host_memory`).
    ``device_store_bytes``: with a separate store, bytes of the working stream that may stay on the UNet's
    device. Raises :class:`UnsupportedUNet` before changing anything when a layer has no exact banded form.
    Apply it before :func:`linfusion.patches.savers.apply_sequential_cfg` (which then wraps it) and before
    accelerate's CPU offload hooks.
    """
    check_banded_unet(unet)
    banded = BandedUNet(
        unet, band_bytes=band_bytes, store_device=store_device, device_store_bytes=device_store_bytes
    )
    return install_banded_forward(banded)


__all__ = ["DEFAULT_BAND_BYTES", "BandedUNet", "apply_banded_unet"]
