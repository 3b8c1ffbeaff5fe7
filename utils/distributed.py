"""DistributedDataParallel helpers: torchrun's environment variables, with a one-process fallback."""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def init_distributed(device: torch.device, timeout_minutes: float | None = None) -> Dict[str, int]:
    """Initialise the process group when launched by torchrun (RANK/WORLD_SIZE set), else do nothing.

    Returns {"rank", "world_size", "local_rank"}. nccl on CUDA, gloo on CPU. Multi-node works through
    torchrun's own flags (--nnodes, --rdzv_endpoint ...) since they only set these variables.
    timeout_minutes (``--dist_timeout``): how long a collective waits for the slowest process before
    it fails (None: torch's default, 10 minutes for nccl).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return {"rank": 0, "world_size": 1, "local_rank": 0}
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        timeout = None if timeout_minutes is None else datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, timeout=timeout)
        logger.info(
            "initialised %s process group: rank %d of %d (timeout %s)", backend, rank, world_size, timeout
        )
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def reduce_dict(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Average a dict of scalar tensors over all ranks (for logging; the gradients are DDP's job)."""
    if not is_distributed():
        return values
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    dist.all_reduce(stacked)
    stacked /= get_world_size()
    return dict(zip(names, stacked))


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on every rank (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def all_gather_object(obj):
    """Gather any picklable object from every rank into a list (rank order)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a collective: every rank must call it)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shard_range(num_items: int, rank: int | None = None, world_size: int | None = None) -> List[int]:
    """The contiguous block of ``range(num_items)`` that ``rank`` evaluates: blocks in rank order
    concatenate to the whole range, so gathered per-rank results are in dataset order, as with one
    process. Sizes differ by at most one."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(range(rank * num_items // world_size, (rank + 1) * num_items // world_size))


def gather_lists(items: List[Any]) -> List[Any] | None:
    """Every rank's ``items`` concatenated in rank order on rank 0 (None elsewhere); ``items`` itself
    in a single process. A collective: every rank must call it."""
    if not is_distributed():
        return items
    gathered = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return None if gathered is None else [x for part in gathered for x in part]


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
