"""The foundation every banding engine builds on: computing a model layer by layer over row bands (the
banded UNet), or over stripes on several ranks (spatial parallelism), exactly.

- :mod:`.statistics`: whole-image GroupNorm statistics, merged part by part (Chan's merge, float64);
- :mod:`.store`: the row store of whole activations, on the compute device and a host arena, with byte
  accounting per side, and the band copies between them;
- :mod:`.passes`: the passes of one call over its bands (each fetch issued one band ahead), one band
  traced on ``meta`` for a cost model, and the accounts (FLOPs, passes, device peak, bytes moved);
- :mod:`.rows`: band ranges, the input rows a convolution or an upsampler reads for an output band (and
  :class:`ConvRows`, the two chained for one convolution), the convolutions those rules cover, and a rough
  band size per layer.
"""

from .passes import BandPasses, BandTrace, Body, Fetch
from .rows import (
    ConvRows,
    RowWindow,
    band_conv_problem,
    band_ranges,
    conv_window,
    convolve_band,
    estimate_band_rows,
    nearest_source_rows,
    source_span,
    upsample_band,
)
from .statistics import GroupNormAffine, Moments, merge_moments
from .store import BandStore, HostArena, RowBlocks, StoredActivation, Transfers

__all__ = [
    "BandPasses",
    "BandStore",
    "BandTrace",
    "Body",
    "ConvRows",
    "Fetch",
    "GroupNormAffine",
    "HostArena",
    "Moments",
    "RowBlocks",
    "RowWindow",
    "StoredActivation",
    "Transfers",
    "band_conv_problem",
    "band_ranges",
    "conv_window",
    "convolve_band",
    "estimate_band_rows",
    "merge_moments",
    "nearest_source_rows",
    "source_span",
    "upsample_band",
]
