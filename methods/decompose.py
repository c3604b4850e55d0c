"""The decomposition pass: whiten (cholesky / eigen / none) or scale (ASVD: abs_mean, abs_max,
fisher, fisher_abs_mean) and truncate (svd / rsvd) every matrix the plan makes low-rank,
replacing it by a LowRankLinear (or, with column preservation, a ColumnPreservedLinear).

Whitening and scaling use step 1's statistics of the original model (SVD-LLM, ASVD), so this
pass needs no activations: a walk with only this pass captures and runs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from component import LowRankLinear, column_preserved_from
from utils.column_preserve import column_preserved_factors
from utils.decompose import low_rank_factors
from utils.layerwise import LayerContext
from utils.model import set_submodule, target_linears
from utils.plan import Plan
from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES
from utils.stats import saved_gram
from utils.whitening import SCALING_METHODS, input_transform


class DecomposeError(ValueError):
    """Factors that cannot be stored (the message names the matrix and the fix)."""


@dataclass
class DecomposeOptions:
    whitening: str = "cholesky"  # cholesky (SVD-LLM) | eigen (SVD-LLM V2) | none (plain SVD)
    decomposition: str = "svd"  # svd | rsvd
    svd_dtype: torch.dtype = torch.float32  # the SVD's own precision; whitening is float64
    svd_driver: str = "auto"
    rsvd_oversamples: int = DEFAULT_OVERSAMPLES
    rsvd_n_iter: int = DEFAULT_N_ITER
    seed: int = 0  # randomized SVD's sketches
    scaling: str = "none"  # ASVD: none | abs_mean | abs_max | fisher | fisher_abs_mean (whitening none)
    alpha: float = 0.5  # ASVD: s = stat^alpha
    sigma_fuse: str = "UV"  # where Sigma goes: UV (sqrt into both), U or V
    column_preserve: bool = False  # Duo-SVD's column level (utils.column_preserve; needs whitening)

    def __post_init__(self) -> None:
        if self.scaling not in SCALING_METHODS:
            raise ValueError(f"unknown scaling {self.scaling!r}; choose one of {SCALING_METHODS}")
        if self.scaling != "none" and self.whitening != "none":
            raise ValueError(f"scaling {self.scaling} with whitening {self.whitening}: they are alternatives; pick one")
        if self.column_preserve and self.whitening == "none":
            raise ValueError("column preservation scores columns by their whitened error: it needs whitening")

    @property
    def needs_stats(self) -> bool:
        return self.whitening != "none" or self.scaling != "none"

    def to_dict(self) -> dict:
        out = {"whitening": self.whitening, "decomposition": self.decomposition,
               "svd_dtype": str(self.svd_dtype).replace("torch.", ""), "svd_driver": self.svd_driver,
               "scaling": self.scaling, "alpha": self.alpha if self.scaling != "none" else None,
               "sigma_fuse": self.sigma_fuse, "column_preserve": self.column_preserve}
        if self.decomposition == "rsvd":
            out["rsvd"] = {"oversamples": self.rsvd_oversamples, "n_iter": self.rsvd_n_iter, "seed": self.seed}
        return out


class Decompose:
    needs_activations = False
    needs_reference = False

    def __init__(self, plan: Plan, options: DecomposeOptions, stats=None, records: dict | None = None):
        """stats: a pipeline.steps.Statistics (required unless whitening and scaling are 'none');
        records: per-module dict the pass fills (rank, truncation loss, fallbacks)."""
        if options.needs_stats and stats is None:
            what = f"whitening {options.whitening!r}" if options.whitening != "none" else f"scaling {options.scaling!r}"
            raise ValueError(f"{what} needs the statistics of step 1")
        self.plan, self.options, self.stats = plan, options, stats
        self.records = records if records is not None else {}
        self.generator = torch.Generator().manual_seed(options.seed)

    def __call__(self, context: LayerContext) -> None:
        options, device = self.options, context.device
        stats = streams = None
        if options.needs_stats:
            stats, streams = self.stats.layer(context.index)
        factor_of_stream: dict = {}
        gram_of_stream: dict = {}  # column preservation restricts each matrix's Gram to its own columns
        per_module = options.scaling.startswith("fisher")  # fisher is a property of the weight, not the stream
        originals = context.scratch.setdefault("original_weights", {})
        for name, linear in target_linears(context.layer).items():
            full = f"{context.name}.{name}"
            planned = self.plan.modules.get(full)
            if planned is None or planned.rank is None:
                continue
            record = self.records.setdefault(full, {})
            whitening = None
            if options.needs_stats:
                stream = streams[name]
                key = full if per_module else stream
                if key not in factor_of_stream:  # q/k/v (gate/up) share one factorisation
                    fisher = self.stats.fisher(full) if per_module else None
                    try:
                        factor_of_stream[key] = input_transform(stats, stream, device, options.whitening,
                                                                options.scaling, options.alpha, fisher)
                    except ValueError as error:
                        raise DecomposeError(f"{full}: {error}") from None
                whitening = factor_of_stream[key]
                record["whitening_stream"] = f"{context.name}.{stream}"
                record["whitening_fallback"] = whitening.fallback
                if whitening.shift is not None:
                    record["whitening_shift"] = whitening.shift
            weight = linear.weight.detach()
            factors = low_rank_factors(weight.to(device), planned.rank, whitening, options.decomposition,
                                       options.svd_dtype, options.rsvd_oversamples, options.rsvd_n_iter,
                                       self.generator, svd_driver=options.svd_driver,
                                       sigma_fuse=options.sigma_fuse)
            record.update(rank=planned.rank, truncation_loss=factors.truncation_loss,
                          relative_truncation_loss=(factors.truncation_loss / factors.total_energy ** 0.5
                                                    if factors.total_energy > 0 else 0.0))
            if factors.svd is not None:
                record["svd_driver"] = factors.svd.driver
                record["svd_driver_fallback"] = factors.svd.fallback
            bias = linear.bias.detach() if linear.bias is not None else None
            trade = None
            if options.column_preserve:
                stream = streams[name]
                if stream not in gram_of_stream:
                    gram_of_stream[stream] = saved_gram(stats, stream, device)
                trade = column_preserved_factors(
                    weight.to(device), gram_of_stream[stream], planned.rank, options.whitening, plain=factors,
                    svd_dtype=options.svd_dtype,
                    factor_kwargs={"decomposition": options.decomposition, "oversamples": options.rsvd_oversamples,
                                   "n_iter": options.rsvd_n_iter, "generator": self.generator,
                                   "svd_driver": options.svd_driver, "sigma_fuse": options.sigma_fuse})
                record.update(rank=trade.rank, plan_rank=planned.rank, columns_kept=trade.kept_columns,
                              column_error_before=trade.error_before, column_error_after=trade.error_after,
                              column_search_evaluations=trade.evaluations,
                              relative_truncation_loss=(trade.error_after / trade.total_energy ** 0.5
                                                        if trade.total_energy > 0 else 0.0),
                              truncation_loss=trade.error_after)
            try:
                if trade is not None and trade.kept_columns:
                    low_rank = column_preserved_from(trade.u, trade.v, trade.columns, trade.svd_idx.cpu(),
                                                     trade.col_idx.cpu(), bias, weight.dtype, weight.device)
                else:
                    low_rank = LowRankLinear.from_factors(factors.u, factors.v, bias, weight.dtype, weight.device)
            except ValueError as error:
                raise DecomposeError(f"{full}: {error}") from None
            originals[name] = weight
            set_submodule(context.layer, name, low_rank)
