"""The per-module compression plan: what happens to each target matrix, and the budget arithmetic.

A plan holds one ModulePlan per target linear of the model (its shape, whether it has a bias,
and its rank, or None when it stays dense). It owns the parameter counts every method is judged
by: an m x n matrix costs m n dense and r (m + n) as factors u (m x r) and v (r x n); a bias
costs m either way. Step 2 writes a plan, step 3 reads it, and the compressed model's metadata
records it. Later methods add fields to ModulePlan (scaling, preserved columns, bits).

Nothing here knows model families: the target shapes come from utils.model.target_shapes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

PLAN_FORMAT = "svd-compress-plan"
PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan that does not fit the model (the message names the module and the fix)."""


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int | None:
    """Rank that removes `ratio` of an out x in matrix's parameters; None if it would not shrink.
    SVD-LLM's convention: r = floor(m n (1 - ratio) / (m + n)), at least 1."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    m, n = out_features, in_features
    rank = max(1, int(m * n * (1.0 - ratio) // (m + n)))
    if rank * (m + n) >= m * n:
        return None
    return rank


def largest_useful_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose factors are smaller than the dense matrix: r (m + n) < m n."""
    m, n = out_features, in_features
    return math.ceil(m * n / (m + n)) - 1


@dataclass
class ModulePlan:
    out_features: int
    in_features: int
    bias: bool
    rank: int | None = None  # None: the matrix stays dense

    def dense_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    def params(self) -> int:
        """Parameters of the module as planned (bias included)."""
        if self.rank is None:
            return self.dense_params()
        return self.rank * (self.out_features + self.in_features) + (self.out_features if self.bias else 0)

    def to_dict(self) -> dict:
        return {"shape": [self.out_features, self.in_features], "bias": self.bias, "rank": self.rank}


Shapes = dict  # module name -> (out_features, in_features, has_bias)


@dataclass
class Plan:
    modules: dict[str, ModulePlan]
    ratio: float | None = None  # the nominal ratio the plan was made for, if any
    allocation: str = "uniform"
    detail: dict | None = None  # what the allocation found (e.g. v2's ranks per matrix type)

    @classmethod
    def uniform(cls, shapes: Shapes, ratio: float) -> "Plan":
        """Every matrix gets rank_for_ratio(ratio); one that would not shrink stays dense."""
        modules = {name: ModulePlan(m, n, bias, rank_for_ratio(m, n, ratio))
                   for name, (m, n, bias) in shapes.items()}
        return cls(modules, ratio, "uniform")

    def round_ranks(self, multiple: int) -> "Plan":
        """The plan with every rank rounded down to a multiple of `multiple` (matmul kernels work
        in tiles of 8 / 16 / 64 columns; a rank between tiles pays for a partly empty tile).

        A rank below `multiple` becomes `multiple` when that still makes its matrix smaller, else
        the matrix stays dense; the rounding down elsewhere pays for it. PlanError when the rounded
        plan costs more parameters than this one (the budget rule)."""
        if multiple < 1:
            raise PlanError(f"rank multiple must be at least 1, got {multiple}")
        modules = {}
        for name, p in self.modules.items():
            rank = p.rank
            if rank is not None:
                rank = rank // multiple * multiple
                if rank == 0:
                    fits = multiple <= min(p.out_features, p.in_features) and \
                        multiple <= largest_useful_rank(p.out_features, p.in_features)
                    rank = multiple if fits else None
            modules[name] = ModulePlan(p.out_features, p.in_features, p.bias, rank)
        detail = {**(self.detail or {}), "rank_multiple": multiple}
        rounded = Plan(modules, self.ratio, self.allocation, detail)
        if rounded.params_after() > self.params_after():
            raise PlanError(f"rounding the ranks to multiples of {multiple} costs {rounded.params_after()} "
                            f"parameters, more than the plan's {self.params_after()}; use a smaller --rank_multiple")
        return rounded

    # ------------------------------------------------------------------ budget arithmetic
    @property
    def ranks(self) -> dict[str, int]:
        """The low-rank modules and their ranks (dense ones left out)."""
        return {name: p.rank for name, p in self.modules.items() if p.rank is not None}

    @property
    def dense_modules(self) -> list[str]:
        return [name for name, p in self.modules.items() if p.rank is None]

    def params_before(self) -> int:
        """Parameters of the target matrices before compression."""
        return sum(p.dense_params() for p in self.modules.values())

    def params_after(self) -> int:
        return sum(p.params() for p in self.modules.values())

    def removed_fraction(self) -> float:
        """Fraction of the target matrices' parameters removed (what --ratio asks for)."""
        before = self.params_before()
        return 1.0 - self.params_after() / before if before else 0.0

    def model_removed_fraction(self, model_params: int) -> float:
        """Fraction of the whole model removed, for a model of `model_params` parameters
        (embeddings, norms and lm_head are not in the plan and stay)."""
        return (self.params_before() - self.params_after()) / model_params

    def summary(self, model_params: int | None = None) -> dict:
        out = {"allocation": self.allocation, "ratio": self.ratio, "matrices": len(self.modules),
               "low_rank": len(self.ranks), "dense": len(self.dense_modules),
               "params_before": self.params_before(), "params_after": self.params_after(),
               "removed_fraction": round(self.removed_fraction(), 6)}
        if model_params is not None:
            out["model_removed_fraction"] = round(self.model_removed_fraction(model_params), 6)
        return out

    # ------------------------------------------------------------------ validation
    def validate(self, shapes: Shapes, source: str = "plan") -> None:
        """Raise PlanError naming the first module that does not fit the model, and the fix."""
        unknown = [name for name in self.modules if name not in shapes]
        if unknown:
            example = next(iter(shapes), "none")
            raise PlanError(f"{source}: module {unknown[0]!r} is not a target linear of this model "
                            f"(its names look like {example!r}); rerun --step 2 for this model")
        missing = [name for name in shapes if name not in self.modules]
        if missing:
            raise PlanError(f"{source}: no entry for module {missing[0]!r} ({len(missing)} missing); "
                            f"give every target linear a rank, or null to keep it dense")
        for name, p in self.modules.items():
            m, n, bias = shapes[name]
            if (p.out_features, p.in_features) != (m, n):
                raise PlanError(f"{source}: {name} is planned as {p.out_features} x {p.in_features} but the "
                                f"model's is {m} x {n}; rerun --step 2 for this model")
            p.bias = bias
            if p.rank is None:
                continue
            if isinstance(p.rank, bool) or not isinstance(p.rank, int):
                raise PlanError(f"{source}: {name} has rank {p.rank!r}; give a whole number, or null to keep it dense")
            if p.rank < 1:
                raise PlanError(f"{source}: {name} has rank {p.rank}; ranks must be at least 1 "
                                f"(null keeps the matrix dense)")
            if p.rank > min(m, n):
                raise PlanError(f"{source}: {name} has rank {p.rank}, above min(m, n) = {min(m, n)} "
                                f"of its {m} x {n} weight; lower it")
            if p.rank * (m + n) >= m * n:
                raise PlanError(f"{source}: {name} at rank {p.rank} costs {p.rank * (m + n)} parameters, "
                                f"not fewer than the dense {m * n}; use at most rank "
                                f"{largest_useful_rank(m, n)} or null to keep it dense")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "allocation": self.allocation,
                "ratio": self.ratio, "summary": self.summary(), "detail": self.detail,
                "modules": {name: p.to_dict() for name, p in self.modules.items()}}

    @classmethod
    def from_dict(cls, data: dict, shapes: Shapes | None = None, source: str = "plan") -> "Plan":
        """Read a plan (or the {"ranks": {...}} file of earlier versions, which needs `shapes`)."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: not a plan (expected a JSON object)")
        if "modules" in data:
            modules = {}
            for name, entry in data["modules"].items():
                try:
                    m, n = (int(x) for x in entry["shape"])
                except (KeyError, TypeError, ValueError):
                    raise PlanError(f"{source}: {name} has no [out, in] shape; rerun --step 2") from None
                modules[name] = ModulePlan(m, n, bool(entry.get("bias", False)), entry.get("rank"))
        elif "ranks" in data:  # earlier versions wrote bare ranks
            if shapes is None:
                raise PlanError(f"{source}: a ranks-only file needs the model to read it")
            modules = {}
            for name, rank in data["ranks"].items():
                m, n, bias = shapes.get(name, (0, 0, False))
                modules[name] = ModulePlan(m, n, bias, rank)
        else:
            raise PlanError(f"{source}: neither a plan nor a ranks file (no 'modules' or 'ranks' key)")
        return cls(modules, data.get("ratio"), data.get("allocation", "uniform"), data.get("detail"))

    def save(self, path: str) -> None:
        from utils.io import write_json  # atomic
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str, shapes: Shapes | None = None) -> "Plan":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except OSError as error:
            raise PlanError(f"plan {path}: cannot be read ({error.strerror}); run --step 2 to write it") from None
        except json.JSONDecodeError as error:
            raise PlanError(f"plan {path}: not valid JSON ({error.msg}, line {error.lineno}); "
                            f"fix it or rerun --step 2") from None
        return cls.from_dict(data, shapes, source=f"plan {path}")
