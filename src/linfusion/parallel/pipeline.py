"""Spatial (and classifier-free-guidance) parallelism for whole diffusers pipelines.

Every rank runs the same pipeline with the same seed (text encoders, scheduler, noise: identical and
cheap). Hooks on the UNet (or a PixArt transformer), the ControlNet(s) and the VAE decoder split each call's input right before the
model and all-gather its output right after it, so schedulers, guidance and image post-processing see
full tensors and nothing else in the pipeline changes:

* UNet / ControlNet: the batch is cut into ``cfg_groups`` parts (guidance's unconditional and conditional
  halves on different rank groups, when the batch divides), and the latent into ``stripes`` = world /
  cfg_groups row stripes within each group. Rank r is in group r // stripes and holds stripe r % stripes.
  ControlNet residuals are gathered after the ControlNet and split again for the UNet (simple, exact).
* VAE decoder: the latent is cut into ``world`` stripes (all ranks, batch not split).

With a world of 2 the default is 2 stripes, 1 guidance group (stripes also divide the activation memory;
guidance groups do not); from 4 processes on (even counts) it is 2 guidance groups x world/2 stripes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .comm import Communicator
from .layout import bounds_at, downsampling_factor, stripe_bounds
from .patch import SpatialParallel

# Arguments holding (batch, channels, height, width) tensors that live on the latent grid (or a multiple
# or a downsampled level of it) and are therefore split into stripes, not only by batch.
SPATIAL_ARGUMENTS = frozenset(
    {
        "sample",
        "controlnet_cond",
        "down_block_additional_residuals",
        "mid_block_additional_residual",
        "down_intrablock_additional_residuals",
    }
)


def default_cfg_groups(world: int) -> int:
    """2 guidance groups from 4 processes on (even counts), else 1; ``LINFUSION_CFG_GROUPS`` overrides."""
    override = os.environ.get("LINFUSION_CFG_GROUPS")
    if override:
        return int(override)
    return 2 if world >= 4 and world % 2 == 0 else 1


@dataclass
class Topology:
    """Which rank does what: ``cfg_groups`` x ``stripes`` = world."""

    world: int
    rank: int
    cfg_groups: int
    stripes: int
    spatial: Communicator  # this rank's stripe group
    everyone: Communicator  # all ranks

    @property
    def cfg_index(self) -> int:
        return self.rank // self.stripes

    @property
    def stripe_index(self) -> int:
        return self.rank % self.stripes


def make_topology(cfg_groups: int | None = None, group: Any = None) -> Topology:
    """Build the process groups (every rank must call this, in the same order)."""
    everyone = Communicator(group)
    world, rank = everyone.world, everyone.rank
    cfg_groups = default_cfg_groups(world) if cfg_groups is None else cfg_groups
    if cfg_groups < 1 or world % cfg_groups:
        raise ValueError(f"cfg_groups={cfg_groups} must divide the number of processes ({world})")
    stripes = world // cfg_groups
    if cfg_groups == 1:
        spatial = everyone
    else:
        spatial = None
        for index in range(cfg_groups):
            members = list(range(index * stripes, (index + 1) * stripes))
            if group is not None:
                members = [dist.get_global_rank(group, member) for member in members]
            new = dist.new_group(members)
            if index == rank // stripes:
                spatial = Communicator(new) if stripes > 1 else Communicator.single()
    return Topology(world, rank, cfg_groups, stripes, spatial, everyone)  # type: ignore[arg-type]


def _map(value: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists, dicts and diffusers outputs."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        mapped = {key: _map(item, fn) for key, item in value.items()}
        return type(value)(**mapped) if type(value) is not dict else mapped
    if isinstance(value, (list, tuple)):
        return type(value)(_map(item, fn) for item in value)
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(value, lambda tensor: found.append(tensor) or tensor)
    return found


class SplitModel:
    """Hooks that run one model on this rank's share of every call (see the module docstring)."""

    def __init__(self, model: nn.Module, topology: Topology, split_batch: bool, comm: Communicator) -> None:
        self.model = model
        self.topology = topology
        self.split_batch = split_batch and topology.cfg_groups > 1
        self.comm = comm  # the stripe group
        self.stripes = comm.world
        self.stripe = comm.rank
        self.multiple = downsampling_factor(model)
        self.patches = SpatialParallel([model], comm, active=False).patch()
        self.signature = inspect.signature(model.forward)
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]
        self._batch_split_now = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.patches.active = False
        self.patches.restore()

    # ------------------------------------------------------------------ split
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = self.signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        for name, parameter in self.signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        first = next(iter(self.signature.parameters))
        sample = arguments[first]
        batch, height = sample.shape[0], sample.shape[-2]
        groups = self.topology.cfg_groups
        self._batch_split_now = self.split_batch and batch % groups == 0
        bounds = stripe_bounds(height, self.stripes, self.multiple)
        part = batch // groups if self._batch_split_now else batch
        offset = self.topology.cfg_index * part if self._batch_split_now else 0

        def by_batch(tensor: torch.Tensor) -> torch.Tensor:
            if self._batch_split_now and tensor.ndim >= 1 and tensor.shape[0] == batch:
                return tensor[offset : offset + part]
            return tensor

        def by_rows(tensor: torch.Tensor) -> torch.Tensor:
            tensor = by_batch(tensor)
            if tensor.ndim != 4:
                return tensor
            start, stop = bounds_at(bounds, tensor.shape[-2], height)[self.stripe]
            return tensor[..., start:stop, :]

        split = {
            name: _map(value, by_rows if name in SPATIAL_ARGUMENTS or name == first else by_batch)
            for name, value in arguments.items()
        }
        self.patches.layout_key = (height, sample.shape[-1], part)
        self.patches.active = True
        return (), split

    # ------------------------------------------------------------------ gather
    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self.patches.active = False
        comm = self.topology.everyone if self._batch_split_now else self.comm
        tensors = [tensor for tensor in _tensors(output) if tensor.ndim == 4]
        heights = comm.all_gather_ints([tensor.shape[-2] for tensor in tensors])
        position = iter(range(len(tensors)))

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.ndim != 4:
                return tensor
            index = next(position)
            sizes = [row[index] for row in heights]
            if not self._batch_split_now:
                return comm.all_gather_cat(tensor, 2, sizes, "gather")
            parts = comm.all_gather_parts(tensor, 2, sizes, "gather")
            stripes = self.topology.stripes
            groups = [
                torch.cat(parts[group * stripes : (group + 1) * stripes], dim=2)
                for group in range(self.topology.cfg_groups)
            ]
            return torch.cat(groups, dim=0)

        return _map(output, gather)


def _controlnets(pipe: Any) -> list[nn.Module]:
    nets = getattr(pipe, "controlnet", None)
    if nets is None:
        return []
    return list(getattr(nets, "nets", [nets]))


class ParallelPipeline:
    """The hooks installed on one pipeline's models; :meth:`remove` puts everything back."""

    def __init__(self, pipe: Any, cfg_groups: int | None = None, group: Any = None) -> None:
        self.topology = make_topology(cfg_groups, group)
        self.splits: list[SplitModel] = []
        try:
            for model in [
                getattr(pipe, "unet", None),
                getattr(pipe, "transformer", None),
                *_controlnets(pipe),
            ]:
                if model is None:
                    continue
                self.splits.append(SplitModel(model, self.topology, True, self.topology.spatial))
            vae = getattr(pipe, "vae", None)
            if vae is not None and getattr(vae, "decoder", None) is not None:
                self.splits.append(SplitModel(vae.decoder, self.topology, False, self.topology.everyone))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self.splits:
            self.splits.pop().remove()


@contextlib.contextmanager
def parallel_pipeline(
    pipe: Any, cfg_groups: int | None = None, group: Any = None
) -> Iterator[ParallelPipeline]:
    """Run ``pipe`` spatial- (and guidance-) parallel over the processes of ``group``, exactly.

    Every rank calls ``pipe(...)`` with the same arguments and seed, and every rank gets the full result.
    Pipelines built with ``from_pipe`` share the models, so they are parallel too. Restored on exit.
    """
    parallel = ParallelPipeline(pipe, cfg_groups, group)
    try:
        yield parallel
    finally:
        parallel.remove()
