"""Bounded-memory, exact UNet forward: the UNet runs layer by layer over row bands of the latent.

A plain UNet call holds whole activations on the device: at 16384x8192 px (a 2048x1024 latent, 2M tokens)
one SD-1.5 activation of the first level is 1.3 GB in fp16 for each CFG branch, and the skip tensors the up
blocks concatenate add a dozen of them. Here every layer runs over row bands instead, as the exact tiled
VAE does, and only bands are on the device:

- every convolution reads its band plus the halo rows it needs (zero rows at the image border), so it
  computes exactly what the whole convolution computes; stride-2 downsamplers read rows ``2a - 1 ..``,
  nearest-x2 upsamplers map each output row to its source row with the interpolation's own rule;
- every stored activation carries per-(sample, channel) count, mean and M2, merged band by band in float64
  (Chan's merge of :class:`linfusion.banding.Moments`, as the spatial-parallel GroupNorm does), so each
  GroupNorm normalizes with whole-image statistics;
- a ``Transformer2DModel`` runs as one pass per transformer block plus one: the first pass applies its
  GroupNorm and ``proj_in`` and sums the first LinFusion ``attn1``'s key/value state over the bands; pass
  ``i`` reads that state with each band's queries, runs the per-token rest of block ``i`` (LayerNorms,
  cross-attention to the text, feed-forward) and sums block ``i + 1``'s state from the new tokens; the last
  pass ends with ``proj_out`` and the residual. Nothing is computed twice. A diffusers softmax ``attn1``
  (a UNet without LinFusion) keeps the keys and values of all tokens on the device and lets each band's
  queries attend to them: exact, but quadratic in time and linear in device memory (for tests and small
  sizes);
- full activations (the residual stream, the skip tensors the up blocks concatenate, a transformer's
  token stream) live in a *store*: on the UNet's device by default, or on another device
  (``store_device="cpu"``), where they are kept row-major ``(rows, batch, channels, width)`` so that a
  band is one contiguous block: one copy each way. On the CPU that store is one
  :class:`~linfusion.banding.HostArena` kept across calls (pinned once when the UNet is on a GPU).
  ``device_store_bytes`` keeps up to that many bytes of the working stream on the UNet's device; skip
  tensors, which wait longest, always go to the store.
  With a separate store each band's input is fetched one band ahead; on CUDA the copies run on a side
  stream and overlap the compute.

The package, one job per module: :mod:`.checks` (what is supported), :mod:`.schedule` (the band passes,
their store and accounts), :mod:`.layers` (convolutions, ResNets, residuals), :mod:`.attention` and
:mod:`.transformer` (the transformer passes), :mod:`.walk` (the UNet's layer order), :mod:`.patch` (the
forward and its patch), :mod:`.cost` (the cost model). Statistics, store, passes and row rules come from
:mod:`linfusion.banding`; the patch's shell, shared with the banded DiT, from
:mod:`linfusion.patches.banded_shell`.

The result equals the plain UNet up to float summation order (tested within 1e-4 in fp32). Batches of any
size run in one pass per layer, so the two classifier-free-guidance branches share every band pass; with
:func:`linfusion.patches.savers.apply_sequential_cfg` applied after this patch they run one after the other,
halving store and band memory.

:func:`banded_unet_cost` predicts device and host bytes, FLOPs and host traffic without computing anything:
it walks the same schedule on the ``meta`` device with the same store, traces the working memory of one
band of every pass and counts FLOPs analytically, in well under a second at 16K.
"""

from ...banding import BandStore, HostArena
from .checks import UnsupportedUNet, check_banded_unet
from .cost import UNetCost, banded_unet_cost, meta_unet_inputs
from .patch import DEFAULT_BAND_BYTES, BandedUNet, apply_banded_unet

__all__ = [
    "DEFAULT_BAND_BYTES",
    "BandStore",
    "BandedUNet",
    "HostArena",
    "UNetCost",
    "UnsupportedUNet",
    "apply_banded_unet",
    "banded_unet_cost",
    "check_banded_unet",
    "meta_unet_inputs",
]
