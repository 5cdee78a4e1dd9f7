"""The few collectives spatial parallelism needs, on one ``torch.distributed`` group, with byte counters.

Every byte handed to a collective is counted per kind (``halo``, ``groupnorm``, ``linear_state``,
``kv_gather``, ``gather``, ``sizes``), so the benchmark reports measured communication volume rather than
an estimate. Counting convention (per rank): an all-reduce counts its tensor once; an all-gather counts the
gathered result (world x chunk); a halo exchange counts the rows this rank sends.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Bytes and calls per kind of collective, on this rank."""

    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes.values()))


#: Process-wide counters (all communicators add here too), reset by the benchmark around one UNet step.
GLOBAL_STATS = CommStats()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Communicator:
    """Collectives over ``group`` (None: the default group), ranks numbered within the group.

    With a world of one every operation is the identity, so the patched model also runs without
    ``torch.distributed`` being initialised.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
        else:
            if group is not None:
                raise RuntimeError("a process group was given but torch.distributed is not initialised")
            self.rank, self.world = 0, 1
        self.stats = CommStats()

    @classmethod
    def single(cls) -> Communicator:
        """A group of one (this process alone): every collective is the identity."""
        comm = cls.__new__(cls)
        comm.group, comm.rank, comm.world, comm.stats = None, 0, 1, CommStats()
        return comm

    def _count(self, kind: str, nbytes: int) -> None:
        self.stats.add(kind, nbytes)
        GLOBAL_STATS.add(kind, nbytes)

    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def all_reduce_sum(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place (it is returned for convenience)."""
        if self.world > 1:
            self._count(kind, _nbytes(tensor))
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather_ints(self, values: list[int], kind: str = "sizes") -> list[list[int]]:
        """Every rank's ``values`` (same length on all ranks), indexed by rank."""
        if self.world == 1:
            return [list(values)]
        device = self.device_hint
        local = torch.tensor(values, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        self._count(kind, _nbytes(local) * self.world)
        dist.all_gather(gathered, local, group=self.group)
        return [[int(v) for v in t.tolist()] for t in gathered]

    @property
    def device_hint(self) -> torch.device:
        """Where small control tensors live: the current CUDA device under NCCL, else the CPU."""
        if self.world > 1 and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_gather_parts(
        self, tensor: torch.Tensor, dim: int, sizes: list[int], kind: str
    ) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (indexed by rank); ``sizes`` is each rank's extent along ``dim``.

        Parts of unequal size are padded to the largest for the transfer (gloo and NCCL all-gather need
        equal sizes) and trimmed after.
        """
        if self.world == 1:
            return [tensor]
        largest = max(sizes)
        tensor = tensor.contiguous()
        if tensor.shape[dim] < largest:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = largest - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        self._count(kind, _nbytes(tensor) * self.world)
        dist.all_gather(parts, tensor, group=self.group)
        return [part.narrow(dim, 0, size) for part, size in zip(parts, sizes)]

    def all_gather_cat(self, tensor: torch.Tensor, dim: int, sizes: list[int], kind: str) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order (see all_gather_parts)."""
        if self.world == 1:
            return tensor
        return torch.cat(self.all_gather_parts(tensor, dim, sizes, kind), dim=dim)

    def exchange_rows(
        self, x: torch.Tensor, dim: int, send_up: int, send_down: int, recv_up: int, recv_down: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Halo exchange with the neighbours along ``dim``.

        Sends this rank's first ``send_up`` rows to rank - 1 and its last ``send_down`` rows to rank + 1;
        receives ``recv_up`` rows from rank - 1 (its last rows) and ``recv_down`` rows from rank + 1.
        Returns (rows from above, rows from below), None where nothing is received.
        """
        ops = []
        above = below = None
        length = x.shape[dim]
        if send_up > 0:
            chunk = x.narrow(dim, 0, send_up).contiguous()
            self._count("halo", _nbytes(chunk))
            ops.append(dist.P2POp(dist.isend, chunk, self._global_rank(self.rank - 1), self.group))
        if send_down > 0:
            chunk = x.narrow(dim, length - send_down, send_down).contiguous()
            self._count("halo", _nbytes(chunk))
            ops.append(dist.P2POp(dist.isend, chunk, self._global_rank(self.rank + 1), self.group))
        if recv_up > 0:
            shape = list(x.shape)
            shape[dim] = recv_up
            above = x.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, above, self._global_rank(self.rank - 1), self.group))
        if recv_down > 0:
            shape = list(x.shape)
            shape[dim] = recv_down
            below = x.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, below, self._global_rank(self.rank + 1), self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return above, below


class _Rendezvous:
    """Shared slots and a barrier for :class:`ThreadCommunicator` ranks of one process."""

    def __init__(self, world: int) -> None:
        import threading

        self.world = world
        self.barrier = threading.Barrier(world, timeout=600)
        self.slots: list = [None] * world

    def exchange(self, rank: int, value: object) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values


class ThreadCommunicator(Communicator):
    """Ranks as threads of one process: the same collectives and byte counts as :class:`Communicator`.

    For dry runs on the ``meta`` device (communication volume of full-size models at any resolution
    without computing anything) and for quick experiments; not a transport for real work.
    """

    def __init__(self, rendezvous: _Rendezvous, rank: int) -> None:
        self.group = None
        self.rank, self.world = rank, rendezvous.world
        self.stats = CommStats()
        self._rendezvous = rendezvous

    @classmethod
    def world_of(cls, world: int) -> list[ThreadCommunicator]:
        rendezvous = _Rendezvous(world)
        return [cls(rendezvous, rank) for rank in range(world)]

    @property
    def device_hint(self) -> torch.device:
        return torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        if self.world > 1:
            self._count(kind, _nbytes(tensor))
            values = self._rendezvous.exchange(self.rank, tensor.clone())
            tensor.copy_(torch.stack(values).sum(0))
        return tensor

    def all_gather_ints(self, values: list[int], kind: str = "sizes") -> list[list[int]]:
        if self.world == 1:
            return [list(values)]
        self._count(kind, 8 * len(values) * self.world)
        return [list(v) for v in self._rendezvous.exchange(self.rank, list(values))]

    def all_gather_parts(
        self, tensor: torch.Tensor, dim: int, sizes: list[int], kind: str
    ) -> list[torch.Tensor]:
        if self.world == 1:
            return [tensor]
        padded = list(tensor.shape)
        padded[dim] = max(sizes)
        self._count(kind, math.prod(padded) * tensor.element_size() * self.world)
        return self._rendezvous.exchange(self.rank, tensor)

    def exchange_rows(
        self, x: torch.Tensor, dim: int, send_up: int, send_down: int, recv_up: int, recv_down: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        per_row = _nbytes(x) // max(1, x.shape[dim])
        if send_up + send_down:
            self._count("halo", per_row * (send_up + send_down))
        slots = self._rendezvous.exchange(self.rank, x)
        above = below = None
        if recv_up:
            neighbour = slots[self.rank - 1]
            above = neighbour.narrow(dim, neighbour.shape[dim] - recv_up, recv_up)
        if recv_down:
            below = slots[self.rank + 1].narrow(dim, 0, recv_down)
        return above, below
