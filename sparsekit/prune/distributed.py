"""Pruning under ``torch.distributed``: identical masks on every rank, global thresholds over all shards.

Two modes (``Pruner(distributed=...)``):

* ``"replicated"`` (the default for a ``DistributedDataParallel`` model): every rank holds the whole model.
  Calibration statistics are summed over ranks (each rank may see different ``calib`` batches; the result
  is that of the union), and rank 0's masks are broadcast, so every rank applies the same masks.
* ``"sharded"``: each rank prunes a different subset of the layers (e.g. parameters sharded by layer).
  For ``scope="global"`` the unit scores of all ranks are gathered, one threshold is taken over all of
  them (ties: lower rank, then execution order) and each rank applies its own part.

Any backend works (tests use gloo on CPU); collectives run on the default group unless ``group`` is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["MODES", "world_size", "rank", "check_mode", "unwrap", "reduce_stats", "broadcast_masks",
           "gather_scores"]

MODES = ("replicated", "sharded")


def world_size(group: Any = None) -> int:
    """World size of ``group``, 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank in ``group``, 0 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(inner module, True)`` for a DistributedDataParallel model, ``(model, False)`` otherwise."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, True
    return model, False


def check_mode(distributed: object, wrapped: bool) -> str | None:
    """Validate ``distributed``: None (auto: "replicated" for a DDP model when a group is up), or a mode."""
    if distributed is None:
        return "replicated" if wrapped and world_size() > 1 else None
    if distributed not in MODES:
        raise ValueError(f"distributed must be None, 'replicated' or 'sharded', got {distributed!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"distributed={distributed!r} needs torch.distributed to be initialised "
                         "(dist.init_process_group) before the Pruner is built")
    return str(distributed)


def reduce_stats(stats: Mapping[str, dict[str, Tensor]], group: Any = None) -> None:
    """Sum every statistic over the ranks in place (the ``gap`` samples are concatenated in rank order)."""
    if world_size(group) == 1:
        return
    for name in sorted(stats):
        for key in sorted(stats[name]):
            value = stats[name][key]
            if key == "gap":
                parts: list[Any] = [None] * world_size(group)
                dist.all_gather_object(parts, value.cpu(), group=group)
                stats[name][key] = torch.cat(parts).to(value.device)
            else:
                dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)


def broadcast_masks(masks: dict[str, Tensor], group: Any = None, src: int = 0) -> dict[str, Tensor]:
    """Every rank gets rank ``src``'s masks (same layer names and shapes on every rank are required)."""
    if world_size(group) == 1:
        return masks
    out = {}
    for name in sorted(masks):
        buf = masks[name].to(torch.uint8).contiguous()
        dist.broadcast(buf, src=src, group=group)
        out[name] = buf.to(torch.bool)
    return {name: out[name] for name in masks}


def gather_scores(scores: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]],
                  group: Any = None) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]], str]:
    """All ranks' ``scores`` and ``shapes`` merged under keys ``"<rank>:<name>"`` in rank order, and the
    prefix of this rank's keys."""
    mine = [(k, scores[k].detach().cpu(), tuple(shapes[k])) for k in scores]
    parts: list[Any] = [None] * world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    holders: dict[str, list[int]] = {}
    for r, part in enumerate(parts):
        for k, _, _ in part:
            holders.setdefault(k, []).append(r)
    shared = {k: rs for k, rs in holders.items() if len(rs) > 1}
    if shared:     # every rank sees the same parts: all of them raise, none waits for the others
        raise ValueError(f"distributed='sharded': layers {sorted(shared)[:5]} are pruned on several ranks "
                         f"({shared[sorted(shared)[0]]} for the first); each layer must belong to one rank "
                         "(ignore= it on the others), else its copies could get different masks")
    merged, merged_shapes = {}, {}
    for r, part in enumerate(parts):
        for k, s, shape in part:
            merged[f"{r}:{k}"] = s
            merged_shapes[f"{r}:{k}"] = shape
    return merged, merged_shapes, f"{rank(group)}:"
