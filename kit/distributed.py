"""One fold on several processes (`torchrun`, DistributedDataParallel): the process group, each rank's share of the
work, and the few moments the ranks must agree.

`make train FOLD=0 NPROC=N` runs `torchrun --nproc_per_node N -m kit train …`: torchrun starts N copies of the
ordinary `train` command and sets RANK, LOCAL_RANK and WORLD_SIZE; `start` joins them into one process group (NCCL
on GPUs, gloo on the CPU). Outside torchrun, or with one process, every helper here does nothing, so the
single-process path is the same code and gives the same numbers as before.

Rules the engine follows with these helpers:
- rank 0 alone decides what to do with the run folder (finished, resume, fresh) and is the only one to write in it;
  the others receive its decision (`from_main`), checkpoint included, so they need no shared disk to resume;
- a step that every rank runs and that can fail on bad input (building the model and the data) is run `together`:
  one rank's error stops every rank with the same message instead of leaving the others waiting;
- every rank takes an equal share of each batch (so all take the same number of steps), and predictions are sharded
  and gathered back (`shard`, `gather_rows`) so every rank computes the same AUC and the same early-stopping call.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import KitError, SharedError

# A rank waits this long at a collective (e.g. for rank 0 to load a checkpoint) before giving up with an error.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: rank among `world` processes, and its GPU index on its machine (`local_rank`)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_rank() -> int:
    """RANK as torchrun sets it (0 outside torchrun); known before the process group is joined."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""


def start(device: torch.device) -> Ranks:
    """Join torchrun's process group (once per process; left at exit): NCCL with one GPU per rank, or gloo on the
    CPU. Outside torchrun: a one-process `Ranks`."""
    if launched_world() <= 1:
        return Ranks()
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            visible = torch.cuda.device_count()
            if local_rank >= visible:
                raise KitError(f"NPROC asks for more processes on this machine than it has GPUs ({visible}): use "
                               f"NPROC={visible} or fewer")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        atexit.register(stop)
    return current()


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _collective_device() -> torch.device:
    """NCCL moves only GPU tensors; gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed rank `rank` uses for its own random draws (augmentations, dropout) in a step seeded by `seed`:
    `seed` itself on rank 0 (so one process draws exactly what it always drew), a derived one elsewhere."""
    rank = current().rank if rank is None else rank
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------------------------
# Agreeing
# ----------------------------------------------------------------------------------------------------------------

def from_main(compute):
    """Run `compute()` on rank 0 and hand its result to every rank. A KitError there is raised on every rank (as a
    SharedError, which rank 0 alone prints), so no rank is left waiting."""
    ranks = current()
    if not ranks.active:
        return compute()
    outcome = [None]
    if ranks.is_main:
        try:
            outcome[0] = ("ok", compute())
        except KitError as err:
            outcome[0] = ("error", str(err))
        except BaseException as err:           # a crash or Ctrl-C on rank 0: the others stop too
            outcome[0] = ("error", f"rank 0 stopped ({type(err).__name__})")
            dist.broadcast_object_list(outcome, src=0, device=_collective_device())
            raise
    dist.broadcast_object_list(outcome, src=0, device=_collective_device())
    kind, value = outcome[0]
    if kind == "error":
        raise SharedError(value)
    return value


def together(compute):
    """Run `compute()` on every rank; when it fails on any, every rank raises that (first) error as a SharedError."""
    ranks = current()
    if not ranks.active:
        return compute()
    result, failure = None, None
    try:
        result = compute()
    except KitError as err:
        failure = str(err) if ranks.is_main else f"rank {ranks.rank}: {err}"
    failures = [None] * ranks.world
    dist.all_gather_object(failures, failure)
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        raise SharedError(first)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Shares and gathering
# ----------------------------------------------------------------------------------------------------------------

def shard(rows: np.ndarray) -> np.ndarray:
    """This rank's contiguous part of `rows` (parts differ in length by at most one; rank order = row order)."""
    ranks = current()
    return rows if not ranks.active else np.array_split(np.asarray(rows), ranks.world)[ranks.rank]


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every rank's `local` values (its `shard` of some rows), concatenated in rank order: the values for all the
    rows, on every rank."""
    ranks = current()
    if not ranks.active:
        return local
    device = _collective_device()
    values = torch.as_tensor(np.ascontiguousarray(local), device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([len(values)], device=device))
    longest = int(max(size.item() for size in sizes))
    padded = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype, device=device)
    padded[:len(values)] = values
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(size.item())] for part, size in zip(parts, sizes)]).cpu().numpy()


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks (a new tensor; `tensor` itself unchanged)."""
    if not current().active:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def copy_from_main(tensors) -> None:
    """Overwrite `tensors` on every rank with rank 0's values, in place (e.g. BatchNorm statistics, which each rank
    updates from its own share of the batch)."""
    if not current().active:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def average_across_ranks(tensors) -> None:
    """Replace each floating tensor by its mean over the ranks, in place."""
    ranks = current()
    if not ranks.active:
        return
    for tensor in tensors:
        if tensor.is_floating_point():
            dist.all_reduce(tensor.data)
            tensor.data /= ranks.world
