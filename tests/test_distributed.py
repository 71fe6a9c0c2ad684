"""Pruning under torch.distributed (gloo, CPU, 2 processes): DDP replicas get identical masks; sharded
layers share one global threshold over all ranks."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsekit import models
from sparsekit.prune import Pruner

WORLD = 2
SHARDS = {0: ["conv1", "conv2"], 1: ["fc1", "fc2"]}


def _model() -> models.LeNet5:
    torch.manual_seed(0)
    return models.LeNet5(image_size=8)


def _calib(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)                          # different weights per rank before DDP syncs them
        ddp = torch.nn.parallel.DistributedDataParallel(models.LeNet5(image_size=8))
        x = torch.randn(2, 1, 8, 8)
        p = Pruner(ddp, x, criterion="apoz", granularity="channel", sparsity=0.5, calib=_calib(rank))
        p.step()
        replicated = {k: v.clone() for k, v in p.masks.items()}
        # the weights the masks were chosen from (the training step below moves them)
        state = {k: v.detach().clone() for k, v in ddp.module.state_dict().items()}
        # one DDP training step keeps the masked weights at zero on every rank
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ddp(x).square().mean().backward()
        opt.step()
        zero_after_step = all(bool((ddp.module.get_submodule(k).weight.detach()[~m] == 0).all())
                              for k, m in replicated.items())

        model = _model()
        others = [k for r, names in SHARDS.items() if r != rank for k in names]
        q = Pruner(model, x, criterion="l1_mean", granularity="channel", scope="global", sparsity=0.6,
                   ignore=others + ["fc"], distributed="sharded")
        q.step()
        everything = [k for names in SHARDS.values() for k in names]
        # a rank holding none of the layers takes part with no scores (rank 1 here)
        lonely = Pruner(_model(), x, criterion="l1", granularity="channel", scope="global", sparsity=0.5,
                        ignore=(everything if rank == 1 else SHARDS[1]) + ["fc"], distributed="sharded")
        lonely.step()
        # the same with a gradient criterion: the empty rank differentiates nothing and still joins the gather
        y = torch.randint(0, 10, (2,))
        lonely_taylor = Pruner(_model(), x, criterion="taylor", granularity="channel", scope="global", sparsity=0.5,
                               calib=[(x, y)], ignore=(everything if rank == 1 else SHARDS[1]) + ["fc"],
                               distributed="sharded")
        lonely_taylor.step()
        try:      # a layer on both ranks: refused on both, neither waits for the other
            Pruner(_model(), x, criterion="l1", granularity="channel", scope="global", sparsity=0.5,
                   ignore=[k for k in everything if k != "conv1"] + ["fc"], distributed="sharded").step()
            shared = None
        except ValueError as e:
            shared = str(e)
        parts: list = [None] * WORLD
        dist.all_gather_object(parts, {"replicated": replicated, "sharded": q.masks, "zero": zero_after_step,
                                       "state": state, "lonely": lonely.masks, "shared": shared,
                                       "lonely_taylor": lonely_taylor.masks})
        if rank == 0:
            torch.save(parts, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), out), nprocs=WORLD, join=True)
        return torch.load(out, weights_only=False)


def test_ddp_replicas_get_identical_masks_from_all_ranks_data(results):
    a, b = results[0]["replicated"], results[1]["replicated"]
    assert a.keys() == b.keys() == {"conv1", "conv2", "fc1", "fc2"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results[0]["zero"] and results[1]["zero"]
    # the statistics were summed over both ranks' calib: same as one process seeing all the batches
    model = models.LeNet5(image_size=8)
    state = {k: v for k, v in results[0]["state"].items() if "mask" not in k and "original" not in k}
    state.update({k.replace("parametrizations.", "").replace(".original", ""): v
                  for k, v in results[0]["state"].items() if k.endswith(".original")})
    model.load_state_dict(state)
    single = Pruner(model, torch.randn(2, 1, 8, 8), criterion="apoz", granularity="channel", sparsity=0.5,
                    calib=_calib(0) + _calib(1))
    single.step()
    assert all(torch.equal(single.masks[k], a[k]) for k in a)


def test_sharded_global_threshold_spans_all_ranks(results):
    merged = {**results[0]["sharded"], **results[1]["sharded"]}
    assert set(results[0]["sharded"]) == set(SHARDS[0]) and set(results[1]["sharded"]) == set(SHARDS[1])
    model = _model()
    single = Pruner(model, torch.randn(2, 1, 8, 8), criterion="l1_mean", granularity="channel", scope="global",
                    sparsity=0.6)
    single.step()
    assert all(torch.equal(single.masks[k], merged[k]) for k in single.masks)
    # per-rank thresholds would differ: rank 0 alone would remove 60% of its own channels
    alone = Pruner(_model(), torch.randn(2, 1, 8, 8), criterion="l1_mean", granularity="channel",
                   scope="global", sparsity=0.6, ignore=SHARDS[1] + ["fc"])
    alone.step()
    assert any(not torch.equal(alone.masks[k], merged[k]) for k in SHARDS[0])


def test_a_rank_without_layers_and_a_layer_on_two_ranks(results):
    assert set(results[0]["lonely"]) == set(SHARDS[0]) and results[1]["lonely"] == {}
    assert set(results[0]["lonely_taylor"]) == set(SHARDS[0]) and results[1]["lonely_taylor"] == {}
    single = Pruner(_model(), torch.randn(2, 1, 8, 8), criterion="l1", granularity="channel", scope="global",
                    sparsity=0.5, ignore=SHARDS[1] + ["fc"])
    single.step()                      # rank 0 alone held every pruned layer: the same masks as one process
    assert all(torch.equal(single.masks[k], results[0]["lonely"][k]) for k in SHARDS[0])
    for r in range(WORLD):
        assert "pruned on several ranks" in results[r]["shared"] and "conv1" in results[r]["shared"]


def test_distributed_mode_needs_an_initialised_group():
    m = _model()
    with pytest.raises(ValueError, match="distributed='sharded' needs torch.distributed to be initialised"):
        Pruner(m, m.example_input(), distributed="sharded")
    with pytest.raises(ValueError, match="distributed must be None, 'replicated' or 'sharded'"):
        Pruner(m, m.example_input(), distributed="fsdp")
