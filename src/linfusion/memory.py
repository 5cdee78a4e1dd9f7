"""Memory savers for very large images, each exact (same result as the plain path) and reversible.

- feed-forward in token chunks: the GEGLU feed-forward of every transformer block widens each token 8x;
  running it on chunks of tokens bounds that buffer (diffusers' own ``enable_forward_chunking`` needs the
  token count to divide by the chunk size, which arbitrary resolutions break);
- classifier-free-guidance branches one at a time: the UNet runs each half of a (uncond, cond) batch on
  its own, halving activation memory;
- skip tensors parked off-device: the UNet keeps every down-block output until the matching up block;
  they can wait on the CPU instead (not with ControlNet, whose residuals are added on the device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_PATCHED = "_linfusion_memory_patches"
_ABSENT = object()


def _patches(module: nn.Module) -> dict[str, Any]:
    return module.__dict__.setdefault(_PATCHED, {})


# ---------------------------------------------------------------------- feed-forward chunking
def _feed_forwards(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import FeedForward

    return [module for module in unet.modules() if isinstance(module, FeedForward)]


def enable_feed_forward_chunking(unet: nn.Module, chunk_tokens: int = 4096) -> None:
    """Run every transformer feed-forward on at most ``chunk_tokens`` tokens at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
    disable_feed_forward_chunking(unet)
    for feed_forward in _feed_forwards(unet):
        plain = feed_forward.forward

        def chunked(hidden_states: torch.Tensor, *args: Any, _plain=plain, **kwargs: Any) -> torch.Tensor:
            tokens = hidden_states.shape[1]
            if tokens <= chunk_tokens:
                return _plain(hidden_states, *args, **kwargs)
            parts = [_plain(part, *args, **kwargs) for part in hidden_states.split(chunk_tokens, dim=1)]
            return torch.cat(parts, dim=1)

        feed_forward.forward = chunked
    _patches(unet)["feed_forward"] = chunk_tokens


def disable_feed_forward_chunking(unet: nn.Module) -> None:
    if _patches(unet).pop("feed_forward", None) is None:
        return
    for feed_forward in _feed_forwards(unet):
        feed_forward.__dict__.pop("forward", None)


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


def enable_sequential_cfg(unet: nn.Module) -> None:
    """Run the UNet on each half of an even batch (the CFG branches) one after the other."""
    disable_sequential_cfg(unet)
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

    # what it wraps may itself be an instance attribute (another patch's forward): remember it to put it back
    previous = unet.__dict__.get("forward", _ABSENT)
    unet.forward = forward
    _patches(unet)["sequential_cfg"] = previous


def disable_sequential_cfg(unet: nn.Module) -> None:
    previous = _patches(unet).pop("sequential_cfg", None)
    if previous is None:
        return
    if previous is _ABSENT:
        unet.__dict__.pop("forward", None)
    else:
        unet.forward = previous


# ---------------------------------------------------------------------- skip tensors off-device
def enable_skip_offload(unet: nn.Module, park: torch.device | str = "cpu") -> None:
    """Keep the down blocks' skip tensors on ``park`` until the up block that consumes them."""
    disable_skip_offload(unet)
    park = torch.device(park)
    handles = []

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

    for block in unet.down_blocks:
        handles.append(block.register_forward_hook(park_outputs))
    for block in unet.up_blocks:
        handles.append(block.register_forward_pre_hook(fetch_skips, with_kwargs=True))
    _patches(unet)["skip_offload"] = handles


def disable_skip_offload(unet: nn.Module) -> None:
    for handle in _patches(unet).pop("skip_offload", []):
        handle.remove()


@contextlib.contextmanager
def memory_savers(
    unet: nn.Module,
    feed_forward_chunk: int | None = None,
    sequential_cfg: bool = False,
    skip_offload: torch.device | str | None = None,
) -> Iterator[nn.Module]:
    """Turn on the chosen savers for the ``with`` body, then off again (also on error)."""
    try:
        if feed_forward_chunk:
            enable_feed_forward_chunking(unet, feed_forward_chunk)
        if sequential_cfg:
            enable_sequential_cfg(unet)
        if skip_offload is not None:
            enable_skip_offload(unet, skip_offload)
        yield unet
    finally:
        disable_feed_forward_chunking(unet)
        disable_sequential_cfg(unet)
        disable_skip_offload(unet)
