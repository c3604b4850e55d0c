"""The anchored closed-form fit (AA-SVD's fit of each matrix to the original outputs), sequential
within the layer.

A linear W of the original model sees inputs X (in x tokens, the reference stream: the original
layer's module inputs on the original model's activations); after the layers below (and the
groups before it in this layer) were compressed, its low-rank replacement sees X' (the
compressed stream). The fit
    min_{rank(W') <= r} ||W X - W' X'||_F^2
expands, with the Gram G' = X' X'^T and the cross Gram C = X X'^T, to
    ||W X||^2 - 2 tr(W C W'^T) + tr(W' G' W'^T).
Take any S' with S' S'^T = G' (the whitening factor of the compressed inputs). Completing the
square,
    tr(W' G' W'^T) - 2 tr(W C W'^T) = ||W' S' - W C S'^-T||_F^2 - ||W C S'^-T||_F^2,
so the problem is an unconstrained low-rank approximation of M = W C S'^-T in the variable
W' S' (rank r when W' is, S' being invertible): by Eckart-Young, W' S' = [M]_r and
    W' = [W C S'^-T]_r S'^-1.
With X' = X, C = G' and M = W S': exactly SVD-LLM's whitened truncation. AA-SVD's anchor a
interpolates the target: C -> a C + (1 - a) G', which is the same fit against the outputs
a W X + (1 - a) W X' (a = 0: the compressed stream's own outputs W X', i.e. plain whitening on the
compressed stream; a = 1: the original outputs). The optimum's error is
    ||W X||^2 - ||[M]_r||^2   (for a = 1),
and the recorded fit errors are ||W X - W' X'||_F^2 before and after from the Grams alone.

A singular G' (fewer tokens than columns, dead channels) is shifted as in the whitening
(utils.whitening.cholesky_factor) or its eigenvalues floored (eigen); the factor then whitens
G' + shift I, a ridge on the fit.

Within the layer the matrices are refit in the order the layer runs them, one group sharing an
input at a time (q/k/v, then o on the refit attention's outputs, then gate/up, then down): each
group's X' is collected after the groups before it were refit, its X from the original layer on
the reference stream. The factors of the decomposition are replaced; ranks are unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from component import LowRankLinear, largest_entry_fits
from methods.closed_form import UpdateSlot, execution_groups, holdout_split
from methods.method import Flag, FlagError, Method, PassInputs
from utils.decompose import exact_svd
from utils.layerwise import LayerContext
from utils.model import linear_units, set_submodule
from utils.whitening import WhiteningFactor, whitening_factor

# From bench_refine (SmolLM2-135M, held-back WikiText-2, 8 fit windows; scripts/results/bench_refine/,
# docs/refinement.md): alpha 1 was the only setting that beat whitening (60% removed: 0.83x its
# perplexity, alpha 0: 0.99x); at 20% removed every alpha measured was worse than whitening.
DEFAULT_ANCHOR_ALPHA = 1.0
# The fit overfits few windows (docs/refinement.md: 8 fit windows made anchored + block worse than
# block alone), so by default each matrix's fit is kept only where it lowers the error on a held-out
# quarter of the windows, as the closed-form update's is.
DEFAULT_ANCHOR_HOLDOUT = 0.25


def holdout_problem(nsamples: int, fraction: float) -> str | None:
    """Why `fraction` of `nsamples` windows cannot gate the fit (None when it can): the gate needs at
    least one held-out window and two to fit on."""
    if fraction == 0:
        return None
    fit, held = holdout_split(nsamples, fraction)
    if len(held) >= 1 and len(fit) >= 2:
        return None
    return (f"the anchored fit's held-out gate (fraction {fraction:g}) needs at least 3 windows (2 to fit, 1 held "
            f"out), got {nsamples}: give more --updating_nsamples, or --anchor_holdout 0 to keep every fit ungated")


@dataclass
class AnchoredOptions(UpdateSlot):
    nsamples: int = 16  # calibration windows (of those the walk carries, the first)
    alpha: float = DEFAULT_ANCHOR_ALPHA  # 0: fit the compressed stream's own outputs, 1: the original outputs
    whitening: str = "cholesky"  # factor of G' (cholesky | eigen)
    svd_dtype: torch.dtype = torch.float32  # the SVD's own precision, as the decomposition's; products float64
    svd_driver: str = "auto"
    holdout_fraction: float = DEFAULT_ANCHOR_HOLDOUT  # of the windows, held out to accept or refuse each fit (0: always taken)

    def __post_init__(self):
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction {self.holdout_fraction}: must be in [0, 1)")
        problem = holdout_problem(self.nsamples, self.holdout_fraction)
        if problem:
            raise ValueError(problem)

    def split(self, nsamples: int) -> tuple[range, range]:
        """(fit windows, held-out windows): the held-out ones are the last; none when f is 0."""
        if self.holdout_fraction == 0:
            return range(nsamples), range(nsamples, nsamples)
        return holdout_split(nsamples, self.holdout_fraction)

    def to_dict(self) -> dict:
        return {"method": "anchored", "nsamples": self.nsamples, "alpha": self.alpha, "whitening": self.whitening,
                "svd_dtype": str(self.svd_dtype).replace("torch.", ""), "holdout_fraction": self.holdout_fraction}

    def make_pass(self, inputs: PassInputs) -> "AnchoredUpdate":
        return AnchoredUpdate(self, inputs.records)


def _solve_right_transpose(whitening: WhiteningFactor, matrix: torch.Tensor) -> torch.Tensor:
    """M S^-T (float64) without forming the inverse."""
    matrix = matrix.to(torch.float64)
    if whitening.method == "cholesky":  # S lower: solve X S^T = M with S^T upper
        return torch.linalg.solve_triangular(whitening.factor.T, matrix, upper=True, left=False)
    # S = Q diag(sqrt l)  =>  S^-T = Q diag(1/sqrt l)
    return (matrix @ whitening.eigvecs) / whitening.eigvals.sqrt()


@dataclass
class AnchoredFit:
    u: torch.Tensor  # out x r, float64
    v: torch.Tensor  # r x in, float64
    fallback: bool  # G' had to be shifted / floored


def anchored_factors(weight: torch.Tensor, rank: int, gram_compressed: torch.Tensor, cross_gram: torch.Tensor,
                     alpha: float = 1.0, whitening: str = "cholesky", svd_dtype: torch.dtype = torch.float64,
                     svd_driver: str = "auto") -> AnchoredFit:
    """u, v with u v = [W C_a S'^-T]_r S'^-1, C_a = alpha C + (1 - alpha) G' (see module docstring).

    weight: W (out x in); gram_compressed: G' = X' X'^T; cross_gram: C = X X'^T (in x in, rows:
    the original inputs' channels, columns: the compressed inputs')."""
    gram = gram_compressed.to(torch.float64)
    gram = (gram + gram.T) / 2
    factor = whitening_factor(gram, whitening)
    anchored = alpha * cross_gram.to(torch.float64) + (1.0 - alpha) * gram
    target = _solve_right_transpose(factor, weight.to(torch.float64) @ anchored)
    u, sigma, vh = exact_svd(target.to(svd_dtype), rank, svd_driver)
    root = sigma.to(torch.float64).sqrt()
    u = u.to(torch.float64) * root
    v = factor.right_solve(root[:, None] * vh.to(torch.float64))
    return AnchoredFit(u, v, factor.fallback)


def fit_error(weight: torch.Tensor, product: torch.Tensor, gram_original: torch.Tensor,
              gram_compressed: torch.Tensor, cross_gram: torch.Tensor) -> float:
    """||W X - W' X'||_F^2 = tr(W G W^T) - 2 tr(W C W'^T) + tr(W' G' W'^T), from the Grams."""
    w, p = weight.to(torch.float64), product.to(torch.float64)
    return float(((w @ gram_original.to(torch.float64)) * w).sum() - 2 * ((w @ cross_gram.to(torch.float64)) * p).sum()
                 + ((p @ gram_compressed.to(torch.float64)) * p).sum())


@contextmanager
def original_linears(layer: nn.Module, low_rank: dict[str, LowRankLinear], originals: dict[str, torch.Tensor]):
    """The layer with its original dense matrices back in place of `low_rank` (sharing the
    original weight tensors and the biases the low-rank modules carry), restored on exit."""
    for name, module in low_rank.items():
        weight = originals[name]
        dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        dense.bias = module.u.bias
        set_submodule(layer, name, dense)
    try:
        yield
    finally:
        for name, module in low_rank.items():
            set_submodule(layer, name, module)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """A module's input as tokens x in, float64."""
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


class AnchoredUpdate:
    needs_activations = True
    needs_reference = True
    reads_original_weights = True

    def __init__(self, options: AnchoredOptions, records: dict | None = None):
        self.options = options
        self.records = records if records is not None else {}

    def __call__(self, context: LayerContext) -> None:
        originals = context.scratch.get("original_weights", {})
        low_rank = {n: m for n, m in linear_units(context.layer, (LowRankLinear,)).items() if n in originals}
        if not low_rank:
            return
        windows = range(min(self.options.nsamples, context.num_windows))
        fit_windows, held_windows = self.options.split(len(windows))
        groups = execution_groups(context, low_rank)
        # the original layer's inputs of every group at once (they do not change as groups are refit)
        with original_linears(context.layer, low_rank, originals):
            firsts = {g[0]: context.layer.get_submodule(g[0]) for g in groups}
            reference = context.first_inputs(firsts, windows, reference=True)
        for group in groups:
            modules = {n: low_rank[n] for n in group}
            first = group[0]
            fit_grams = self._grams(context, reference, first, low_rank[first], fit_windows)
            held_grams = self._grams(context, reference, first, low_rank[first], held_windows) if len(held_windows) else None
            for name, module in modules.items():
                self._refit(context, name, module, originals[name], *fit_grams, held=held_grams)

    @staticmethod
    def _grams(context: LayerContext, reference: list[dict[str, torch.Tensor]], first: str, module: LowRankLinear,
               windows: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G, G', C) in float64 over `windows` of the group whose first module is `first`: its
        original inputs X from `reference`, its compressed inputs X' collected now (after the groups
        before it were refit)."""
        width = module.in_features
        gram, gram_c, cross = (torch.zeros(width, width, dtype=torch.float64, device=context.device) for _ in range(3))
        for window in windows:
            x = _tokens(reference[window][first])
            x_c = _tokens(context.first_inputs({first: module}, range(window, window + 1))[0][first])
            gram += x.T @ x
            gram_c += x_c.T @ x_c
            cross += x.T @ x_c
        return gram, gram_c, cross

    def _refit(self, context: LayerContext, name: str, module: LowRankLinear, weight: torch.Tensor,
               gram: torch.Tensor, gram_c: torch.Tensor, cross: torch.Tensor,
               held: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        options = self.options
        before = fit_error(weight, module.weight_product, gram, gram_c, cross)
        fit = anchored_factors(weight, module.rank, gram_c, cross, options.alpha, options.whitening,
                               options.svd_dtype, options.svd_driver)
        after = fit_error(weight, fit.u @ fit.v, gram, gram_c, cross)
        reference = float(((weight.to(torch.float64) @ gram) * weight.to(torch.float64)).sum())
        fits, _ = largest_entry_fits(module.u.weight.dtype, fit.u, fit.v)
        held_errors = None
        if held is not None:  # [the replaced factors', the fit's] error on windows the fit did not see
            held_errors = [fit_error(weight, module.weight_product, *held), fit_error(weight, fit.u @ fit.v, *held)]
        # not taken: factors the layer's dtype cannot hold (fp16 tops out at 65504), or a fit that does
        # worse on the held-out windows than the factors it would replace
        applied = fits and (held_errors is None or held_errors[1] < held_errors[0])
        if applied:
            module.u.weight.data.copy_(fit.u.to(module.u.weight.dtype))
            module.v.weight.data.copy_(fit.v.to(module.v.weight.dtype))
        kept = after if applied else before
        record = {"alpha": options.alpha, "applied": applied, "whitening_fallback": fit.fallback,
                  "fit_error": [before, kept],
                  "relative_fit_error": [(before / reference) ** 0.5 if reference > 0 else 0.0,
                                         (kept / reference) ** 0.5 if reference > 0 else 0.0]}
        if held_errors is not None:
            record["holdout_error"] = held_errors
        self.records.setdefault(f"{context.name}.{name}", {})["anchored"] = record


# ---------------------------------------------------------------------------------------- flags

# chosen by --update anchored (methods.closed_form declares --update and --updating_nsamples)
FLAGS = (
    Flag(("--anchor_alpha",), "anchor_alpha", "decomposition", type=float,
         help="--update anchored (AA-SVD's fit, docs/refinement.md): each matrix refit in data-flow order to "
              "alpha x the original model's outputs + (1 - alpha) x its own outputs on the compressed model's "
              "inputs; 0 = whitening on the compressed stream, 1 = the original outputs (default "
              f"{DEFAULT_ANCHOR_ALPHA:g}; what each alpha measured: docs/refinement.md)"),
    Flag(("--anchor_holdout",), "anchor_holdout", "decomposition", type=float,
         help="--update anchored: hold out this fraction of the --updating_nsamples windows and keep each "
              "matrix's fit only where it lowers the error on them, as the closed-form update does "
              f"(default {DEFAULT_ANCHOR_HOLDOUT:g}; needs at least 3 windows; 0: every fit kept, ungated). "
              "The fit overfits few windows: docs/refinement.md"),
)


def check_flags(values: dict) -> dict:
    """The anchored fit's numbers, and its flags refused without --update anchored."""
    import math
    update, alpha, holdout = values["update"], values["anchor_alpha"], values["anchor_holdout"]
    if alpha is not None:
        if update != "anchored":
            raise FlagError(f"--anchor_alpha is for --update anchored (got --update {update})")
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise FlagError(f"--anchor_alpha {alpha}: must be in [0, 1] (0 = whitening on the compressed "
                            f"stream, 1 = fit the original outputs)")
    if holdout is not None and update != "anchored":
        raise FlagError(f"--anchor_holdout is for --update anchored (got --update {update})")
    if update != "anchored":
        return {}
    if holdout is None:
        holdout = DEFAULT_ANCHOR_HOLDOUT
    if not (math.isfinite(holdout) and 0.0 <= holdout < 1.0):
        raise FlagError(f"--anchor_holdout {holdout}: a fraction in [0, 1), e.g. 0.25")
    problem = holdout_problem(values["updating_nsamples"], holdout)
    if problem:
        raise FlagError(problem)
    return {"anchor_holdout": holdout}


def options_from_flags(values: dict) -> AnchoredOptions:
    from utils.model import DTYPES
    alpha = DEFAULT_ANCHOR_ALPHA if values["anchor_alpha"] is None else values["anchor_alpha"]
    return AnchoredOptions(nsamples=values["updating_nsamples"], alpha=alpha,
                           whitening="eigen" if values["whitening"] == "eigen" else "cholesky",
                           svd_dtype=DTYPES[values["svd_dtype"]], svd_driver=values["svd_driver"],
                           holdout_fraction=values["anchor_holdout"])


def summary(compression: dict) -> str | None:
    update = compression.get("update") or {}
    if update.get("method") != "anchored":
        return None
    kept = sum(r.get("anchored", {}).get("applied", False) for r in compression["modules"].values())
    gate = update.get("holdout_fraction")
    return (f"update: anchored fit (alpha {update['alpha']:g}) kept for {kept} of {len(compression['ranks'])} matrices"
            + (f" (each kept only where it lowered the error on the held-out {gate:g} of the windows)" if gate
               else " (ungated: --anchor_holdout 0)"))


def label(record: dict) -> str:
    update = record.get("update") or {}
    return f"+anchored(alpha={update['alpha']:g})" if update.get("method") == "anchored" else ""


METHOD = Method("anchored", FLAGS, options_from_flags, check_flags, selector="update", summary=summary, label=label)
