"""torch.distributed set-up for `torchrun`: gloo on CPU, nccl on GPUs. One process = one rank."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hivlp.device import pick_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world <= 1:
        return DistInfo(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def split_sizes(n: int, world_size: int) -> list[int]:
    """Rows of an n-row global batch per rank: contiguous slices whose sizes differ by at most one."""
    return [n // world_size + (r < n % world_size) for r in range(world_size)]


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; the backward returns this rank's rows' gradient.

    Every rank computes the same loss over the gathered batch, so the gradient of the whole objective
    with respect to a row is the sum over ranks of that same gradient: world_size times the local one.
    DDP then averages parameter gradients over ranks, which gives exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.rows = sizes, rank, x.shape[0]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: sizes[rank]] = x[: sizes[rank]]
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, n = sum(ctx.sizes[: ctx.rank]), ctx.sizes[ctx.rank]
        out = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        out[:n] = grad[start : start + n] * len(ctx.sizes)
        return out, None, None


def gather_rows(x: torch.Tensor, info: DistInfo, sizes: list[int]) -> torch.Tensor:
    """The global batch's rows from every rank's `x` (its first sizes[rank] rows), differentiable."""
    if not info.enabled:
        return x
    return _GatherRows.apply(x, tuple(sizes), info.rank)
