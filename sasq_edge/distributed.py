"""Data-parallel scale training over the processes ``accelerate launch`` or ``torchrun`` starts.

Every process (rank) holds the whole model. What is decided once (the training windows,
SmoothQuant's alpha and factors, the calibrated scales, the held-out perplexities) is computed on
rank 0 and broadcast, so every rank starts training from the same bits whatever its kernels do;
the other ranks wait meanwhile. Each training step then draws ``batch_size x world`` window
indices with the same seeded generator on every rank, and rank ``r`` trains on the ``r``-th run
of ``batch_size`` of them (``rank_slice``): one process with batch ``B * N`` draws exactly the
same indices and trains on all of them. The gradients of the trained parameters are averaged
over the ranks (one all-reduce a step), so every rank takes the same Adam step; rank 0 alone
writes the run folder.

A single process (no ``WORLD_SIZE`` in the environment, or 1) is ``SINGLE``: every method below
is then a no-op, and ``torch.distributed`` is never imported. Nothing here imports accelerate:
its launcher only sets the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) that ``torch.distributed`` reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from sasq_edge.errors import ConfigError

TIMEOUT = timedelta(minutes=30)  # a rank waiting longer than this for the others fails instead of hanging


@dataclass(frozen=True)
class Group:
    """The ranks of one training run: this process's ``rank`` among ``world``, and the device
    collectives run on (``cpu`` for gloo, this rank's GPU for NCCL)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_slice(self, batch: int) -> slice:
        """Which of the ``batch * world`` indices drawn each step this rank trains on."""
        return slice(self.rank * batch, (self.rank + 1) * batch)

    def _flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).to(self.device, torch.float32) for t in tensors])

    @staticmethod
    @torch.no_grad()
    def _unflat(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape).to(t.device, t.dtype))
            offset += t.numel()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` (float32) on every rank with rank 0's values, in one collective."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = self._flat(tensors)
        dist.broadcast(flat, src=0)
        self._unflat(flat, tensors)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` run on rank 0 alone, its result on every rank (the others wait for it)."""
        return self.broadcast_object(compute() if self.is_main else None)

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace ``tensors`` on every rank with their mean over the ranks, in one collective."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = self._flat(tensors)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self._unflat(flat / self.world, tensors)

    def max_difference(self, tensors: Sequence[torch.Tensor]) -> float:
        """The largest difference between any rank's ``tensors`` and rank 0's (0.0 when they agree
        bit for bit), known to every rank."""
        if self.world == 1 or not tensors:
            return 0.0
        import torch.distributed as dist

        mine = self._flat(tensors)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        diff = (mine - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer: launch with accelerate launch or torchrun") from None


def launched_world() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return _env_int("WORLD_SIZE", 1)


def local_processes() -> int:
    """The processes of this run on this machine (``LOCAL_WORLD_SIZE``; 1 without a launcher):
    they share its memory."""
    return _env_int("LOCAL_WORLD_SIZE", launched_world())


def process_device(device: str) -> torch.device:
    """``device`` for this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` when a launcher started
    several processes (one GPU each)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and launched_world() > 1:
        dev = torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return dev


def init_from_env(device: torch.device) -> Group:
    """The group this process belongs to: ``SINGLE`` without a launcher; else the default
    ``torch.distributed`` process group, initialised here from the launcher's environment (gloo
    for CPU training, NCCL for GPUs) unless the caller already did."""
    world = launched_world()
    if world == 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: train in one process (no accelerate launch / torchrun)")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Group(dist.get_rank(), dist.get_world_size(), device if cuda else torch.device("cpu"))


def shutdown(group: Group) -> None:
    """Leave the process group ``init_from_env`` joined (no-op for ``SINGLE``)."""
    if group.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
