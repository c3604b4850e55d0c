"""The one low-rank linear layer of the toolkit.

W (out x in) is replaced by u @ v with v: in -> rank (no bias) and u: rank -> out (carrying
the original bias), so y = u(v(x)). Parameters: rank * (in + out) (+ out for the bias). Step 8 may replace u and/or v by
component.quant_linear.QuantLinear (packed codes); the forward is unchanged.

Low-rank layers that read the same input (attention q/k/v, MLP gate/up) can share one
SharedInputProjection (share_inputs, at load): their v factors then run as one matmul and each u
reads its slice of the result. Nothing saved changes: each v.weight stays a parameter of its own
name, a view into the concatenated weight. Only torch is used here: utils/hf_remote.py copies this
file's classes into the modeling file of every saved directory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def largest_entry_fits(dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[bool, float]:
    """(every entry is finite and within `dtype`'s range, the largest |entry|); float16 tops out
    at 65504. Checked on the (float64) source before a cast that would turn it into inf."""
    largest = max(float(t.detach().abs().max()) for t in tensors)
    return (not dtype.is_floating_point or largest <= torch.finfo(dtype).max), largest  # NaN fails too


def is_plain_linear(factor: nn.Module) -> bool:
    """A plain nn.Linear that nothing watches: no module or global hook, no forward replaced on the
    instance (accelerate's offload hooks load the weights there), so F.linear on its weights is its call."""
    hooks = torch.nn.modules.module
    return (type(factor) is nn.Linear and "forward" not in factor.__dict__
            and not (factor._forward_hooks or factor._forward_pre_hooks or factor._backward_hooks
                     or factor._backward_pre_hooks)
            and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                     or hooks._global_backward_pre_hooks))


def run_factor(factor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """factor(x), as F.linear when the factor is a plain linear nothing watches: nn.Module's call
    costs more than a decode step's matmul of a small rank, and a low-rank layer makes two."""
    if is_plain_linear(factor):
        weights = factor._parameters
        return F.linear(x, weights["weight"], weights["bias"])
    return factor(x)


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.u = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        self.shared_input = None  # a SharedInputProjection (a plain object: no state of its own)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype, device: torch.device | str) -> "LowRankLinear":
        """Build from u (out x r) and v (r x in); the bias (out,) goes on u. ValueError when an
        entry is not finite or does not fit in `dtype` (float16 tops out at 65504)."""
        fits, largest = largest_entry_fits(dtype, u, v)
        if not fits:
            raise ValueError(f"low-rank factors with largest |entry| {largest:.4g} do not fit in {dtype}; "
                             f"use --dtype float32 or bfloat16")
        out_features, rank = u.shape
        module = cls(v.shape[1], out_features, rank, bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            module.u.weight.copy_(u)
            module.v.weight.copy_(v)
            if bias is not None:
                module.u.bias.copy_(bias)
        return module

    @property
    def weight_product(self) -> torch.Tensor:
        """The dense matrix u @ v this module stands for (for tests and analysis); quantized factors
        (component.quant_linear.QuantLinear) count as their de-quantized float32 weights."""
        def dense(factor: nn.Module) -> torch.Tensor:
            return factor.dequantized_weight() if hasattr(factor, "dequantized_weight") else factor.weight
        u, v = dense(self.u), dense(self.v)
        return u.to(v.dtype) @ v if u.dtype != v.dtype else u @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self._modules  # (not self.u / self.v: nn.Module's attribute lookup is slow at decode's sizes)
        if self.shared_input is not None:
            projected = self.shared_input.project(x, self)
            if projected is not None:
                return run_factor(factors["u"], projected)
        return run_factor(factors["u"], run_factor(factors["v"], x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.u.bias is not None}")


class SharedInputProjection:
    """The v factors of low-rank layers fed the same tensor, run as one matmul.

    The first member called with an input computes x @ [v_1; v_2; ...]^T once; the others, called
    with that very tensor (same object, unmodified), take their slices of it; once every member
    has taken its slice the group lets go of the input and the product. The members' v
    weights become row blocks of the concatenated weight (views: no extra memory, and the
    parameters keep their names and shapes). A move or cast of the model gives each parameter
    a tensor of its own again; the next call concatenates anew. Members run unfused while
    gradients are wanted, while a v carries a forward hook, or once a v is no longer a plain linear
    (quantized, LoRA-wrapped): checked for the whole group when an input's product is made (later
    members of that forward check only their own weight)."""

    def __init__(self, members: list[LowRankLinear]):
        self.members = list(members)
        self.starts: dict[int, tuple[int, int]] = {}  # id(member) -> its rows of the fused weight
        self.fused: torch.Tensor | None = None
        self._pointer_of: dict[int, int] = {}  # id(member) -> its v.weight.data_ptr() as fused
        self._others: dict[int, frozenset[int]] = {}  # id(member) -> the ids of the other members
        self._input: torch.Tensor | None = None
        self._input_version = -1
        self._output: torch.Tensor | None = None
        self._waiting: set[int] = set()  # members that have not yet taken their slice of _output

    def forget(self) -> None:
        """Let go of the fused weight and any product (the next call concatenates anew): after the
        members' weights were moved, cast or put back, it is a stale copy that only holds memory."""
        self.fused, self.starts, self._pointer_of, self._others = None, {}, {}, {}
        self._input = self._output = None
        self._waiting = set()

    @torch.no_grad()
    def _fuse(self) -> None:
        self._input = self._output = None
        fused = torch.cat([member.v.weight.detach() for member in self.members])
        start = 0
        for member in self.members:
            rows = member.v.weight.shape[0]
            member.v.weight.data = fused[start:start + rows]
            self.starts[id(member)] = (start, start + rows)
            start += rows
        self.fused = fused
        self._pointer_of = {id(member): member.v.weight.data_ptr() for member in self.members}
        self._others = {id(member): frozenset(id(m) for m in self.members if m is not member) for member in self.members}

    def project(self, x: torch.Tensor, member: LowRankLinear) -> torch.Tensor | None:
        """member.v(x) from the shared product, or None when the members must run unfused."""
        key, own = id(member), member._modules["v"]
        waiting = self._waiting
        if (key in waiting and x is self._input and x._version == self._input_version and type(own) is nn.Linear
                and own._parameters["weight"].data_ptr() == self._pointer_of[key]):
            # a later member of the same forward: the product is this very input's, the group checked
            # when it was made (those checks cost more than a decode step's matmul of a small rank,
            # so they run once per input; only this member's weight is checked again)
            waiting.discard(key)
            start, end = self.starts[key]
            projected = self._output[..., start:end]
            if not waiting:  # all served: hold no activations between forwards
                self._input = self._output = None
            return projected
        # (through _modules and _parameters: nn.Module's attribute lookup costs a decode step more than its
        # matmuls; plain loops: a generator expression costs more than the checks it runs)
        grad = torch.is_grad_enabled()
        pointers = self._pointer_of
        intact = self.fused is not None
        for m in self.members:
            v = m._modules["v"]
            if not is_plain_linear(v):
                return None  # a v replaced, or watched by a hook (GPTQ's input capture) that must see it run
            weight = v._parameters["weight"]
            if grad and weight.requires_grad:
                return None
            # a move or cast gives a weight new storage while self.fused keeps the old alive, so a
            # pointer at its place in self.fused means the weight is still that view
            if intact and weight.data_ptr() != pointers[id(m)]:
                intact = False
        if not intact:
            self._fuse()
        self._output = F.linear(x, self.fused)
        self._input, self._input_version = x, x._version
        self._waiting = set(self._others[key])
        start, end = self.starts[key]
        projected = self._output[..., start:end]
        if not self._waiting:
            self._input = self._output = None
        return projected


def share_inputs(model: nn.Module, sibling_names: tuple[tuple[str, ...], ...]) -> int:
    """Give every group of at least two LowRankLinear siblings (children of one module, named
    together in one tuple of `sibling_names`, e.g. q_proj/k_proj/v_proj) one SharedInputProjection;
    the caller vouches that the parent feeds them the same tensor. Returns the groups formed."""
    groups = 0
    for parent in model.modules():
        for names in sibling_names:
            members = [parent._modules[name] for name in names if type(parent._modules.get(name)) is LowRankLinear]
            if len(members) >= 2:
                projection = SharedInputProjection(members)
                for member in members:
                    member.shared_input = projection
                groups += 1
    return groups


def forget_fused_inputs(root: nn.Module) -> None:
    """SharedInputProjection.forget for every group under `root` (its members stay grouped)."""
    for module in root.modules():
        if getattr(module, "shared_input", None) is not None:
            module.shared_input.forget()


def unshare_inputs(model: nn.Module) -> int:
    """Undo share_inputs: every v weight gets its own storage again (safetensors refuses tensors
    that share memory). Returns the layers released."""
    count = 0
    for module in model.modules():
        if getattr(module, "shared_input", None) is not None:
            if type(module.v) is nn.Linear:
                with torch.no_grad():
                    module.v.weight.data = module.v.weight.detach().clone()
            module.shared_input = None
            count += 1
    return count
