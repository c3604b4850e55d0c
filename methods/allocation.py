"""Allocations that need the model: SVD-LLM V2's ranks from the whitened spectra.

The spectra pass walks the layers without activations (like the decomposition pass) and keeps
the singular values of every whitened matrix W S (S from step 1's Grams). From them the
theoretical truncation loss of any rank is known without a forward pass:
L(r) = sqrt(sum_{i>r} sigma_i^2). v2_plan turns them into a plan with utils.allocate.
"""
from __future__ import annotations

import torch

from utils.allocate import meet_budget, ratios_to_ranks, type_groups, v2_ratios
from utils.layerwise import LayerContext, walk_layers
from utils.model import target_linears, target_shapes
from utils.plan import ModulePlan, Plan, rank_for_ratio
from utils.stats import saved_gram
from utils.whitening import whitening_factor


class Spectra:
    """Singular values (float64, CPU) of W S for every target matrix."""

    needs_activations = False
    needs_reference = False

    def __init__(self, stats, whitening: str = "cholesky", svd_dtype: torch.dtype = torch.float32):
        self.stats, self.whitening, self.svd_dtype = stats, whitening, svd_dtype
        self.sigmas: dict[str, torch.Tensor] = {}

    def __call__(self, context: LayerContext) -> None:
        stats, streams = self.stats.layer(context.index)
        factors: dict = {}
        for name, linear in target_linears(context.layer).items():
            stream = streams[name]
            if stream not in factors:
                factors[stream] = whitening_factor(saved_gram(stats, stream, context.device), self.whitening)
            target = factors[stream].right_multiply(linear.weight.detach().to(context.device))
            self.sigmas[f"{context.name}.{name}"] = torch.linalg.svdvals(target.to(self.svd_dtype)).double().cpu()


def whitened_spectra(model: torch.nn.Module, stats, device: torch.device | str, whitening: str = "cholesky",
                     svd_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """name -> singular values of the whitened weight, one layer on `device` at a time."""
    spectra = Spectra(stats, whitening, svd_dtype)
    walk_layers(model, None, device, spectra, desc="spectra", changes_weights=False)
    return spectra.sigmas


def truncation_loss(sigma: torch.Tensor, rank: int | None) -> float:
    """sqrt(sum_{i>rank} sigma_i^2): the layer's output error on the calibration data (0 dense)."""
    return 0.0 if rank is None else float(sigma[rank:].square().sum().sqrt())


def v2_plan(model: torch.nn.Module, ratio: float, sigmas: dict[str, torch.Tensor],
            max_shift: float | None = 0.15) -> tuple[Plan, dict]:
    """SVD-LLM V2: per-type ratios from the truncation losses at the uniform ratio (utils.allocate
    .v2_ratios), then ranks adjusted to meet the budget exactly. Returns the plan and a summary
    per matrix type (rank range against the uniform rank) for the record."""
    shapes = target_shapes(model)
    uniform = {name: rank_for_ratio(m, n, ratio) for name, (m, n, _) in shapes.items()}
    losses = {name: truncation_loss(sigmas[name], uniform[name]) for name in shapes}
    groups = type_groups(shapes)
    ratios = v2_ratios(groups, losses, ratio, max_shift)
    ranks = meet_budget(shapes, ratios_to_ranks(shapes, ratios), ratio,
                        sigmas={n: s.tolist() for n, s in sigmas.items()})
    plan = Plan({name: ModulePlan(m, n, bias, ranks[name]) for name, (m, n, bias) in shapes.items()},
                ratio, "v2")
    detail = {}
    for kind, names in groups.items():
        kept = [ranks[n] for n in names if ranks[n] is not None]
        detail[kind] = {"uniform_rank": uniform[names[0]], "min_rank": min(kept, default=None),
                        "max_rank": max(kept, default=None), "dense": sum(ranks[n] is None for n in names),
                        "mean_ratio": round(sum(ratios[n] for n in names) / len(names), 4)}
    return plan, {"max_shift": max_shift, "groups": detail}
