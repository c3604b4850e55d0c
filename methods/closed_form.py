"""The closed-form update pass (SVD-LLM's step 2), sequential within the layer.

After the decomposition pass replaced the layer's matrices, the layer is run on the compressed
model's inputs and each low-rank matrix's u is refit (utils.update.update_u) so that it
reproduces the original matrix on the inputs it now really sees. The matrices are refit in the
order the layer runs them, one group of matrices sharing an input at a time (attention q/k/v,
then o on the updated attention, then gate/up, then down), as SVD-LLM's hooks do: each group's
inputs are collected after the groups before it were updated. Fitting every matrix on inputs from
not-yet-updated matrices fits o and down to inputs they never see.

The last quarter of the windows is held out: an update is kept only where it lowers the output
error there (and does not raise it on the windows it was fitted to).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from component import LowRankLinear, largest_entry_fits
from methods.method import Flag, FlagError, Method, MethodOptions, PassInputs
from utils.layerwise import LayerContext
from utils.model import linear_units
from utils.update import update_u


def holdout_split(nsamples: int, fraction: float) -> tuple[range, range]:
    """(fit windows, held-out windows) of `nsamples`: the last max(1, floor(fraction n)) are held
    out (none of fewer than 2 windows)."""
    held = 0 if nsamples < 2 else max(1, int(nsamples * fraction))
    return range(0, nsamples - held), range(nsamples - held, nsamples)


class UpdateSlot(MethodOptions):
    """The update slot's answers to the pipeline, shared by the closed-form update and the anchored fit:
    the walk carries their nsamples windows, of which split() holds some out; the walk's label is the
    method's name in the record."""
    slot, role = "update", "the update"

    @property
    def windows_needed(self) -> int:
        return self.nsamples

    def heldout_positions(self) -> list[int]:
        return list(self.split(self.nsamples)[1])

    @property
    def walk_label(self) -> str:
        return self.to_dict()["method"]


@dataclass
class UpdateOptions(UpdateSlot):
    nsamples: int = 16  # calibration windows carried through the walk
    holdout_fraction: float = 0.25  # of those, held out to accept or refuse each update
    ridge: float = 1e-6  # lam = ridge * trace(v H v^T) / r
    sequential: bool = True  # refit the groups in execution order (False: all on the decomposed layer)

    def split(self, nsamples: int) -> tuple[range, range]:
        """(fit windows, held-out windows): the held-out ones are the last."""
        return holdout_split(nsamples, self.holdout_fraction)

    def to_dict(self) -> dict:
        return {"method": "closed_form", "nsamples": self.nsamples, "holdout_fraction": self.holdout_fraction,
                "ridge": self.ridge, "sequential": self.sequential}

    def record_fields(self, records: dict, layer_records: dict) -> dict:
        return {"updates_accepted": sum(r["update"]["accepted"] for r in records.values() if "update" in r)}

    def make_pass(self, inputs: PassInputs) -> "ClosedFormUpdate":
        return ClosedFormUpdate(self, inputs.records)


def execution_groups(context: LayerContext, modules: dict[str, nn.Module]) -> list[list[str]]:
    """`modules` in the order the layer runs them, grouped by shared input (one window's pass):
    for Llama [[q, k, v], [o], [gate, up], [down]]; no family table needed."""
    # in the order the modules first ran; holding every x keeps the identity test sound
    first = context.first_inputs(modules, range(0, 1))[0]
    groups: list[list[str]] = []
    previous = None
    for name, x in first.items():
        if groups and x is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = x
    never_ran = [n for n in modules if n not in first]
    return groups + ([never_ran] if never_ran else [])


class ClosedFormUpdate:
    needs_activations = True
    needs_reference = False
    reads_original_weights = True

    def __init__(self, options: UpdateOptions, records: dict | None = None):
        self.options = options
        self.records = records if records is not None else {}

    def __call__(self, context: LayerContext) -> None:
        originals = context.scratch.get("original_weights", {})
        low_rank = {n: m for n, m in linear_units(context.layer, (LowRankLinear,)).items() if n in originals}
        if not low_rank:
            return
        fit, held = self.options.split(min(self.options.nsamples, context.num_windows))
        groups = execution_groups(context, low_rank) if self.options.sequential else [list(low_rank)]
        for group in groups:
            modules = {n: low_rank[n] for n in group}
            collected = [context.collect(modules, indices, stop_after=True) for indices in (fit, held) if len(indices)]
            for name, module in modules.items():
                grams = [c.streams[c.stream_of[name]].gram for c in collected]
                self._update(context, name, module, originals[name], grams[0], grams[1] if len(grams) > 1 else None)

    def _update(self, context: LayerContext, name: str, module: LowRankLinear, weight: torch.Tensor,
                gram_fit: torch.Tensor, gram_held: torch.Tensor | None) -> None:
        device = context.device
        result = update_u(weight.to(device), module.u.weight.to(device), module.v.weight.to(device),
                          gram_fit, gram_held, self.options.ridge)
        # an update the layer's dtype cannot hold (fp16 tops out at 65504) is not taken
        fits, _ = largest_entry_fits(module.u.weight.dtype, result.u)
        accepted = result.accepted and fits
        if accepted:
            module.u.weight.data.copy_(result.u.to(module.u.weight.dtype))
        self.records.setdefault(f"{context.name}.{name}", {})["update"] = {
            "accepted": accepted, "fits_dtype": fits,
            "fit_error": [result.fit_error_before, result.fit_error_after],
            "holdout_error": [result.holdout_error_before, result.holdout_error_after],
            "ridge": result.ridge if result.ridge != float("inf") else None}


# ---------------------------------------------------------------------------------------- flags

# --update chooses among the methods whose Method.selector is "update" (this one, methods.anchored)
FLAGS = (
    Flag(("--updating_nsamples",), "updating_nsamples", "calibration", default=16, type=int,
         help="calibration windows for the closed-form update and the anchored fit; a quarter are held out, "
              "drawn to share no token with step 1's windows (README, Data)"),
    Flag(("--update",), "update", "decomposition", default="none", selects=True,
         help="closed-form update of u against the original layer outputs (SVD-LLM step 2), refit in "
              "the layer's execution order on --updating_nsamples windows. It can RAISE perplexity "
              "(docs/evaluation.md, docs/refinement.md): measure it on your model"),
)


def check_flags(values: dict) -> dict:
    if values["updating_nsamples"] < 1:
        raise FlagError("--updating_nsamples must be at least 1")
    if values.get("column_preserve") and values["update"] != "none":
        raise FlagError(f"--column_preserve with --update {values['update']}: the update refits plain low-rank "
                        f"layers only; run one or the other (--refine gradient --refine_target block does work "
                        f"with it)")
    return {}


def summary(compression: dict) -> str | None:
    if (compression.get("update") or {}).get("method") != "closed_form":
        return None
    return f"update: kept for {compression['updates_accepted']} of {len(compression['ranks'])} matrices"


def label(record: dict) -> str:
    return "+closed_form" if (record.get("update") or {}).get("method") == "closed_form" else ""


METHOD = Method("closed_form", FLAGS, lambda values: UpdateOptions(nsamples=values["updating_nsamples"]), check_flags,
                selector="update", summary=summary, record_defaults={"updates_accepted": None}, label=label)
