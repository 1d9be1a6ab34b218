"""Where training runs: the process group (torchrun), the device, mixed precision and peak memory."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from stadapter.devices import native_bf16


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def env_rank() -> int:
    """This process's rank as torchrun sets it (0 when run alone), readable before the group exists."""
    return int(os.environ.get("RANK", "0"))


def setup_dist(requested: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = requested.startswith("cuda") or (not requested and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asked for CUDA but torch sees no GPU")
    if want_cuda:
        device = torch.device("cuda", local) if world > 1 or not requested else torch.device(requested)
        if device.index is None:  # plain "cuda": set_device needs an index (it raised ValueError before any GPU work)
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        if not want_cuda:  # share the cores between the processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(rank, world, local, device)


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if native_bf16(device) else torch.float16


def grad_scaler(dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """A loss scaler for fp16; for every other dtype a disabled one, whose calls are no-ops
    (``scale`` returns the loss, ``step`` is ``optimizer.step()``), so the loop has no branches."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
