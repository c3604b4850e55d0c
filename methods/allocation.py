"""Allocations that need the model: SVD-LLM V2's ranks from the whitened spectra, Duo-SVD's
knapsack DP over KL sensitivities, ASVD's binary search over sensitivities.

The spectra pass walks the layers without activations (like the decomposition pass) and keeps
the singular values of every whitened matrix W S (S from step 1's Grams). From them the
theoretical truncation loss of any rank is known without a forward pass:
L(r) = sqrt(sum_{i>r} sigma_i^2). v2_plan turns them into a plan with utils.allocate.
The sensitivity tables come from methods.sensitivity (one implementation for both metrics).

--allocation's methods are registered (methods.registry): uniform and v2 here, asvd and duo in
methods.sensitivity; each one's options (methods.method.AllocationOptions) say what the plan needs.

Every plan here meets utils.allocate's budget rule: params_after <= floor((1 - ratio) before),
at most 0.5% of the parameters more removed, no rank that does not shrink its matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.method import AllocationOptions, Flag, FlagError, Method, PlanInputs
from utils.allocate import (asvd_ranks, budget_for_ratio, kept_at_threshold, kept_to_ranks, knapsack_allocation,
                            matrix_params, meet_budget, ratios_to_ranks, removed_fraction, sensitivity_order,
                            threshold_search, type_groups, v2_ratios)
from utils.layerwise import LayerContext, walk_layers
from utils.model import target_linears, target_shapes
from utils.plan import ModulePlan, Plan, rank_for_ratio
from utils.stats import saved_gram
from utils.whitening import whitening_factor


def whitened_singular_values(target: torch.Tensor) -> torch.Tensor:
    """Singular values of T = W S (float64 in), descending, from the eigenvalues of the smaller Gram
    T T^T or T^T T (float64): the squares are what truncation losses need, and a symmetric
    eigenvalue solve of the smaller side costs a fraction of an SVD of T (no bidiagonalisation).
    Tiny negative round-off eigenvalues are clamped to 0; float64 keeps the discarded energy
    accurate to about 1e-16 of the largest squared singular value."""
    t = target.to(torch.float64)
    gram = t @ t.T if t.shape[0] <= t.shape[1] else t.T @ t
    eig = torch.linalg.eigvalsh(gram)
    return eig.clamp_min(0).flip(0).sqrt()


def whitened_gram_spectrum(weight: torch.Tensor, gram: torch.Tensor, whitening: str,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Singular values of W S (S S^T = H, the input Gram) without forming S where it can be avoided:
    for a wide or square W (m <= n), (W S)(W S)^T = W H W^T, so no factorisation of H at all; for a
    tall W (m > n), S^T (W^T W) S with S from the n x n factorisation (utils.whitening). Products in
    `dtype` (float32: about half the time of float64; the Gram's entries carry ~1e-7 relative
    error, far below the truncation losses v2 reads), the symmetric eigenvalue solve in float64.
    With a Cholesky fallback (H not positive definite) step 3 factors H + shift I; the m <= n route
    reads H itself, which differs by shift x ||W||_F^2 in the total energy (shift ~1e-6 mean(diag H))."""
    w = weight.to(dtype)
    m, n = w.shape
    if m <= n:
        g = w @ gram.to(dtype) @ w.T
    else:
        factor = whitening_factor(gram, whitening).factor.to(dtype)
        g = factor.T @ (w.T @ w) @ factor
    g = (g + g.T).to(torch.float64) / 2
    return torch.linalg.eigvalsh(g).clamp_min(0).flip(0).sqrt()


class Spectra:
    """Singular values (float64, CPU) of W S for every target matrix."""

    needs_activations = False
    needs_reference = False

    def __init__(self, stats, whitening: str = "cholesky", svd_dtype: torch.dtype = torch.float32,
                 method: str = "gram"):
        """method: gram (whitened_gram_spectrum: eigenvalues of the smaller whitened Gram) or
        svdvals (an SVD of W S in svd_dtype, what this pass did before; kept for the benchmark's
        comparison)."""
        if method not in ("gram", "svdvals"):
            raise ValueError(f"unknown spectra method {method!r}")
        self.stats, self.whitening, self.svd_dtype, self.method = stats, whitening, svd_dtype, method
        self.sigmas: dict[str, torch.Tensor] = {}

    def __call__(self, context: LayerContext) -> None:
        stats, streams = self.stats.layer(context.index)
        grams: dict = {}
        factors: dict = {}
        for name, linear in target_linears(context.layer).items():
            stream = streams[name]
            weight = linear.weight.detach().to(context.device)
            if stream not in grams:
                grams[stream] = saved_gram(stats, stream, context.device)
            if self.method == "gram":
                sigma = whitened_gram_spectrum(weight, grams[stream], self.whitening)
            else:
                if stream not in factors:
                    factors[stream] = whitening_factor(grams[stream], self.whitening)
                target = factors[stream].right_multiply(weight)
                sigma = torch.linalg.svdvals(target.to(self.svd_dtype)).double()
            self.sigmas[f"{context.name}.{name}"] = sigma.cpu()


def whitened_spectra(model: torch.nn.Module, stats, device: torch.device | str, whitening: str = "cholesky",
                     svd_dtype: torch.dtype = torch.float32, method: str = "gram") -> dict[str, torch.Tensor]:
    """name -> singular values of the whitened weight, one layer on `device` at a time."""
    spectra = Spectra(stats, whitening, svd_dtype, method)
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


# ---------------------------------------------------------------------------------------- Duo-SVD

def duo_plan(model_or_shapes, ratio: float, table, unit: int | None = None) -> tuple[Plan, dict]:
    """Duo-SVD's allocation (Pupu792/CPSVD utils/rank_search.py determine_optimal_ranks_dp): one
    choice per matrix among the table's candidate kept fractions (1.0 = dense), loss = KL of that
    choice minus KL of the base state (the reference's loss_base = the value at the uniform ratio),
    minimising the summed loss under the budget by utils.allocate.knapsack_allocation (real costs
    r (m + n), units under 0.1% of the budget, the backtrack in the forward pass's units). Then
    meet_budget fills the slack the candidate grid leaves (it only adds ranks, never going over),
    so the plan meets the budget rule; the reference instead picks the state closest to its
    target, which can overshoot it."""
    shapes = model_or_shapes if isinstance(model_or_shapes, dict) else target_shapes(model_or_shapes)
    base = table.base_value
    if base is None:
        raise ValueError("duo allocation needs a kl table with a base state (the uniform ratio)")
    options: dict[str, list[tuple[int, float]]] = {}
    choice_ranks: dict[str, list[int | None]] = {}
    for name, shape in shapes.items():
        row = table.values.get(name)
        if row is None:
            raise ValueError(f"the sensitivity table has no entry for {name}: measure it for this model")
        seen: dict[int | None, float] = {}
        for p, value in row.items():
            if not math.isfinite(value):
                raise ValueError(f"sensitivity of {name} at kept fraction {p:g} is {value}: not finite")
            rank = kept_to_ranks({name: shape}, {name: p})[name]
            seen[rank] = min(value, seen.get(rank, math.inf))
        if None not in seen:  # dense is always a choice (the reference adds it)
            seen[None] = base
        choice_ranks[name] = list(seen)
        options[name] = [(matrix_params(shape, r), seen[r] - base) for r in seen]
    budget = budget_for_ratio(shapes, ratio)
    chosen = knapsack_allocation(options, budget, unit)
    ranks = {name: choice_ranks[name][j] for name, j in chosen.items()}
    dp_removed = removed_fraction(shapes, ranks)
    dp_loss = sum(options[name][j][1] for name, j in chosen.items())
    sigmas = table.sigmas if table.sigmas and all(n in table.sigmas for n in shapes) else None
    ranks = meet_budget(shapes, ranks, ratio, sigmas=sigmas)
    plan = Plan({name: ModulePlan(m, n, bias, ranks[name]) for name, (m, n, bias) in shapes.items()}, ratio, "duo")
    detail = {"metric": table.metric, "base_state": table.key.get("base_state"), "base_kl": base,
              "predicted_kl_increase": dp_loss, "dp_removed_fraction": round(dp_removed, 6),
              "candidates": table.key.get("candidates"), "groups": rank_groups(shapes, ranks, ratio)}
    return plan, detail


# ---------------------------------------------------------------------------------------- ASVD

def asvd_plan(model_or_shapes, ratio: float, table) -> tuple[Plan, dict]:
    """ASVD's binary search (hahnyuan/ASVD4LLM binary_search.py) to --ratio by parameter count,
    under the budget rule (utils.allocate.asvd_ranks: ends on the feasible bound, never over, the
    grid's slack filled by meet_budget)."""
    shapes = model_or_shapes if isinstance(model_or_shapes, dict) else target_shapes(model_or_shapes)
    missing = [n for n in shapes if n not in table.values]
    if missing:
        raise ValueError(f"the sensitivity table has no entry for {missing[0]}: measure it for this model")
    sigmas = table.sigmas if table.sigmas and all(n in table.sigmas for n in shapes) else None
    ranks, record = asvd_ranks(shapes, {n: table.values[n] for n in shapes}, ratio, sigmas=sigmas)
    plan = Plan({name: ModulePlan(m, n, bias, ranks[name]) for name, (m, n, bias) in shapes.items()}, ratio, "asvd")
    return plan, {"metric": table.metric, "target": "ratio", **record, "groups": rank_groups(shapes, ranks, ratio)}


def asvd_ppl_plan(model_or_shapes, ppl_target: float, table, calibration_ppl) -> tuple[Plan, dict]:
    """ASVD's search to a perplexity target: the most compression (smallest threshold of the
    sensitivity order) whose REAL calibration perplexity, calibration_ppl(ranks) (the model
    compressed by those ranks), is below ppl_target. Ends on the feasible bound of the final
    bracket (utils.allocate.threshold_search), not on ASVD's last midpoint; every evaluated point
    is recorded. ValueError when even the uncompressed model misses the target."""
    shapes = model_or_shapes if isinstance(model_or_shapes, dict) else target_shapes(model_or_shapes)
    order = sensitivity_order({n: table.values[n] for n in shapes})
    names = list(shapes)
    evaluated: dict[int, dict] = {}

    def feasible(t: int) -> bool:
        ranks = kept_to_ranks(shapes, kept_at_threshold(order, names, t))
        ppl = float(calibration_ppl(ranks))
        evaluated[t] = {"ppl": ppl, "removed_fraction": round(removed_fraction(shapes, ranks), 6)}
        return math.isfinite(ppl) and ppl < ppl_target

    try:
        threshold, _ = threshold_search(len(order), feasible)
    except ValueError:
        raise ValueError(f"--ppl_target {ppl_target}: the uncompressed model's calibration perplexity is "
                         f"{evaluated[len(order)]['ppl']:.3f}, already above it; raise the target") from None
    ranks = kept_to_ranks(shapes, kept_at_threshold(order, names, threshold))
    removed = removed_fraction(shapes, ranks)
    plan = Plan({name: ModulePlan(m, n, bias, ranks[name]) for name, (m, n, bias) in shapes.items()},
                round(removed, 6), "asvd")
    return plan, {"metric": table.metric, "target": "ppl", "ppl_target": ppl_target, "threshold": threshold,
                  "choices": len(order), "calibration_ppl": evaluated[threshold]["ppl"],
                  "evaluations": {str(t): v for t, v in sorted(evaluated.items())},
                  "groups": rank_groups(shapes, ranks, None)}


def rank_groups(shapes: dict, ranks: dict, ratio: float | None) -> dict:
    """Per matrix type: uniform rank at `ratio`, min / max rank given, dense count (the record)."""
    out = {}
    for kind, names in type_groups(shapes).items():
        kept = [ranks[n] for n in names if ranks[n] is not None]
        m, n, _ = shapes[names[0]]
        out[kind] = {"uniform_rank": rank_for_ratio(m, n, ratio) if ratio else None,
                     "min_rank": min(kept, default=None), "max_rank": max(kept, default=None),
                     "dense": sum(ranks[x] is None for x in names)}
    return out


# ---------------------------------------------------------------------------------------- flags

GROUP = "decomposition"
FLAGS = (
    Flag(("--allocation",), "allocation", GROUP, default="uniform", selects=True, offers_none=False,
         help="step 2: uniform ranks; v2 = SVD-LLM V2's ranks from the whitened truncation losses (no "
              "forward pass); duo = Duo-SVD's knapsack DP over each matrix's KL sensitivity (the others at "
              "--ratio); asvd = ASVD's binary search over each matrix's sensitivity (the others dense) to "
              "--ratio or --ppl_target. All meet --ratio within 0.5%% of the matrices' parameters, never over"),
    Flag(("--rank_multiple",), "rank_multiple", GROUP, default=1, type=int,
         help="round every rank of the plan down to a multiple of N (8 / 16 / 64: the tiles of matmul "
              "kernels); the rounded plan never costs more parameters than the unrounded one"),
    Flag(("--strategy",), "strategy", GROUP, choices=("dp",),
         help="Duo-SVD's flag: --strategy dp = --allocation duo. Note Duo-SVD's --ratio is the fraction KEPT; "
              "here --ratio is the fraction removed: its --ratio 0.8 is --ratio 0.2 (or --param_ratio_target 0.8)"),
    Flag(("--param_ratio_target",), "param_ratio_target", GROUP, type=float,
         help="ASVD's flag: the fraction of the matrices' parameters KEPT, i.e. --ratio 1-P"),
    Flag(("--ppl_target",), "ppl_target", GROUP, type=float,
         help="asvd: search the most compression whose calibration perplexity (on the sensitivity "
              "windows, model really compressed with step 3's --whitening/--scaling, --alpha, "
              "--decomposition, --sigma_fuse, --svd_dtype; WITHOUT column preservation, update or "
              "refinement) stays below this; instead of --ratio. Step 3 measures the model it builds on "
              "the same windows and records it against the target (compression block: ppl_target)"),
)


def check_flags(values: dict) -> dict:
    """--ratio and its aliases (ASVD's --param_ratio_target, --model_ratio), Duo-SVD's --strategy,
    --rank_multiple: the sizes steps 2-3 read, so they are resolved first."""
    allocation, ratio, resolved = values["allocation"], values["ratio"], {}
    if values["strategy"] == "dp":
        if allocation not in ("uniform", "duo"):
            raise FlagError(f"--strategy dp is Duo-SVD's DP allocation: it contradicts --allocation {allocation}")
        resolved["allocation"] = "duo"
    kept = values["param_ratio_target"]
    if kept is not None:
        if not 0.0 < kept < 1.0:
            raise FlagError(f"--param_ratio_target {kept}: the fraction KEPT must be in (0, 1), "
                            f"e.g. 0.9 (= --ratio 0.1)")
        implied = round(1.0 - kept, 12)
        if ratio is not None and abs(ratio - implied) > 1e-9:
            raise FlagError(f"--param_ratio_target {kept} means --ratio {implied:g}; it "
                            f"contradicts --ratio {ratio}: give one of them")
        resolved["ratio"] = ratio = implied
    model_ratio = values["model_ratio"]
    if model_ratio is not None:
        if ratio is not None:
            raise FlagError(f"--model_ratio {model_ratio} (of the whole model) and "
                            f"{'--param_ratio_target' if kept is not None else '--ratio'} "
                            f"(per matrix) size the same thing: give one of them")
        if not 0.0 < model_ratio < 1.0:
            raise FlagError(f"--model_ratio {model_ratio}: the fraction of the whole model's parameters "
                            f"removed must be in (0, 1), e.g. 0.3")
        if not set(values.get("steps") or ()) & {2, 3}:
            raise FlagError("--model_ratio sizes the compression of steps 2-3: add --step 2 or 3, or leave it out")
    elif ratio is None:
        resolved["ratio"] = 0.2
    if values["rank_multiple"] < 1:
        raise FlagError(f"--rank_multiple {values['rank_multiple']}: give a positive whole number (1 leaves ranks "
                        f"as planned)")
    return resolved


METHOD = Method("allocation", FLAGS, check=check_flags, step=2)


@dataclass
class UniformOptions(AllocationOptions):
    """--allocation uniform: every matrix at --ratio (utils.plan.Plan.uniform)."""
    ratio: float

    def make_plan(self, inputs: PlanInputs) -> Plan:
        return Plan.uniform(target_shapes(inputs.model), self.ratio)


@dataclass
class V2Options(AllocationOptions):
    """--allocation v2: v2_plan over the whitened spectra of step 1's statistics (no forward pass)."""
    ratio: float
    max_shift: float = 0.15
    whitening: str = "cholesky"
    needs_stats = True
    needs_whitening = True

    def make_plan(self, inputs: PlanInputs) -> Plan:
        sigmas = whitened_spectra(inputs.model, inputs.stats, inputs.device, self.whitening)
        plan, plan.detail = v2_plan(inputs.model, self.ratio, sigmas, self.max_shift)
        return plan


def check_v2(values: dict) -> dict:
    shift = values["v2_max_shift"]
    if values["allocation"] == "v2" and 2 in (values.get("steps") or ()) and not 0.0 < shift < 1.0:
        raise FlagError(f"--v2_max_shift {shift}: must be in (0, 1), e.g. 0.15")
    return {}


UNIFORM = Method("uniform", options=lambda values: UniformOptions(values["ratio"]), selector="allocation", step=2)
# after the sensitivity flags (methods.sensitivity) in --help
V2_METHOD = Method("v2", (Flag(("--v2_max_shift",), "v2_max_shift", GROUP, default=0.15, type=float,
                               help="v2: the most a matrix's ratio may move from --ratio (default %(default)s)"),),
                   lambda values: V2Options(values["ratio"], values["v2_max_shift"], values["whitening"]),
                   check_v2, selector="allocation", step=2)
