"""Exact tiled VAE encode and decode: any size, bounded memory, no seams.

diffusers' own ``enable_tiling`` runs every tile through the network on its own, so each tile normalizes
with its own GroupNorm statistics (visible seams, colour shifts). Here the encoder or decoder runs as a
chain of layers streamed over row chunks instead, and every GroupNorm uses whole-image statistics:

- the chain is made of *units* (a convolution, a ResNet block, the mid-block attention) joined at *points*:
  the activations between units, plus the output of the first convolution inside each ResNet block (the
  input of its second GroupNorm);
- a *pass* streams row chunks from a stored point (its *source*) through the units up to a *target* point.
  Every convolution keeps the halo rows its next outputs need, so each output row is computed once per
  pass and equals what the whole-image convolution computes. The pass measures the target's mean and
  spread per channel, chunk by chunk, and merges them (float64, Chan's merge: exact also for activations
  with a large mean and a small spread): the statistics the GroupNorm reading the target needs;
- the program is one pass per GroupNorm input, in order, then a last pass that writes the output. A pass
  may *store* a point it crosses (rows written as they are produced); later passes start there instead of
  recomputing from further back. The store keeps whole-row blocks of about 32 MiB; a pass that replaces
  its source by a newer stored point frees the source's blocks as it reads them, so the store holds about
  the larger of the two, not their sum;
- the mid-block self-attention is global: keys and values of all tokens are built chunk by chunk and the
  queries attend to them in chunks (exact softmax; when the keys and values do not fit the chunk budget
  they go to the store and are read in chunks with a running log-sum-exp). With the linear VAE attention
  (:mod:`linfusion.vae_attention`) one pass sums every chunk's key/value state and a second reads it.

Which points to store is a budget question. Storing everything (``store_limit_bytes=None``) computes every layer
once, the plain VAE's FLOPs, with about two activations of the largest layer in the store; storing less
recomputes more. :func:`plan_vae` picks, for a store budget, the stored points that minimise the FLOPs (a
dynamic programme over the passes), and :func:`tiled_vae_cost` reports that plan's device and host peaks
and FLOPs analytically, without running anything (the memory planner calls it).

The result equals the untiled VAE up to float summation order. Working memory on the compute device is the
chunks of one pass (about ``band_bytes``); the store sits on ``store_device`` (the VAE's device by default;
``"cpu"`` keeps only chunks on the GPU, or also ``device_store_bytes`` of the store).

The modules, by job: :mod:`.checks` (which VAEs are supported), :mod:`.chain` (the chain model: units,
points, shapes, FLOPs, working bytes), :mod:`.plan` (what to store, and the cost model), :mod:`.stages`
(streamed convolutions and ResNet halves), :mod:`.attention` (the mid-block attention pass's kernels) and
:mod:`.tiler` (:class:`ExactTiler`, running the passes). The GroupNorm statistics, the row store and the
row rules are :mod:`linfusion.banding`'s, shared with the banded UNet. Every public name is importable
from here.
"""

from .chain import Chain, Point, Shape, Unit, attention_flops, vae_units, working_bytes
from .checks import UnsupportedVAE
from .plan import (
    DEFAULT_BAND_BYTES,
    DEFAULT_STORE_BLOCK_BYTES,
    STORE_POINTS,
    Pass,
    Plan,
    StoreBudgetError,
    VAECost,
    plan_vae,
    tiled_vae_cost,
)
from .tiler import ExactTiler, tiled_decode, tiled_encode_moments

__all__ = [
    "DEFAULT_BAND_BYTES",
    "DEFAULT_STORE_BLOCK_BYTES",
    "STORE_POINTS",
    "Chain",
    "ExactTiler",
    "Pass",
    "Plan",
    "Point",
    "Shape",
    "StoreBudgetError",
    "UnsupportedVAE",
    "Unit",
    "VAECost",
    "attention_flops",
    "plan_vae",
    "tiled_decode",
    "tiled_encode_moments",
    "tiled_vae_cost",
    "vae_units",
    "working_bytes",
]
