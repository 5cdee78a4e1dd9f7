"""Bounded-memory, exact PixArt (diffusion transformer) forward: each block runs over bands of token rows.

A DiT has no convolution between its patch embedding and its unpatchify: every layer but the
self-attention is token-wise (AdaLN-single's modulation is per sample, the cross-attention's queries are
per token, the 4x-wide MLP is per token). With LinFusion's linear attention as ``attn1``, the
self-attention needs from the other tokens only a small key/value state, so a call runs as one pass per
block plus one over bands of token rows:

- pass 0 embeds each band's patches (with their rows of the sine-cosine position table), writes the
  tokens into the store and adds their keys and values to block 0's state
  (:func:`linfusion.ops.linear_attention_state`, summed over bands in float64);
- pass ``i`` reads block ``i``'s state with each band's queries
  (:func:`linfusion.ops.linear_attention_from_state`), runs the rest of block ``i`` per token (gate,
  cross-attention to the text, modulated MLP), writes the band back and adds it to block ``i + 1``'s
  state; the last pass ends with the output norm, ``proj_out`` and the unpatchify of the band instead.

The residual stream lives in a :class:`~linfusion.banding.BandStore` (on the device, or in host memory with
``store_device="cpu"``), so the device holds one band's working set, not the sequence: at 16384x8192 px
(524,288 tokens of width 1152) one activation is 1.2 GB in fp16 and the MLP's hidden layer 4.8 GB, while a
band of a few thousand tokens needs tens of megabytes. Nothing is computed twice (the text's keys and
values are projected once per band: a few percent of the FLOPs). The result equals the unbanded LinFusion
transformer up to float summation order.

Softmax self-attention is refused (:class:`UnsupportedDiT`): every output token of a softmax attention
depends on all keys through its normalization, so a band cannot be finished from a fixed-size summary;
mount LinFusion first.

Modules: :mod:`.checks` (what is supported), :mod:`.engine` (the passes, their store and accounts),
:mod:`.patch` (the forward and its reversible patch), :mod:`.cost` (the cost model the planner uses). The
store and passes come from :mod:`linfusion.banding`, the patch's shell (shared with the banded UNet) from
:mod:`linfusion.patches.banded_shell`.
"""

from .checks import UnsupportedDiT, check_banded_dit
from .cost import DiTCost, banded_dit_cost
from .patch import BandedDiT, apply_banded_dit

__all__ = [
    "BandedDiT",
    "DiTCost",
    "UnsupportedDiT",
    "apply_banded_dit",
    "banded_dit_cost",
    "check_banded_dit",
]
