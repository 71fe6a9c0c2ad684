"""The pruning layer: decide what to remove and hold it as reversible masks.

    pruner = Pruner(model, example_inputs, criterion="l1", granularity="channel", sparsity=0.5)
    pruner.step()                 # masks applied (parametrizations): same shapes, zeros
    pruner.sparsity_report()      # per layer: target, actual sparsity, units removed
    pruner.remove() / bake()      # un-prune / make permanent

``criteria`` is the registry of importance scores (``criteria.available()``, ``criteria.describe()``);
``calibration`` collects what data-dependent criteria need over ``calib`` with hooks; ``chains`` follows a
layer's channels to its feature map and its consumer; ``masks`` turns scores into keep-masks per
granularity and holds them on modules (``apply_mask``, ``remove_masks``, ``bake_masks``,
``load_masked_state_dict``); ``schedules`` (``OneShot``, ``Iterative``, ``AGP``); ``cost`` (parameters and
FLOPs after physical removal); ``distributed`` (DDP replicas, sharded global thresholds); ``methods``
(slimming, lottery tickets, alpha-blending, low rank, width search, dynamic gates).
"""

from . import calibration, chains, cost, criteria, distributed, masks, methods, schedules
from .masks import (
    GRANULARITIES,
    WeightMask,
    apply_mask,
    bake_masks,
    get_masks,
    global_keep,
    is_masked,
    layer_mask,
    load_masked_state_dict,
    nm_keep,
    remove_masks,
)
from .pruner import SCOPES, Pruner
from .schedules import AGP, Iterative, OneShot

__all__ = ["Pruner", "criteria", "masks", "schedules", "calibration", "chains", "cost", "distributed", "methods",
           "OneShot", "Iterative", "AGP", "GRANULARITIES", "SCOPES", "WeightMask", "apply_mask", "bake_masks",
           "get_masks", "global_keep", "is_masked", "layer_mask", "load_masked_state_dict", "nm_keep",
           "remove_masks"]
