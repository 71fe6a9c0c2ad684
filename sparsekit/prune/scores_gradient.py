"""Sensitivity criteria from gradients over ``calib`` (``(input, target)`` pairs, ``loss_fn``).

An attention head is scored through a gate ``g_h = 1`` on its output (``head_taps``): ``taylor`` gives the
mean over batches of ``(d loss / d g_h)**2 = (sum of out_h * d loss / d out_h)**2`` (Molchanov et al. 2019's
group form; the head importance of Michel et al. 2019), ``hessian`` the gate's ``|H_hh|`` (Hutchinson)."""

from __future__ import annotations

from torch import Tensor, nn

from .calibration import LayerContext
from .criteria import register

__all__ = ["taylor", "hessian"]


@register("taylor", needs=("grads",), doc="first-order Taylor estimate of the loss change, (g*w)^2 per weight "
                                          "and (sum of g*w over the filter)^2 per channel, averaged over "
                                          "batches (Molchanov et al. 2019, 'Importance Estimation for Neural "
                                          "Network Pruning')")
def taylor(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Element granularity: mean over batches of (g_i w_i)^2. Channel granularity: mean over batches of
    (sum over the filter of g_i w_i)^2, the group form (Molchanov et al. 2019, eq. 7-8)."""
    batches = ctx.stat("batches")
    if ctx.granularity == "channel":
        return ctx.stat("taylor_chan") / batches
    return ctx.stat("taylor_elem") / batches


@register("hessian", needs=("hessian",), doc="second order: OBD saliency h_ii w_i^2 / 2 with the diagonal "
                                             "Fisher for h_ii per element (LeCun et al. 1989, 'Optimal Brain "
                                             "Damage'); per channel the HAP sensitivity |Tr(H_c)| / n_c * "
                                             "||w_c||^2 with a Hutchinson trace (Yu et al. 2022, 'Hessian-Aware "
                                             "Pruning and Optimal Neural Implant')")
def hessian(module: nn.Module, ctx: LayerContext) -> Tensor:
    """Element granularity: 0.5 * F_ii * w_i^2, F the empirical diagonal Fisher (mean over the calibration
    samples of g_i^2, g_i the gradient of sample i's own loss; LeCun et al. 1989), so it does not depend on
    how ``calib`` is batched. Channel granularity: |Tr(H_c)| / n_c * ||w_c||^2 with Tr(H_c) summed from the
    Hutchinson estimate E[v * Hv] of the Hessian diagonal (Rademacher v, one per batch; Yu et al. 2022).
    The trace's absolute value is used because a few samples can leave it slightly negative."""
    w = module.weight.detach().double()
    if ctx.granularity == "channel":
        diag = ctx.stat("hutchinson") / ctx.stat("batches")
        rows = w.reshape(w.shape[0], -1)
        trace = diag.reshape(w.shape[0], -1).sum(1)
        return trace.abs() / rows.shape[1] * rows.square().sum(1)
    return 0.5 * (ctx.stat("fisher") / ctx.stat("samples")) * w.square()
