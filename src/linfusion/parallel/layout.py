"""Where the stripes go: row bounds per rank that every downsampling level splits cleanly."""

from __future__ import annotations

from torch import nn


class StripeLayoutError(ValueError):
    """The latent cannot be split into the requested stripes; the message gives the minimum size."""


def downsampling_factor(model: nn.Module) -> int:
    """2 ** (number of stride-2 levels) of a UNet or ControlNet; a transformer's patch size; else 1.

    A stride-2 convolution maps input row 2i to output row i, so a stripe must start at a multiple of
    2 ** levels latent rows for every level's stripe to start on a whole row.
    """
    blocks = getattr(model, "down_blocks", None)
    if blocks is None:  # a diffusion transformer: stripes start on whole patches
        return int(getattr(getattr(model, "config", None), "patch_size", None) or 1)
    levels = sum(1 for block in blocks if getattr(block, "downsamplers", None))
    return 2**levels


def stripe_bounds(height: int, stripes: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of ``stripes`` near-equal stripes of ``height`` rows.

    Every start is a multiple of ``multiple``; every stripe but the last has a multiple of ``multiple``
    rows, the last at least one (so odd heights give stripes of unequal size).
    """
    if stripes < 1:
        raise ValueError(f"stripes must be >= 1; got {stripes}")
    minimum = multiple * (stripes - 1) + 1
    if height < minimum:
        raise StripeLayoutError(
            f"a latent of {height} rows is too short for {stripes} stripes: every stripe but the last needs "
            f"a multiple of {multiple} rows (the model halves the resolution {multiple.bit_length() - 1} "
            f"times), so the latent needs at least {minimum} rows (image height >= {minimum} x the VAE "
            "factor, 8 for Stable Diffusion); use fewer processes or a taller image"
        )
    cuts = [0]
    for index in range(1, stripes):
        ideal = round(height * index / stripes / multiple) * multiple
        highest = (height - 1 - (stripes - 1 - index) * multiple) // multiple * multiple
        cuts.append(min(max(ideal, cuts[-1] + multiple), highest))
    cuts.append(height)
    return list(zip(cuts[:-1], cuts[1:]))


def downsampled_heights(height: int, levels: int) -> list[int]:
    """Heights after each stride-2 level (kernel 3, padding 1: ceil(h / 2)), level 0 first."""
    heights = [height]
    for _ in range(levels):
        heights.append((heights[-1] + 1) // 2)
    return heights


def bounds_at(bounds: list[tuple[int, int]], global_height: int, latent_height: int) -> list[tuple[int, int]]:
    """The stripes of a tensor of ``global_height`` rows seen at another resolution of the same latent.

    Lower levels (a UNet's down path) divide the latent bounds by 2 ** level; higher ones (pixel-space
    ControlNet conditions, VAE outputs) multiply them by the integer factor.
    """
    if global_height == latent_height:
        return list(bounds)
    if global_height > latent_height:
        factor, remainder = divmod(global_height, latent_height)
        if remainder:
            raise ValueError(
                f"a tensor of {global_height} rows is not a multiple of the latent's {latent_height}"
            )
        return [(start * factor, stop * factor) for start, stop in bounds]
    heights = downsampled_heights(latent_height, 16)
    if global_height not in heights:
        raise ValueError(
            f"a tensor of {global_height} rows is not a downsampled level of the latent's {latent_height} rows"
        )
    level = heights.index(global_height)
    scaled = [(start >> level, stop >> level) for start, stop in bounds]
    scaled[-1] = (scaled[-1][0], global_height)
    return scaled
