"""Gradient refinement of a compressed layer against the original model (AA-SVD, GSVD).

Two targets, one optimiser (AdamW, weight decay 0.01, linear warm-up over the first 10% of the
steps, then cosine down to 0.1 of the learning rate), in float32, one decoder layer at a time:

  block  (AA-SVD's block refinement): every parameter of the decoder layer (low-rank factors,
         the matrices the plan kept dense, norms) is optimised together so that the compressed
         layer on the compressed stream reproduces the original layer's outputs on the original
         stream: min mean ||layer'(h') - layer(h)||^2, h' the compressed model's inputs to this
         layer, h the original model's (the two-stream walk's reference_outputs).
  matrix (the GSVD seed's per-matrix refinement): each low-rank linear's u and v are optimised
         for `gradient_iters` steps so that u v x' matches the original matrix's outputs W x' on
         the inputs x' it now sees, in data-flow order (q/k/v, o, gate/up, down: each group's
         inputs are collected after the groups before it were refined, and the layers below are
         already refined).

The loss is measured on all refinement windows before training and after each epoch (block) or
at a few checkpoints (matrix); the best iterate is kept, so the recorded loss after is never above
the loss before. Parameter shapes never change, so the parameter count is that of the
decomposition.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from component import LowRankLinear
from methods.closed_form import execution_groups
from methods.method import Flag, FlagError, Method, MethodOptions, PassInputs
from utils.layerwise import LayerContext, call_layer
from utils.model import linear_units

REFINE_TARGETS = ("block", "matrix")


@dataclass
class RefineOptions(MethodOptions):
    target: str = "block"  # block (AA-SVD) | matrix (GSVD)
    nsamples: int = 32  # calibration windows used (the first of those the walk carries)
    epochs: int = 2  # block: passes over the windows
    gradient_iters: int = 500  # matrix: optimiser steps per matrix (GSVD's --gradient-iters)
    lr: float = 1e-4
    batch_size: int = 8  # windows per step
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    final_lr_fraction: float = 0.1  # the cosine ends at lr * this
    checkpoints: int = 4  # matrix: loss measurements during the gradient_iters steps
    holdout: int = 0  # block: windows after the nsamples trained on, whose loss is only measured (overfitting)
    seed: int = 0

    def __post_init__(self):
        if self.target not in REFINE_TARGETS:
            raise ValueError(f"unknown refinement target {self.target!r}; choose one of {REFINE_TARGETS}")
        if self.holdout < 0 or (self.holdout and self.target != "block"):
            raise ValueError(f"holdout {self.holdout}: a non-negative number of windows, for the block target only")

    @property
    def windows_needed(self) -> int:
        """Calibration windows the walk must carry for this refinement (trained on + held out)."""
        return self.nsamples + self.holdout

    def to_dict(self) -> dict:
        out = {"method": "gradient", "target": self.target, "nsamples": self.nsamples, "lr": self.lr,
               "batch_size": self.batch_size, "optimizer": "adamw", "weight_decay": self.weight_decay,
               "schedule": f"linear warm-up {self.warmup_fraction:g} then cosine to {self.final_lr_fraction:g}",
               "seed": self.seed}
        if self.target == "block":
            out["epochs"] = self.epochs
            out["holdout"] = self.holdout
        else:
            out["gradient_iters"] = self.gradient_iters
        return out

    slot, role = "refine", "the refinement"

    def heldout_positions(self) -> list[int]:
        return list(range(self.nsamples, self.windows_needed))

    @property
    def walk_label(self) -> str:
        return f"refine({self.target})"

    def record_fields(self, records: dict, layer_records: dict) -> dict:
        return {"refine_losses": refine_summary(self, records, layer_records)}

    def make_pass(self, inputs: PassInputs) -> "Refine":
        return Refine(self, inputs.records, inputs.layer_records)


def refine_summary(options: RefineOptions, records: dict, layer_records: dict) -> dict:
    """Losses before / after the refinement, per block (target block) or per module (matrix), and
    how many went down: the model's record of the refinement (GSVD's *_losses.txt)."""
    if options.target == "block":
        per = layer_records
    else:
        per = {name: r["refine"] for name, r in records.items() if "refine" in r}
    summary = {"target": options.target, "per_" + ("block" if options.target == "block" else "module"): per,
               "lowered": sum(r["loss_after"] < r["loss_before"] for r in per.values()), "count": len(per)}
    held = [r for r in per.values() if "holdout_after" in r]
    if held:  # blocks whose kept iterate also lowered the loss on windows it was not trained on
        summary["holdout_lowered"] = sum(r["holdout_after"] < r["holdout_before"] for r in held)
    return summary


def lr_factor(step: int, total: int, warmup_fraction: float = 0.1, final: float = 0.1) -> float:
    """Multiplier of the learning rate at `step` (0-based) of `total`: linear warm-up, cosine to `final`."""
    warmup = max(1, math.ceil(warmup_fraction * total)) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(params: list[nn.Parameter], options: RefineOptions, total_steps: int):
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, options.warmup_fraction, options.final_lr_fraction))
    return optimizer, schedule


class Refine:
    needs_activations = True
    needs_reference = True
    reads_original_weights = True

    def __init__(self, options: RefineOptions, records: dict | None = None, layer_records: dict | None = None):
        """records: per-module dict (matrix losses); layer_records: per-layer dict (block losses)."""
        self.options = options
        self.needs_reference = options.target == "block"  # matrix targets are the original W on x'
        self.records = records if records is not None else {}
        self.layer_records = layer_records if layer_records is not None else {}

    def __call__(self, context: LayerContext) -> None:
        dtype = next(context.layer.parameters()).dtype
        requires_grad = {id(p): p.requires_grad for p in context.layer.parameters()}
        if dtype != torch.float32:  # optimise in float32 whatever the model's dtype
            context.layer.float()
        try:
            with torch.enable_grad():
                if self.options.target == "block":
                    self._block(context)
                else:
                    self._matrices(context)
        finally:
            for p in context.layer.parameters():
                p.requires_grad_(requires_grad.get(id(p), False))
                p.grad = None
            if dtype != torch.float32:
                context.layer.to(dtype)

    # ------------------------------------------------------------------------------------ block

    def _block_loss(self, context: LayerContext, windows: range) -> float:
        with torch.no_grad():
            total = 0.0
            for i in windows:
                out = call_layer(context.layer, context.inputs[i:i + 1].float(), context.layer_args)
                total += float((out - context.reference_outputs[i:i + 1].float()).square().mean())
            return total / len(windows)

    def _block(self, context: LayerContext) -> None:
        options, layer = self.options, context.layer
        n = min(options.nsamples, context.num_windows)
        windows = range(n)
        # held-out windows: measured each epoch, never trained on nor used to choose the iterate
        held = range(n, min(n + options.holdout, context.num_windows))
        params = [p for p in layer.parameters()]
        for p in params:
            p.requires_grad_(True)
        steps_per_epoch = math.ceil(n / options.batch_size)
        total = steps_per_epoch * options.epochs
        optimizer, schedule = _optimizer(params, options, total)
        generator = torch.Generator().manual_seed(options.seed + context.index)
        start = time.perf_counter()
        before = self._block_loss(context, windows)
        best, best_epoch = before, 0
        best_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        losses = [before]
        held_losses = [self._block_loss(context, held)] if len(held) else []
        for epoch in range(1, options.epochs + 1):
            order = torch.randperm(n, generator=generator).tolist()
            for first in range(0, n, options.batch_size):
                batch = order[first:first + options.batch_size]
                optimizer.zero_grad(set_to_none=True)
                for i in batch:  # one window at a time: the recorded call arguments are for a batch of one
                    out = call_layer(layer, context.inputs[i:i + 1].float(), context.layer_args)
                    loss = (out - context.reference_outputs[i:i + 1].float()).square().mean() / len(batch)
                    loss.backward()
                optimizer.step()
                schedule.step()
            loss = self._block_loss(context, windows)
            losses.append(loss)
            if len(held):
                held_losses.append(self._block_loss(context, held))
            if loss < best:
                best, best_epoch = loss, epoch
                best_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        if best_epoch != options.epochs:  # the last iterate is not the best: go back to the best
            with torch.no_grad():
                for key, value in layer.state_dict().items():
                    value.copy_(best_state[key])
        record = {"target": "block", "loss_before": before, "loss_after": best, "losses": losses,
                  "best_epoch": best_epoch, "steps": total, "windows": n, "seconds": round(time.perf_counter() - start, 3)}
        if held_losses:  # the kept iterate's loss on windows it never saw, against the start's
            record.update(holdout_windows=len(held), holdout_losses=held_losses,
                          holdout_before=held_losses[0], holdout_after=held_losses[best_epoch])
        self.layer_records[context.name] = record

    # ------------------------------------------------------------------------------------ matrix

    def _matrices(self, context: LayerContext) -> None:
        originals = context.scratch.get("original_weights", {})
        low_rank = {n: m for n, m in linear_units(context.layer, (LowRankLinear,)).items() if n in originals}
        if not low_rank:
            return
        n = min(self.options.nsamples, context.num_windows)
        for group in execution_groups(context, low_rank):
            captured = context.first_inputs({group[0]: low_rank[group[0]]}, range(n))
            inputs = torch.stack([window[group[0]][0].float() for window in captured])  # windows x tokens x in
            for name in group:
                self._matrix(context, name, low_rank[name], originals[name].float(), inputs)

    def _matrix(self, context: LayerContext, name: str, module: LowRankLinear, weight: torch.Tensor,
                inputs: torch.Tensor) -> None:
        options = self.options
        u, v = module.u.weight, module.v.weight
        params = [u, v]
        for p in params:
            p.requires_grad_(True)
        targets = inputs @ weight.T  # the original matrix's outputs on these inputs (no bias: it cancels)

        def full_loss() -> float:
            with torch.no_grad():
                return float(((inputs @ v.T) @ u.T - targets).square().mean())

        total = options.gradient_iters
        optimizer, schedule = _optimizer(params, options, max(total, 1))
        generator = torch.Generator().manual_seed(options.seed + context.index)
        start = time.perf_counter()
        before = full_loss()
        best, best_step = before, 0
        best_state = (u.detach().clone(), v.detach().clone())
        checks = {round(total * (k + 1) / max(1, options.checkpoints)) for k in range(options.checkpoints)}
        losses = [before]
        n = inputs.shape[0]
        for step in range(1, total + 1):
            batch = torch.randint(0, n, (min(options.batch_size, n),), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            x = inputs[batch]
            loss = ((x @ v.T) @ u.T - targets[batch]).square().mean()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step in checks:
                current = full_loss()
                losses.append(current)
                if current < best:
                    best, best_step = current, step
                    best_state = (u.detach().clone(), v.detach().clone())
        with torch.no_grad():
            u.copy_(best_state[0])
            v.copy_(best_state[1])
        self.records.setdefault(f"{context.name}.{name}", {})["refine"] = {
            "target": "matrix", "loss_before": before, "loss_after": best, "losses": losses,
            "best_step": best_step, "steps": total, "windows": n, "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------------- flags

GROUP = "refinement (step 3, after the decomposition / update; docs/refinement.md)"
FLAGS = (
    Flag(("--refine",), "refine", GROUP, default="none", selects=True,
         help="gradient refinement against the original model, one layer at a time (AdamW, warm-up then "
              "cosine; the best iterate is kept)"),
    Flag(("--refine_target",), "refine_target", GROUP, default="block", choices=REFINE_TARGETS,
         help="block = AA-SVD's block refinement (every parameter of a decoder layer, to the original "
              "layer's outputs on the original stream); matrix = GSVD's per-matrix u, v refinement (to "
              "the original matrix's outputs on the inputs it sees)"),
    Flag(("--refine_epochs",), "refine_epochs", GROUP, default=2, type=int,
         help="block: epochs over the windows (AA-SVD uses 25; more epochs against more windows: "
              "docs/refinement.md)"),
    Flag(("--gradient_iters", "--gradient-iters"), "gradient_iters", GROUP, default=500, type=int,
         help="matrix: optimiser steps per matrix (GSVD's --gradient-iters, an alias)"),
    Flag(("--refine_lr",), "refine_lr", GROUP, default=1e-4, type=float, help="AdamW learning rate (weight decay 0.01)"),
    Flag(("--refine_batch_size",), "refine_batch_size", GROUP, default=8, type=int,
         help="calibration windows per optimiser step"),
    Flag(("--refine_nsamples",), "refine_nsamples", GROUP, type=int,
         help="calibration windows of --dataset for the refinement (default: --updating_nsamples)"),
    Flag(("--refine_holdout",), "refine_holdout", GROUP, default=0, type=int,
         help="block: this many more windows of --dataset, after those trained on, whose block loss is "
              "measured every epoch and recorded (holdout_losses), never trained on: shows overfitting "
              "(drawn to share no token with step 1's windows or the fit windows, as the update's held-out ones)"),
)


def check_flags(values: dict) -> dict:
    """The refinement's numbers; --refine_nsamples defaults to --updating_nsamples."""
    if values.get("column_preserve") and values["refine"] != "none" and values["refine_target"] == "matrix":
        raise FlagError("--column_preserve with --refine_target matrix: GSVD's per-matrix refinement trains plain "
                        "low-rank layers only; use --refine_target block")
    resolved = {"refine_nsamples": values["updating_nsamples"] if values["refine_nsamples"] is None
                else values["refine_nsamples"]}
    if values["refine"] == "none":
        if values["refine_holdout"]:
            raise FlagError("--refine_holdout is for --refine gradient --refine_target block")
        return resolved
    if values["refine_holdout"] < 0 or (values["refine_holdout"] and values["refine_target"] != "block"):
        raise FlagError(f"--refine_holdout {values['refine_holdout']}: a non-negative number of windows, with "
                        f"--refine_target block only")
    for name in ("refine_epochs", "gradient_iters", "refine_batch_size"):
        if values[name] < 1:
            raise FlagError(f"--{name} {values[name]}: must be at least 1")
    if resolved["refine_nsamples"] < 1:
        raise FlagError(f"--refine_nsamples {resolved['refine_nsamples']}: must be at least 1")
    if not (math.isfinite(values["refine_lr"]) and values["refine_lr"] > 0):
        raise FlagError(f"--refine_lr {values['refine_lr']}: must be a positive number, e.g. 1e-4")
    return resolved


def options_from_flags(values: dict) -> RefineOptions:
    return RefineOptions(target=values["refine_target"], nsamples=values["refine_nsamples"],
                         epochs=values["refine_epochs"], gradient_iters=values["gradient_iters"], lr=values["refine_lr"],
                         batch_size=values["refine_batch_size"], holdout=values["refine_holdout"], seed=values["seed"])


def summary(compression: dict) -> str | None:
    losses = compression.get("refine_losses")
    if not losses:
        return None
    held_windows = next((r.get("holdout_windows") for r in losses.get("per_block", {}).values()), None)
    held = f", on the {held_windows} held-out windows for {losses['holdout_lowered']}" if held_windows else ""
    return (f"refine ({losses['target']}): loss lowered for {losses['lowered']} of {losses['count']} "
            f"{'blocks' if losses['target'] == 'block' else 'matrices'}{held}")


def label(record: dict) -> str:
    refine = record.get("refine")
    if not refine:
        return ""
    return "+refine(" + ("block: AA-SVD" if refine["target"] == "block" else "matrix: GSVD") + ")"


METHOD = Method("gradient", FLAGS, options_from_flags, check_flags, selector="refine", summary=summary,
                record_defaults={"refine_losses": None}, label=label)
