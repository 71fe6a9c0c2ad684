"""Channel selection by reconstruction of the next layer: LASSO (He et al. 2017) and ThiNet (Luo et al. 2017).

Both look at the *consumer* ``Q`` of a layer's channels (``chains``): with ``X`` the consumer's (unfolded)
input and ``W`` its 2-D weight, channel ``c`` contributes ``Z_c = X_c W_c^T`` to ``Y = X W^T``. Everything
needed is the Gram matrix of the channel contributions,

    G[c, c'] = sum over rows and outputs of Z_c Z_c' = sum_{j in c, j' in c'} (X^T X)[j, j'] (W^T W)[j, j'],

computed from the ``gram`` statistic (``X^T X`` over sampled rows) without materialising ``Z``. After the
mask is applied the pruner refits ``Q`` on the kept channels by least squares (``refit_consumer``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .calibration import LayerContext, weight_param
from .criteria import register
from .masks import _mask_param

__all__ = ["channel_gram", "lasso_path_scores", "thinet_order", "refit_consumer", "lasso", "thinet",
           "LASSO_STEPS"]

LASSO_STEPS = 30


def _consumer_2d(ctx: LayerContext) -> Tensor:
    if ctx.consumer is None:
        raise ValueError(f"layer {ctx.name!r} has no consumer layer to reconstruct")
    w = ctx.consumer.weight.detach()
    return w.reshape(w.shape[0], -1).double()


def channel_gram(module: nn.Module, ctx: LayerContext) -> Tensor:
    """``G`` (``[C, C]``, float64) of the layer's ``C`` output channels as seen by its consumer."""
    m = ctx.stat("gram") / ctx.stat("rows")
    wq = _consumer_2d(ctx)
    c = module.weight.shape[0]
    k = wq.shape[1]
    if k % c or m.shape != (k, k):
        raise ValueError(f"consumer of {ctx.name!r} has {k} input columns, not a multiple of its {c} channels")
    g = k // c
    return (m * (wq.T @ wq)).reshape(c, g, c, g).sum(dim=(1, 3))


def lasso_path_scores(gram: Tensor, steps: int = LASSO_STEPS, iters: int = 200) -> Tensor:
    """Scores from the LASSO path of ``min_b 1/2 ||Y - sum_c b_c Z_c||^2 + lam ||b||_1`` (He et al. 2017).

    ``lam`` falls geometrically from the value where every ``b_c`` is 0 to 1e-4 of it (proximal gradient,
    warm started). A channel's score is the number of path points where it is selected, plus
    ``tanh(|b_c|)`` at the end to break ties: channels the LASSO drops first score lowest.
    """
    gram = gram.double()
    c = gram.shape[0]
    b = gram.sum(1)                                     # Z^T Y with Y = sum_c Z_c
    lam_max = b.abs().max()
    if c == 0 or float(lam_max) <= 0:
        return torch.zeros(c, dtype=torch.float64)
    lip = torch.linalg.eigvalsh(gram).max().clamp_min(1e-30)
    beta = torch.zeros(c, dtype=torch.float64)
    active = torch.zeros(c, dtype=torch.float64)
    step = 1.0 / lip
    for lam in lam_max * torch.logspace(0, -4, steps, dtype=torch.float64):
        for it in range(iters):
            z = beta - (gram @ beta - b) * step
            new = z.sign() * (z.abs() - lam * step).clamp_min(0.0)
            if it % 10 == 9 and bool((new - beta).abs().max() <= 1e-9 * (1.0 + float(beta.abs().max()))):
                beta = new
                break
            beta = new
        active += (beta != 0).double()
    return active + torch.tanh(beta.abs())


def thinet_order(gram: Tensor) -> Tensor:
    """ThiNet's greedy selection (Luo et al. 2017, Alg. 1): repeatedly remove the channel whose removal adds
    least to ``||sum_{removed} Z_c||^2``; score = the step at which a channel is removed (0 = first)."""
    gram = gram.double()
    c = gram.shape[0]
    score = torch.zeros(c, dtype=torch.float64)
    running = torch.zeros(c, dtype=torch.float64)     # sum over removed t of G[t, :]
    remaining = torch.ones(c, dtype=torch.bool)
    diag = gram.diagonal()
    for i in range(c):
        cost = torch.where(remaining, diag + 2.0 * running, torch.full_like(diag, float("inf")))
        pick = int(torch.argmin(cost))                # first minimum: ties go to the lower index
        score[pick] = float(i)
        remaining[pick] = False
        running += gram[pick]
    return score


@register("lasso", needs=("consumer",), reconstructs=True, comparable=False,
          doc="LASSO regression on the next layer's output selects channels, then least-squares "
              "reconstruction of the next layer (He et al. 2017, 'Channel Pruning for Accelerating Very "
              "Deep Neural Networks')")
def lasso(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Per channel: how long it survives along the LASSO path (``lasso_path_scores``), He et al. 2017.
    Scores are ranks within a layer, so global scope is refused."""
    return lasso_path_scores(channel_gram(module, ctx))


@register("thinet", needs=("consumer",), reconstructs=True, comparable=False,
          doc="greedy removal of the channels whose contribution to the next layer's output is smallest, "
              "then least squares (Luo et al. 2017, 'ThiNet: A Filter Level Pruning Method for Deep "
              "Neural Network Compression')")
def thinet(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Per channel: its position in ThiNet's greedy removal order (``thinet_order``), Luo et al. 2017."""
    return thinet_order(channel_gram(module, ctx))


@torch.no_grad()
def refit_consumer(keep: Tensor, ctx: LayerContext) -> None:
    """Least-squares refit of the consumer on the kept channels: ``W' = argmin ||X W^T - X_k W'^T||``.

    ``keep`` is the producer's channel keep-mask ``[C]``; columns of removed channels become 0, the kept
    ones solve ``(M_kk + r I) W_k'^T = M_k: W^T + r W_k^T`` with ``M = X^T X``: the small ridge ``r`` pulls towards
    the current weights, not towards 0, so directions the calibration data does not reach keep their weights
    (a Linear after a flatten has more inputs than calibration samples) and nothing changes when every channel
    is kept. The consumer's stored weight (the unmasked original if it is masked itself) is overwritten where
    the consumer does not mask it.
    """
    if ctx.consumer is None:
        raise ValueError(f"layer {ctx.name!r} has no consumer to refit")
    m = ctx.stat("gram") / ctx.stat("rows")
    wq = _consumer_2d(ctx)
    cols = keep.to(torch.bool).repeat_interleave(wq.shape[1] // keep.numel())
    if not bool(cols.any()) or bool(cols.all()):
        return
    mkk = m[cols][:, cols]
    r = 1e-6 * mkk.diagonal().mean().clamp_min(1e-12)
    ridge = r * torch.eye(mkk.shape[0], dtype=mkk.dtype)
    new = torch.zeros_like(wq)
    new[:, cols] = torch.linalg.solve(mkk + ridge, m[cols] @ wq.T + r * wq[:, cols].T).T
    param = weight_param(ctx.consumer)
    mask = _mask_param(ctx.consumer, "weight")
    if mask is not None:   # entries the consumer masks keep their stored values (un-pruning gives those back)
        new = torch.where(mask.mask.reshape(new.shape), new, param.detach().reshape(new.shape).to(new.dtype))
    param.copy_(new.reshape(param.shape).to(param.dtype))
