"""In-place, reversible changes to a user's model, all through one protocol (:mod:`.base`).

Each submodule holds one family of patches; every ``apply``-style function returns a
:class:`~linfusion.patches.base.Patch` whose ``remove()`` is its exact inverse:

- :mod:`.savers`: feed-forward chunking, classifier-free-guidance branches in turn, skip tensors parked off-device;
- :mod:`.tiling`: the exact tiled VAE behind ``vae.encode`` / ``vae.decode``;
- :mod:`.vae_attention`: the linear kernel for the VAE mid-block attention;
- :mod:`.dilation`: DemoFusion's dilated convolutions and its dilated global branch;
- :mod:`.banded_shell`: what the two banded forwards share (their patch, store, refusals and cost record);
- :mod:`.banded_unet`: the whole UNet band by band, exact, in bounded device memory (and its cost model);
- :mod:`.banded_dit`: a PixArt transformer with LinFusion block by block over token bands, exact, bounded
  (and its cost model);
- :mod:`.stage`: a stage's :class:`~linfusion.patches.stage.Savers` applied as one patch (what the planner chose).

LinFusion mounting (:meth:`linfusion.LinFusion.mount`) and spatial parallelism (:mod:`linfusion.parallel`)
follow the same protocol. Only the protocol itself is imported here, so any layer may use it.
"""

from .base import Patch, PatchOrderError, hooks, replace_submodule, set_attribute

__all__ = ["Patch", "PatchOrderError", "hooks", "replace_submodule", "set_attribute"]
