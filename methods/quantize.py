"""The quantization pass (step 8): GPTQ or RTN on every linear of a decoder layer, stored packed.

Every linear of the layer is quantized: a dense nn.Linear (of an uncompressed model, or a matrix
the plan kept dense) becomes a QuantLinear; a LowRankLinear keeps its structure and gets
quantized factors, v first, then u. With GPTQ the layer is processed in execution order, one
group of matrices sharing an input at a time (closed_form.execution_groups: q/k/v, then o on the
quantized attention, then gate/up, then down), so every matrix is solved against the inputs the
already-quantized layer really gives it (IST-DASLab/gptq's "true sequential"), and the layers
themselves run in order on the compressed stream of the walk (layer i+1 sees the outputs of the
quantized layer i).

For a group the input Hessian H_x = 2/n sum x x^T is accumulated once (its members share x) from
a pre-forward hook that ends the window's pass there. A low-rank layer y = u(v x): v is solved
against H_x, replaced by its QuantLinear, and u against the Hessian of its own input v_q x,
H_u = V_q H_x V_q^T, with V_q the de-quantized weight of the stored v (float16 scales included):
algebraically the Hessian of the outputs of the quantized v on the same calibration inputs,
without running the layer again (tests/test_quantize.py checks it against the Hessian of u's
actual inputs in the finished model, and that it is not the one of the unquantized v).

RTN needs no activations: every weight is rounded onto its min-max grid (ASVD's rtn_int8 is
RTN with 8 bits, one group per output row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from component import LowRankLinear
from component.quant_linear import QuantLinear, quant_linear_from
from gptq import GPTQ, PACK_BITS, QuantSpec, rtn
from methods.closed_form import execution_groups
from methods.method import Flag, FlagError, Method
from utils.layerwise import LayerContext
from utils.model import linear_units, set_submodule

METHODS = ("gptq", "rtn")


class QuantizeError(ValueError):
    """Quantization options or a model that cannot be quantized (message says how to fix it)."""


@dataclass
class QuantizeOptions:
    method: str = "gptq"  # gptq | rtn
    wbits: int = 4  # 2, 3, 4 or 8: the widths gptq.pack stores densely
    groupsize: int = 128  # input columns per (scale, zero); -1: one pair per output row
    act_order: bool = False  # GPTQ: columns by decreasing H_jj (stores g_idx when grouped)
    sym: bool = False  # symmetric grid (zero fixed at 2^(bits-1))
    percdamp: float = 0.01  # GPTQ damping, a fraction of mean(diag H)
    blocksize: int = 128  # GPTQ lazy-batch block of columns

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizeError(f"quantization method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.wbits not in PACK_BITS:
            raise QuantizeError(f"--wbits {self.wbits}: packed storage exists for "
                                f"{', '.join(map(str, PACK_BITS))} bits")
        if self.groupsize != -1 and self.groupsize < 1:
            raise QuantizeError(f"--groupsize {self.groupsize}: give -1 (one group per output row) or a "
                                f"positive number of columns, e.g. 128")
        if self.method == "rtn" and self.act_order:
            raise QuantizeError("--act_order orders GPTQ's columns; round-to-nearest has no column order "
                                "(drop --act_order or use --quant gptq)")
        if not 0.0 <= self.percdamp <= 1.0:
            raise QuantizeError(f"--percdamp {self.percdamp}: the damping is a fraction of the mean "
                                f"Hessian diagonal in [0, 1] (GPTQ uses 0.01)")
        if self.blocksize < 1:
            raise QuantizeError(f"--blocksize {self.blocksize}: must be at least 1 (GPTQ uses 128)")

    @property
    def needs_activations(self) -> bool:
        return self.method == "gptq"

    def spec(self) -> QuantSpec:
        return QuantSpec(self.wbits, self.groupsize, self.sym)

    def to_dict(self) -> dict:
        out = {"method": self.method, "wbits": self.wbits, "groupsize": self.groupsize, "sym": self.sym}
        if self.method == "gptq":
            out.update(act_order=self.act_order, percdamp=self.percdamp, blocksize=self.blocksize)
        return out


def _relative_weight_error(weight: torch.Tensor, module: QuantLinear) -> float:
    w = weight.detach().float()
    norm = float(torch.linalg.norm(w))
    return float(torch.linalg.norm(module.dequantized_weight().to(w.device) - w)) / norm if norm > 0 else 0.0


def _output_energy(weight: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H W^T) / 2: GPTQ's loss of quantizing W to 0, the scale its loss is relative to."""
    w = weight.detach().to(H.device, H.dtype)
    return 0.5 * float(((w @ H) * w).sum())


class Quantize:
    needs_reference = False

    def __init__(self, options: QuantizeOptions, records: dict | None = None):
        self.options = options
        self.spec = options.spec()
        self.records = records if records is not None else {}
        self.needs_activations = options.needs_activations

    # ------------------------------------------------------------------------------ the pass
    def __call__(self, context: LayerContext) -> None:
        # every LowRankLinear (as one unit, v then u) and every plain nn.Linear that is not a factor of one
        units = linear_units(context.layer, (LowRankLinear, nn.Linear))
        if not units:
            return
        if not self.needs_activations:
            for name, module in units.items():
                self._quantize_unit(context, name, module, None)
            return
        for group in execution_groups(context, units):
            solver = self._input_hessian(context, units[group[0]])
            for name in group:
                self._quantize_unit(context, name, units[name], solver)
            if solver is not None:
                solver.free()

    def _input_hessian(self, context: LayerContext, module: nn.Module) -> GPTQ | None:
        """H_x of `module`'s input over every calibration window (None if the module never runs)."""
        solver = GPTQ(module.in_features, device=context.device)
        context.capture({"input": module}, lambda _name, x: solver.add_batch(x))
        return solver if solver.nsamples else None

    def _quantize_unit(self, context: LayerContext, name: str, module: nn.Module, solver: GPTQ | None) -> None:
        if isinstance(module, LowRankLinear):
            module.v = self._quantize_linear(context, f"{name}.v", module.v, solver, "inputs")
            if solver is not None:
                vq = module.v.dequantized_weight().to(solver.H.device, solver.H.dtype)
                solver_u = GPTQ.from_hessian(vq @ solver.H @ vq.T, solver.nsamples)
                module.u = self._quantize_linear(context, f"{name}.u", module.u, solver_u, "outputs of the quantized v")
                solver_u.free()
            else:
                module.u = self._quantize_linear(context, f"{name}.u", module.u, None, None)
            return
        set_submodule(context.layer, name, self._quantize_linear(context, name, module, solver, "inputs"))

    def _quantize_linear(self, context: LayerContext, name: str, linear: nn.Linear, solver: GPTQ | None,
                         hessian: str | None) -> QuantLinear:
        options, weight = self.options, linear.weight.detach()
        record = {"in_features": linear.in_features, "out_features": linear.out_features,
                  "bits": options.wbits, "groupsize": options.groupsize, "sym": options.sym,
                  "bias": linear.bias is not None}
        if options.method == "gptq" and solver is not None:
            quantized = solver.solve(weight, self.spec, options.blocksize, options.percdamp, options.act_order)
            energy = _output_energy(weight, solver.H)
            record.update(method="gptq", hessian=hessian, loss=solver.last_loss,
                          relative_loss=solver.last_loss / energy if energy > 0 else 0.0)
        else:
            quantized = rtn(weight, self.spec)  # onto the stored (float16) grid, as GPTQ
            record["method"] = "rtn"
            if options.method == "gptq":  # a linear no calibration token reached
                record["fallback"] = "rtn: the module never ran on the calibration windows"
        bias = linear.bias.detach() if linear.bias is not None else None
        try:
            module = quant_linear_from(quantized, bias, weight.dtype, weight.device)
        except ValueError as error:
            raise QuantizeError(f"{context.name}.{name}: {error}") from None
        record["g_idx"] = module.g_idx is not None
        record["relative_weight_error"] = _relative_weight_error(weight, module)
        self.records[f"{context.name}.{name}"] = record
        return module


# ---------------------------------------------------------------------------------------- flags

GROUP = "quantization (step 8; docs/quantization.md)"
DEFAULTS = {"quant": "gptq", "wbits": 4, "groupsize": 128}  # flags left out (None: --weight_quant may set them)
WEIGHT_QUANT = {"rtn_int8": {"quant": "rtn", "wbits": 8, "groupsize": -1}}  # ASVD: RTN per output channel
FLAGS = (
    Flag(("--quant",), "quant", GROUP, choices=METHODS,
         help="GPTQ (Hessian-aware, needs --nsamples calibration windows) or round-to-nearest (default gptq)"),
    Flag(("--wbits",), "wbits", GROUP, type=int, help="bits per weight code: 2, 3, 4 or 8, stored packed (default 4)"),
    Flag(("--groupsize",), "groupsize", GROUP, type=int,
         help="input columns per float16 scale/zero pair; -1: one pair per output row (default 128)"),
    Flag(("--act_order",), "act_order", GROUP, default=False, action="store_true",
         help="GPTQ: quantize columns by decreasing Hessian diagonal"),
    Flag(("--sym",), "sym", GROUP, default=False, action="store_true",
         help="symmetric grid (zero point fixed at 2^(bits-1))"),
    Flag(("--percdamp",), "percdamp", GROUP, default=0.01, type=float,
         help="GPTQ damping, fraction of the mean Hessian diagonal"),
    Flag(("--blocksize",), "blocksize", GROUP, default=128, type=int, help="GPTQ: columns per lazy-batch block"),
    Flag(("--nsamples",), "nsamples", GROUP, default=128, type=int,
         help="GPTQ calibration windows of --model_seq_len tokens from --dataset (GPTQ uses 128)"),
    Flag(("--weight_quant",), "weight_quant", GROUP, choices=("rtn_int8", "rtn_int6"),
         help="ASVD's flag: with step 3, quantize its output by RTN per output channel "
              "(= --step 3,8 --quant rtn --wbits 8 --groupsize -1); rtn_int6 is refused (no packed 6-bit layout)"),
)


def options_from_flags(values: dict) -> QuantizeOptions:
    return QuantizeOptions(values["quant"], values["wbits"], values["groupsize"], values["act_order"], values["sym"],
                           values["percdamp"], values["blocksize"])


def check_flags(values: dict) -> dict:
    """--weight_quant (ASVD's alias, which adds step 8 after step 3), the defaults of the flags it
    sets, and with step 8 the options' own checks."""
    steps = set(values.get("steps") or ())
    resolved: dict = {}
    weight_quant = values["weight_quant"]
    if weight_quant:
        if not steps & {3, 8}:
            raise FlagError(f"--weight_quant {weight_quant} quantizes the output of step 3: give --step 3 (or 8)")
        if weight_quant not in WEIGHT_QUANT:
            raise FlagError(f"--weight_quant {weight_quant}: 6-bit codes have no packed layout here (packed: "
                            f"2, 3, 4 and 8 bits), so int6 would take a byte per weight on disk like int8, with more "
                            f"error; use rtn_int8, or --quant rtn --wbits 4")
        for name, value in WEIGHT_QUANT[weight_quant].items():
            given = values[name]
            if given is not None and given != value:
                raise FlagError(f"--weight_quant {weight_quant} means --quant rtn --wbits 8 --groupsize -1; "
                                f"it contradicts --{name} {given}")
            resolved[name] = value
        steps.add(8)
        resolved["steps"] = sorted(steps)
    for name, value in DEFAULTS.items():
        if resolved.get(name, values[name]) is None:
            resolved[name] = value
    if 8 not in steps:
        return resolved
    try:
        options_from_flags({**values, **resolved})
    except QuantizeError as error:
        raise FlagError(str(error)) from None
    if values["nsamples"] < 1:
        raise FlagError("--nsamples must be at least 1 (GPTQ uses 128 calibration windows)")
    return resolved


METHOD = Method("quantize", FLAGS, options_from_flags, check_flags, step=8)
