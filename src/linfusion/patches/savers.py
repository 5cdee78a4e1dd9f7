"""Memory savers for very large images, each exact (same result as the plain path) and reversible.

- feed-forward in token chunks: the GEGLU feed-forward of every transformer block widens each token 8x;
  running it on chunks of tokens bounds that buffer (diffusers' own ``enable_forward_chunking`` needs the
  token count to divide by the chunk size, which arbitrary resolutions break);
- classifier-free-guidance branches one at a time: the UNet runs each half of a (uncond, cond) batch on
  its own, halving activation memory;
- skip tensors parked off-device: the UNet keeps every down-block output until the matching up block;
  they can wait on the CPU instead (not with ControlNet, whose residuals are added on the device).

Each ``apply_*`` returns a :class:`~linfusion.patches.base.Patch`; ``remove()`` restores exactly the
state before that call, also when the same saver was already on (with other settings) before it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Patch, hooks, set_attribute

# Marks a forward installed by a saver, so a second application of the same saver builds on the plain
# forward underneath instead of wrapping its own wrapper.
_SAVER_OF = "_linfusion_saver"


def _saver_of(function: Any) -> str | None:
    return getattr(function, _SAVER_OF, None)


# ---------------------------------------------------------------------- feed-forward chunking
def _feed_forwards(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import FeedForward

    return [module for module in unet.modules() if isinstance(module, FeedForward)]


def apply_feed_forward_chunking(unet: nn.Module, chunk_tokens: int = 4096) -> Patch:
    """Run every transformer feed-forward on at most ``chunk_tokens`` tokens at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
    patch = Patch(f"feed-forward chunks of {chunk_tokens} tokens")
    for feed_forward in _feed_forwards(unet):
        current = feed_forward.forward
        plain = current.plain if _saver_of(current) == "feed_forward" else current

        def chunked(
            hidden_states: torch.Tensor, *args: Any, _plain: Any = plain, **kwargs: Any
        ) -> torch.Tensor:
            tokens = hidden_states.shape[1]
            if tokens <= chunk_tokens:
                return _plain(hidden_states, *args, **kwargs)
            # Each chunk is written into one output as soon as it is computed: no list of parts and no
            # concatenation (a second full copy), and every chunk's buffers are freed before the next
            # chunk's, so the allocator reuses the same memory instead of stacking parts between them.
            output = None
            for start in range(0, tokens, chunk_tokens):
                part = _plain(hidden_states[:, start : start + chunk_tokens], *args, **kwargs)
                if output is None:
                    output = part.new_empty((part.shape[0], tokens, *part.shape[2:]))
                output[:, start : start + part.shape[1]] = part
                del part
            return output

        chunked.plain = plain  # type: ignore[attr-defined]
        setattr(chunked, _SAVER_OF, "feed_forward")
        patch.add(set_attribute(feed_forward, "forward", chunked))
    return patch


# ---------------------------------------------------------------------- sequential CFG
def _split_batch(value: Any, batch: int, parts: int) -> list[Any]:
    """``value`` cut into ``parts`` along a leading batch dimension of size ``batch`` (else repeated)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return list(value.chunk(parts, dim=0))
    if isinstance(value, dict):
        pieces = {key: _split_batch(item, batch, parts) for key, item in value.items()}
        return [{key: pieces[key][i] for key in value} for i in range(parts)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        pieces = [_split_batch(item, batch, parts) for item in value]
        return [type(value)(piece[i] for piece in pieces) for i in range(parts)]
    return [value] * parts


def apply_sequential_cfg(unet: nn.Module) -> Patch:
    """Run the UNet on each half of an even batch (the CFG branches) one after the other.

    Wraps the UNet's current ``forward``. Already on: nothing changes, and the returned handle changes
    nothing on removal. Apply it *before* model CPU offload: a diffusers pipeline re-installs offload's
    accelerate hooks after every call, wrapping whatever ``forward`` is there, so a wrapper added on top
    of them could not be removed exactly (refused with a ``ValueError``).
    """
    if _saver_of(unet.forward) == "sequential_cfg":
        return Patch("CFG branches one at a time (already on)")
    if getattr(unet, "_hf_hook", None) is not None:
        raise ValueError(
            "model CPU offload (accelerate hooks) is on: turn on CFG branches one at a time first, then offload"
        )
    plain = unet.forward

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch = sample.shape[0]
        if batch < 2 or batch % 2:
            return plain(sample, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        arg_parts = [_split_batch(a, batch, 2) for a in args]
        kwarg_parts = {key: _split_batch(value, batch, 2) for key, value in kwargs.items()}
        outputs = []
        for i, sample_part in enumerate(sample.chunk(2, dim=0)):
            part_args = [parts[i] for parts in arg_parts]
            part_kwargs = {key: parts[i] for key, parts in kwarg_parts.items()}
            outputs.append(plain(sample_part, *part_args, return_dict=False, **part_kwargs)[0])
        result = torch.cat(outputs, dim=0)
        if not return_dict:
            return (result,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=result)

    setattr(forward, _SAVER_OF, "sequential_cfg")
    return set_attribute(unet, "forward", forward, "CFG branches one at a time")


# ---------------------------------------------------------------------- skip tensors off-device
def apply_skip_offload(unet: nn.Module, park: torch.device | str = "cpu") -> Patch:
    """Keep the down blocks' skip tensors on ``park`` until the up block that consumes them."""
    park = torch.device(park)

    def park_outputs(module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], tuple):
            hidden, skips = output
            return hidden, tuple(skip.to(park, non_blocking=True) for skip in skips)
        return output

    def fetch_skips(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        skips = kwargs.get("res_hidden_states_tuple")
        if skips is not None:
            device = kwargs["hidden_states"].device if "hidden_states" in kwargs else args[0].device
            kwargs["res_hidden_states_tuple"] = tuple(skip.to(device) for skip in skips)
        return args, kwargs

    handles = [block.register_forward_hook(park_outputs) for block in unet.down_blocks]
    handles += [block.register_forward_pre_hook(fetch_skips, with_kwargs=True) for block in unet.up_blocks]
    return hooks(f"skip tensors parked on {park}", handles)


def apply_memory_savers(
    unet: nn.Module,
    feed_forward_chunk: int | None = None,
    sequential_cfg: bool = False,
    skip_offload: torch.device | str | None = None,
) -> Patch:
    """The chosen savers together; ``remove()`` (or leaving the ``with`` block) undoes them all."""
    patch = Patch("memory savers")
    try:
        if feed_forward_chunk:
            patch.add(apply_feed_forward_chunking(unet, feed_forward_chunk))
        if sequential_cfg:
            patch.add(apply_sequential_cfg(unet))
        if skip_offload is not None:
            patch.add(apply_skip_offload(unet, skip_offload))
    except BaseException:
        patch.remove()
        raise
    return patch


__all__ = [
    "apply_feed_forward_chunking",
    "apply_memory_savers",
    "apply_sequential_cfg",
    "apply_skip_offload",
]
