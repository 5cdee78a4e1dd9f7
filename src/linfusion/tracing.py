"""Running a model on the ``meta`` device to measure it: the bytes of live tensors, and FLOPs.

Nothing is computed on ``meta``, so a full-size UNet at 16K is measured in seconds on any machine. The
memory planner and the banded UNet's cost model both measure this way.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode while any tensor still refers to them."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._storages: dict[int, list[int]] = {}  # storage key -> [tensor references, bytes]

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Views and in-place or out= results share an input's storage: when that storage predates the trace
        # (weights, a caller's tensors; a Linear's weight.t() is one) they allocate nothing.
        returns = func._schema.returns
        aliasing = bool(returns) and all(result.alias_info is not None for result in returns)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            entry = self._storages.get(key)
            if entry is None and aliasing:
                continue
            if entry is None:
                self._storages[key] = [1, storage.nbytes()]
                self.largest = max(self.largest, storage.nbytes())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            else:
                entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def fused_attention_stand_in(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """What a fused SDPA kernel allocates: the output and its per-row log-sum-exp, never the N x N scores.

    On ``meta`` SDPA takes the math path, which would count a score matrix that the flash / memory-efficient
    kernels of real CPUs and GPUs never hold.
    """
    query.new_empty(query.shape[:-1], dtype=torch.float32)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


class FusedAttentionStandIn(TorchFunctionMode):
    """Routes this thread's ``scaled_dot_product_attention`` calls to :func:`fused_attention_stand_in`.

    A function mode is thread-local, unlike replacing ``F.scaled_dot_product_attention``: a plan traced in
    one thread (a web UI's) leaves the attention of a generation running in another thread untouched.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.nn.functional.scaled_dot_product_attention:
            return fused_attention_stand_in(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def traced_peak(run: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive at once while ``run`` executes (call it with meta tensors)."""
    mode = LiveBytes()
    with torch.no_grad(), FusedAttentionStandIn(), mode:
        run()
    return mode.peak


def traced_flops(run: Callable[[], Any]) -> int:
    """FLOPs of ``run`` as torch's flop counter sees them (matmuls, convolutions, attention); on ``meta``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run()
    return int(counter.get_total_flops())


__all__ = ["FusedAttentionStandIn", "LiveBytes", "fused_attention_stand_in", "traced_flops", "traced_peak"]
