"""Training on several processes: torchrun starts one per GPU (or several on a CPU), each joins
the process group, and DistributedDataParallel averages their gradients at every step.

    torchrun --standalone --nproc_per_node=4 -m gpt.train

Launched without torchrun, a process is rank 0 of a world of size 1 and nothing here talks to
another process.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .cli import pick_device


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of size 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # index among the processes on this machine: which GPU to use
    local_size: int = 1  # processes on this machine: they share its cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0  # the one process that evaluates, logs and writes files

    def mean(self, value: torch.Tensor) -> float:
        """Average a 0-dim tensor over all processes. Waits for the device: call at log steps only."""
        if self.size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)  # SUM: gloo has no AVG
            value /= self.size
        return value.item()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if it is True on any: all processes must stop at the same step."""
        if self.size == 1:
            return flag
        value = torch.tensor(float(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, number: int, device: torch.device) -> int:
        """Rank 0's number on every process."""
        if self.size == 1:
            return number
        value = torch.tensor(number, device=device)
        dist.broadcast(value, src=0)
        return int(value.item())

    def barrier(self) -> None:
        """Wait for every process (rank 0 may still be saving; a rank that leaves early can abort gloo)."""
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1:
            dist.destroy_process_group()


def setup_world(device_name: str | None) -> tuple[World, torch.device]:
    """Join torchrun's process group when launched by it (it sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )
    device = pick_device(device_name, world.local_rank)
    if world.size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def wrap_for_training(model: nn.Module, world: World, device: torch.device, compile: bool) -> nn.Module:
    """The module the training steps call: torch.compile first, DDP around it (as in nanoGPT).

    Evaluation uses the plain model: only rank 0 evaluates, and DDP's forward expects every rank
    to take part; and compiling the evaluation's shapes (eval mode, a ragged last batch) would
    cost more than it saves.
    """
    trained = torch.compile(model) if compile else model
    if world.size > 1:
        # The adaptive head skips a cluster that no target of the batch falls in, leaving its
        # parameters without gradients, which DDP must be told to expect.
        trained = DDP(
            trained,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.config.head == "adaptive",
        )
    return trained
