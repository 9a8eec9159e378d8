"""sparsify: swap a model's nn.Linear / nn.Conv2d layers for block-sparse ones, in place."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

from torch import nn

from ._sparse_weight import check_sparsity
from .conv import SparseConv2d
from .linear import SparseLinear

DISTRIBUTIONS = ("uniform", "erk")


def _erk_raw_score(module: nn.Module) -> float:
    """RigL's Erdős–Rényi(-Kernel) score: (sum of the weight's dims) / (product of its dims)."""
    dims = module.weight.shape
    product = 1
    for d in dims:
        product *= d
    return sum(dims) / product


def layer_densities(modules: List[nn.Module], sparsity: float, distribution: str) -> List[float]:
    """Per-layer densities whose parameter-weighted mean is ``1 - sparsity``.

    ``erk``: density proportional to the ERK score, rescaled to the global budget; layers whose density
    would exceed 1 are made dense and the rest re-solved (as in RigL, Evci et al. 2020).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if distribution == "uniform":
        return [1.0 - sparsity] * len(modules)
    sizes = [m.weight.numel() for m in modules]
    scores = [_erk_raw_score(m) for m in modules]
    dense = set()
    while True:
        budget = (1.0 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)
        divisor = sum(scores[i] * sizes[i] for i in range(len(modules)) if i not in dense)
        eps = budget / divisor if divisor > 0 else 0.0
        overfull = {i for i in range(len(modules)) if i not in dense and eps * scores[i] > 1.0}
        if not overfull:
            return [1.0 if i in dense else eps * scores[i] for i in range(len(modules))]
        dense |= overfull


def sparsify(model: nn.Module, sparsity: float = 0.9, block_size: int = 32, distribution: str = "erk",
             filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replace the model's nn.Linear and nn.Conv2d layers by SparseLinear / SparseConv2d, in place.

    ``sparsity`` is the global fraction of zero weights over the chosen layers, spread by ``distribution``;
    ``filter_fn(module, qualified_name)`` returning False keeps a layer dense. Each layer keeps its
    largest-norm blocks (at least one); a layer whose density reaches 1 stays a dense torch layer.
    Returns the model.
    """
    check_sparsity(sparsity)
    chosen: Dict[str, nn.Module] = {
        name: module for name, module in model.named_modules()
        if type(module) in (nn.Linear, nn.Conv2d) and (filter_fn is None or filter_fn(module, name))
    }
    densities = layer_densities(list(chosen.values()), sparsity, distribution)
    if "" in chosen:
        raise ValueError("sparsify swaps layers inside a model; wrap a bare nn.Linear/nn.Conv2d in a container")
    for (name, module), density in zip(chosen.items(), densities):
        sparse_cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
        block_grid = _block_count(module, block_size)
        n_blocks = max(1, round(density * block_grid))
        if n_blocks >= block_grid:
            continue
        layer = sparse_cls.from_dense(module, sparsity=1.0 - n_blocks / block_grid, block_size=block_size)
        _set_submodule(model, name, layer)
    return model


def _block_count(module: nn.Module, block_size: int) -> int:
    out_dim = module.weight.shape[0]
    in_dim = module.weight[0].numel()  # Conv2d: kh * kw * in/groups
    return math.ceil(out_dim / block_size) * math.ceil(in_dim / block_size)


def _set_submodule(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
