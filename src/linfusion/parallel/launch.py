"""``torchrun --nproc_per_node=N -m linfusion generate ...``: the process group around one CLI command.

:func:`parallel_command` wraps a sub-command's ``run(args)``. With ``WORLD_SIZE`` > 1 (set by torchrun) it

* initialises the process group from the torchrun environment: NCCL with device ``cuda:LOCAL_RANK`` when
  CUDA is used, gloo on CPU, with a timeout (``LINFUSION_DIST_TIMEOUT`` seconds, default 300) so that no
  collective can wait for ever;
* makes the pipeline parallel (:func:`enable_for_pipeline`, called where the pipeline is prepared) and lets
  only rank 0 write files and print to stdout (:func:`is_main_process`);
* on an error in any rank: that rank prints it (with its rank) and leaves at once, which breaks the other
  ranks' pending collectives (gloo: connection closed; NCCL: the timeout, or torchrun stopping the group),
  so every rank exits non-zero; on success all ranks agree through a final all-reduce of a status flag
  before ``destroy_process_group``.

Without ``WORLD_SIZE`` > 1 the command runs unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ..errors import UserError

DEFAULT_TIMEOUT_S = 300.0


class _Session:
    def __init__(self, rank: int, world: int, local_rank: int, device: str) -> None:
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.device = device
        self.parallel: list[Any] = []


_SESSION: _Session | None = None


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """True outside a distributed command and on its rank 0: the one process that writes the outputs."""
    return _SESSION is None or _SESSION.rank == 0


def enable_for_pipeline(pipe: Any) -> Any:
    """Make ``pipe`` spatial-parallel when running inside a distributed command (else do nothing)."""
    if _SESSION is None:
        return None
    from .pipeline import ParallelPipeline

    parallel = ParallelPipeline(pipe)
    _SESSION.parallel.append(parallel)
    return parallel


def _uses_cuda(device: str) -> bool:
    import torch

    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def parallel_command(run: Callable[[Any], int]) -> Callable[[Any], int]:
    """Decorate a CLI ``run(args) -> exit code``; ``args.device`` and ``args.quiet`` are adjusted per rank."""

    @functools.wraps(run)
    def wrapper(args: Any) -> int:
        if world_size_from_env() <= 1:
            return run(args)
        return _run_distributed(run, args)

    return wrapper


def _run_distributed(run: Callable[[Any], int], args: Any) -> int:
    import torch
    import torch.distributed as dist

    global _SESSION
    rank = int(os.environ.get("RANK", "0"))
    world = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = float(os.environ.get("LINFUSION_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    device = getattr(args, "device", "auto")
    cuda = _uses_cuda(device)
    if cuda:
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    else:
        args.device = "cpu"
    if rank != 0:
        args.quiet = True
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    _SESSION = _Session(rank, world, local_rank, args.device)
    code = 1
    try:
        output = contextlib.nullcontext() if rank == 0 else contextlib.redirect_stdout(io.StringIO())
        with output:
            code = int(run(args) or 0)
    except UserError as error:  # the request cannot work: its message, no traceback
        print(f"linfusion (rank {rank} of {world}): {error}", file=sys.stderr)
        code = 2
    except BaseException as error:  # noqa: BLE001 - reported, then the rank leaves
        print(f"linfusion (rank {rank} of {world}): {type(error).__name__}: {error}", file=sys.stderr)
        if not isinstance(error, (KeyboardInterrupt, SystemExit)):
            traceback.print_exc(file=sys.stderr)
        code = 1
    finally:
        for parallel in _SESSION.parallel:
            parallel.remove()
        _SESSION = None
    if code == 0:
        code = _agree(rank, world)
    else:
        print(f"linfusion (rank {rank} of {world}): failed with exit code {code}; stopping", file=sys.stderr)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return code


def _agree(rank: int, world: int) -> int:
    """All-reduce of a failure flag: 0 only if every rank finished (a failed rank left, so this raises)."""
    import torch
    import torch.distributed as dist

    backend = dist.get_backend()
    flag = torch.zeros(1, device=f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    except Exception as error:  # noqa: BLE001
        print(f"linfusion (rank {rank} of {world}): another rank failed ({error})", file=sys.stderr)
        return 1
    return 0 if flag.item() == 0 else 1
