"""The decomposition pass: whiten (cholesky / eigen / none) and truncate (svd / rsvd) every
matrix the plan makes low-rank, replacing it by a LowRankLinear.

Whitening uses step 1's statistics of the original model (SVD-LLM), so this pass needs no
activations: a walk with only this pass captures and runs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from component import LowRankLinear
from utils.decompose import low_rank_factors
from utils.layerwise import LayerContext
from utils.model import set_submodule, target_linears
from utils.plan import Plan
from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES
from utils.stats import saved_gram
from utils.whitening import whitening_factor


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

    def to_dict(self) -> dict:
        out = {"whitening": self.whitening, "decomposition": self.decomposition,
               "svd_dtype": str(self.svd_dtype).replace("torch.", ""), "svd_driver": self.svd_driver}
        if self.decomposition == "rsvd":
            out["rsvd"] = {"oversamples": self.rsvd_oversamples, "n_iter": self.rsvd_n_iter, "seed": self.seed}
        return out


class Decompose:
    needs_activations = False
    needs_reference = False

    def __init__(self, plan: Plan, options: DecomposeOptions, stats=None, records: dict | None = None):
        """stats: a utils.pipeline.Statistics (required unless options.whitening is 'none');
        records: per-module dict the pass fills (rank, truncation loss, fallbacks)."""
        if options.whitening != "none" and stats is None:
            raise ValueError(f"whitening {options.whitening!r} needs the statistics of step 1")
        self.plan, self.options, self.stats = plan, options, stats
        self.records = records if records is not None else {}
        self.generator = torch.Generator().manual_seed(options.seed)

    def __call__(self, context: LayerContext) -> None:
        options, device = self.options, context.device
        stats = streams = None
        if options.whitening != "none":
            stats, streams = self.stats.layer(context.index)
        factor_of_stream: dict = {}
        originals = context.scratch.setdefault("original_weights", {})
        for name, linear in target_linears(context.layer).items():
            full = f"{context.name}.{name}"
            planned = self.plan.modules.get(full)
            if planned is None or planned.rank is None:
                continue
            record = self.records.setdefault(full, {})
            whitening = None
            if options.whitening != "none":
                stream = streams[name]
                if stream not in factor_of_stream:  # q/k/v (gate/up) share one factorisation
                    factor_of_stream[stream] = whitening_factor(saved_gram(stats, stream, device), options.whitening)
                whitening = factor_of_stream[stream]
                record["whitening_stream"] = f"{context.name}.{stream}"
                record["whitening_fallback"] = whitening.fallback
                if whitening.shift is not None:
                    record["whitening_shift"] = whitening.shift
            weight = linear.weight.detach()
            factors = low_rank_factors(weight.to(device), planned.rank, whitening, options.decomposition,
                                       options.svd_dtype, options.rsvd_oversamples, options.rsvd_n_iter,
                                       self.generator, svd_driver=options.svd_driver)
            record.update(rank=planned.rank, truncation_loss=factors.truncation_loss,
                          relative_truncation_loss=(factors.truncation_loss / factors.total_energy ** 0.5
                                                    if factors.total_energy > 0 else 0.0))
            if factors.svd is not None:
                record["svd_driver"] = factors.svd.driver
                record["svd_driver_fallback"] = factors.svd.fallback
            bias = linear.bias.detach() if linear.bias is not None else None
            try:
                low_rank = LowRankLinear.from_factors(factors.u, factors.v, bias, weight.dtype, weight.device)
            except ValueError as error:
                raise DecomposeError(f"{full}: {error}") from None
            originals[name] = weight
            set_submodule(context.layer, name, low_rank)
