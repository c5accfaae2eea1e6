"""Several processes under torchrun: DDP (a replica per process) or FSDP (parameters, gradients and optimizer
state sharded across processes, for models that do not fit one GPU).

    torchrun --nproc_per_node 2 -m bitnet158 train --config run.yaml [--distributed fsdp]

Each process reads RANK, WORLD_SIZE and LOCAL_RANK from torchrun; CUDA processes use NCCL and GPU LOCAL_RANK,
CPU processes use gloo. Each process trains on its own slice of every global batch, so the global batch is
`batch_size x grad_accum x world_size` sequences and one step sees the same samples whatever the world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bitnet158.devices import resolve_device
from bitnet158.errors import UserError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of `value` over the processes."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor)
        return tensor


def init_world(device_name: str) -> World:
    """This process's place: alone, or one of torchrun's (the process group is started here)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process {rank} wants GPU {local_rank}; this machine has {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)  # fmt: skip
    return World(rank, size, device)


def wrap(model: nn.Module, world: World, kind: str) -> nn.Module:
    """DDP or FSDP around `model` (already on `world.device`); alone, the model itself."""
    if not world.active or kind == "none":
        return model
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder layer (gathered just before it runs, freed after), then the rest.
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
