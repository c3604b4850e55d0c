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
from methods.method import Flag, FlagError, Method, MethodOptions, PassInputs
from utils.layerwise import LayerContext
from utils.model import set_submodule, target_linears
from utils.plan import Plan
from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES
from utils.stats import saved_gram
from utils.whitening import SCALING_METHODS, input_transform


class DecomposeError(ValueError):
    """Factors that cannot be stored (the message names the matrix and the fix)."""


@dataclass
class DecomposeOptions(MethodOptions):
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

    slot, role = "decompose", "the decomposition"

    def make_pass(self, inputs: PassInputs) -> "Decompose":
        return Decompose(inputs.plan, self, inputs.stats, inputs.records)


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
        linears = target_linears(context.layer)
        pending: dict[str, int] = {}  # matrices of each input stream not yet reached
        for name in linears if streams is not None else ():
            pending[streams[name]] = pending.get(streams[name], 0) + 1
        for name, linear in linears.items():
            # a finished stream's factor and Gram (and a per-module factor once used) are dropped
            # before the next is built: the MLP's wide factor is never beside the attention's
            for cache in (factor_of_stream, gram_of_stream):
                for key in [key for key in cache if not pending.get(key)]:
                    del cache[key]
            if streams is not None:
                pending[streams[name]] -= 1
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
            if context.scratch.get("keep_original_weights", True):
                originals[name] = weight  # a later pass reads it (else the dense weight goes with its module)
            set_submodule(context.layer, name, low_rank)


# ---------------------------------------------------------------------------------------- flags

GROUP = "decomposition"
FLAGS = (
    Flag(("--whitening",), "whitening", GROUP, choices=("cholesky", "eigen", "none"),
         help="truncation-aware whitening: cholesky (SVD-LLM), eigen (SVD-LLM V2), none (plain SVD, or "
              "ASVD with --scaling). Default: cholesky, or none when --scaling is given"),
    Flag(("--scaling", "--scaling_method"), "scaling", GROUP, choices=SCALING_METHODS,
         help="ASVD's activation-aware scaling, an alternative to whitening: decompose W diag(s), "
              "s = stat^alpha per input channel (abs_mean / abs_max of the inputs, fisher, or their "
              "product fisher_abs_mean), then divide the right factor by s. --scaling_method is ASVD's "
              "name for it. Default none"),
    Flag(("--act_aware",), "act_aware", GROUP, default=False, action="store_true",
         help="ASVD's flag: --scaling abs_mean (or the --scaling_method given)"),
    Flag(("--alpha",), "alpha", GROUP, default=0.5, type=float, help="ASVD: the exponent of the scaling statistic"),
    Flag(("--sigma_fuse",), "sigma_fuse", GROUP, default="UV", choices=("UV", "U", "V"),
         help="where the singular values go: UV = their square root into both factors, U or V"),
    Flag(("--column_preserve",), "column_preserve", GROUP, default=False, action="store_true",
         help="step 3: Duo-SVD's column level: trade rank for exactly kept input columns at no more "
              "parameters when that lowers a matrix's whitened truncation error by over 1%% (needs whitening)"),
    Flag(("--decomposition",), "decomposition", GROUP, default="svd", choices=("svd", "rsvd"),
         help="exact or randomized SVD"),
    Flag(("--rsvd_oversamples",), "rsvd_oversamples", GROUP, default=DEFAULT_OVERSAMPLES, type=int,
         help="randomized SVD: extra sketch columns (default %(default)s; speed and extra truncation loss "
              "with the default --rsvd_n_iter: README, scripts/results/bench_rsvd_cpu.json)"),
    Flag(("--rsvd_n_iter",), "rsvd_n_iter", GROUP, default=DEFAULT_N_ITER, type=int,
         help="randomized SVD: power iterations (default %(default)s)"),
    Flag(("--svd_dtype",), "svd_dtype", GROUP, default="float32", choices=("float32", "float64"),
         help="precision of the SVD itself (whitening is always float64)"),
    Flag(("--svd_driver",), "svd_driver", GROUP, default="auto", choices=("auto", "default", "gesvda"),
         help="exact SVD driver: auto = cuSOLVER gesvda with a residual check on CUDA "
              "(falls back to the default driver), LAPACK on CPU"),
)


def check_flags(values: dict) -> dict:
    """--scaling / --act_aware / --whitening defaults and their conflicts (ASVD is whitening none),
    the scaling exponent, column preservation's need for whitening, the randomized SVD's numbers."""
    scaling, whitening = values["scaling"], values["whitening"]
    if values["act_aware"] and scaling in (None, "none"):
        scaling = "abs_mean"
    scaling = scaling or "none"
    if scaling != "none" and whitening not in (None, "none"):
        raise FlagError(f"--scaling {scaling} with --whitening {whitening}: scaling (ASVD) and whitening "
                        f"(SVD-LLM) are alternatives; use --whitening none --scaling {scaling}, or "
                        f"--whitening {whitening} alone")
    if whitening is None:
        whitening = "none" if scaling != "none" else "cholesky"
    if scaling != "none" and not 0.0 <= values["alpha"] <= 4.0:
        raise FlagError(f"--alpha {values['alpha']}: the scaling exponent must be in [0, 4] (ASVD: 0.5)")
    if values["column_preserve"] and whitening == "none":
        raise FlagError("--column_preserve scores and trades columns by their whitened error: use --whitening "
                        "cholesky or eigen (it is not combined with --scaling)")
    if scaling.startswith("fisher") and 1 in (values.get("steps") or ()) and not values.get("fisher"):
        raise FlagError(f"--scaling {scaling} needs fisher information: add --fisher to step 1")
    for name in ("rsvd_oversamples", "rsvd_n_iter"):
        if values[name] < 0:
            raise FlagError(f"--{name} must be 0 or more (defaults: --rsvd_oversamples {DEFAULT_OVERSAMPLES} "
                            f"--rsvd_n_iter {DEFAULT_N_ITER})")
    return {"scaling": scaling, "whitening": whitening}


def options_from_flags(values: dict) -> DecomposeOptions:
    from utils.model import DTYPES
    return DecomposeOptions(values["whitening"], values["decomposition"], DTYPES[values["svd_dtype"]],
                            values["svd_driver"], values["rsvd_oversamples"], values["rsvd_n_iter"], values["seed"],
                            scaling=values["scaling"], alpha=values["alpha"], sigma_fuse=values["sigma_fuse"],
                            column_preserve=values["column_preserve"])


def label(record: dict) -> str:
    return ("svd-llm" if record["whitening"] != "none" else
            "asvd" if record.get("scaling", "none") != "none" else "svd")


METHOD = Method("decompose", FLAGS, options_from_flags, check_flags, label=label)
