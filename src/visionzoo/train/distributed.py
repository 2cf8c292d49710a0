"""Running the same training under `torchrun`: process group, device, and the few collectives used.

`torchrun --nproc-per-node N` sets RANK, WORLD_SIZE and LOCAL_RANK; with them (and N > 1)
`setup` joins the process group (nccl on GPUs, gloo on CPU). Without them everything here
degrades to single-process no-ops, so the training code has one path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when `setup` created the process group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Only this process writes files and prints."""
        return self.rank == 0


def setup(device: str | torch.device | None = None) -> Dist:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return Dist(device=dev)
    owns = False
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=local_rank, device=dev,
                owns_group=owns)


def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """"auto" (or None): this process's GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


def teardown(dist: Dist) -> None:
    if dist.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        tdist.barrier()


def all_reduce_sum(dist: Dist, values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over all processes (float64, on the backend's device)."""
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(dist))
    tdist.all_reduce(t)
    return t.tolist()


def broadcast_object(dist: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not dist.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=_comm_device(dist) if dist.device.type == "cuda" else None)
    return box[0]


def gather_rows(dist: Dist, rows: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble a tensor whose rows were computed strided (`rank::world`) on each process.

    Process r holds rows r, r + world, ...; every process gets all `total` rows in order.
    """
    if not dist.enabled:
        return rows
    per_rank = -(-total // dist.world)
    dev = _comm_device(dist)
    padded = torch.zeros((per_rank, *rows.shape[1:]), dtype=rows.dtype, device=dev)
    padded[: rows.shape[0]] = rows.to(dev)
    parts = [torch.empty_like(padded) for _ in range(dist.world)]
    tdist.all_gather(parts, padded)
    out = torch.empty((per_rank * dist.world, *rows.shape[1:]), dtype=rows.dtype, device=dev)
    for r, part in enumerate(parts):
        out[r::dist.world] = part
    return out[:total].to(rows.device)


def _comm_device(dist: Dist) -> torch.device:
    return dist.device if dist.device.type == "cuda" else torch.device("cpu")
