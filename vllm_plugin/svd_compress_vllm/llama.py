"""vLLM's Llama with the projections of a compressed directory as factor pairs on vLLM's own linear layers.

A low-rank projection W ~= U V runs as two of vLLM's linears, so the factors get the kernels (and, on the
CPU, the pre-packed oneDNN weights) that vLLM gives its dense projections. Projections that share an input
share one product for their V factors, as vLLM fuses q/k/v and gate/up: one merged linear over the
stacked V, then each U on its slice of the result. A projection the plan kept dense stays one linear.
Everything else (embedding, norms, rotary, paged attention, sampling) is vLLM's Llama unchanged.

Loads the tensors our export writes (`...q_proj.u.weight`, `...q_proj.v.weight`, or `...q_proj.weight`
for a dense one) by name; ranks come from config.json's compression block, before any weight is read.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from svd_compress_vllm.refusals import TRANSFORMERS_BACKEND, refusal

# a tensor of ours: (layer prefix, block, projection, "u" | "v" | "" for a dense weight)
TENSOR_NAME = re.compile(r"^(.*)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(?:(u|v)\.)?weight$")
GROUP_OF = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}


def servable(config) -> None:
    """Refuse, with the way out, what this plugin cannot serve (config: the directory's Hugging Face config)."""
    why = refusal(config.to_dict())
    if why:
        raise ValueError(f"the vLLM plugin does not serve {why}; {TRANSFORMERS_BACKEND}")
    if get_tensor_model_parallel_world_size() != 1:
        raise ValueError("tensor parallelism of low-rank factors is not supported: use tensor_parallel_size=1")


class SharedInputProjections(nn.Module):
    """Projections of one input (q/k/v, gate/up, or a single one), each low-rank or dense.

    forward(x) returns their outputs in order: one merged product for every V, then each U on its
    slice; the dense ones as one merged product."""

    def __init__(self, names: list[str], in_size: int, out_sizes: list[int], ranks: list[int | None], prefix: str):
        super().__init__()
        self.names = names
        self.low = [n for n, r in zip(names, ranks) if r]
        self.low_ranks = [r for r in ranks if r]
        self.dense_names = [n for n, r in zip(names, ranks) if not r]
        self.dense_sizes = [s for s, r in zip(out_sizes, ranks) if not r]
        self.v = (MergedColumnParallelLinear(in_size, self.low_ranks, bias=False, return_bias=False,
                                             prefix=f"{prefix}.v") if self.low else None)
        self.u = nn.ModuleDict({n: ReplicatedLinear(r, size, bias=False, return_bias=False, prefix=f"{prefix}.{n}.u")
                                for n, size, r in zip(names, out_sizes, ranks) if r})
        self.dense = (MergedColumnParallelLinear(in_size, self.dense_sizes, bias=False, return_bias=False,
                                                 prefix=f"{prefix}.dense") if self.dense_names else None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = {}
        if self.v is not None:
            inner = self.v(x)
            parts = inner.split(self.low_ranks, dim=-1) if len(self.low) > 1 else (inner,)
            for name, part in zip(self.low, parts):
                out[name] = self.u[name](part)
        if self.dense is not None:
            full = self.dense(x)
            parts = full.split(self.dense_sizes, dim=-1) if len(self.dense_names) > 1 else (full,)
            out.update(zip(self.dense_names, parts))
        return [out[n] for n in self.names]

    def load(self, name: str, factor: str, tensor: torch.Tensor) -> nn.Parameter:
        """Put one tensor of ours (factor "u", "v" or "" for dense) where it belongs; the parameter it filled."""
        if factor == "u" and name in self.u:
            param = self.u[name].weight
            param.weight_loader(param, tensor)
        elif factor == "v" and name in self.low:
            param = self.v.weight
            param.weight_loader(param, tensor, self.low.index(name))
        elif factor == "" and name in self.dense_names:
            param = self.dense.weight
            param.weight_loader(param, tensor, self.dense_names.index(name))
        else:
            kind = "a dense weight" if factor == "" else f"a {factor} factor"
            raise ValueError(f"the checkpoint has {kind} for {name}_proj, which config.json's ranks do not "
                             f"describe: the directory's weights and its compression block disagree")
        return param


def _ranks(config, prefix: str, names: list[str]) -> list[int | None]:
    ranks = config.compression["ranks"]
    return [ranks.get(f"{prefix}.{n}_proj") or None for n in names]


class LowRankAttention(LlamaAttention):
    def __init__(self, config, hidden_size: int, *args, prefix: str = "", **kwargs):
        # vLLM's attention builds its dense q/k/v and o first (one layer at a time); they are replaced here
        super().__init__(config, hidden_size, *args, prefix=prefix, **kwargs)
        del self.qkv_proj, self.o_proj
        sizes = [self.q_size, self.kv_size, self.kv_size]
        self.qkv = SharedInputProjections(["q", "k", "v"], hidden_size, sizes, _ranks(config, prefix, ["q", "k", "v"]),
                                          f"{prefix}.qkv")
        self.o = SharedInputProjections(["o"], self.q_size, [hidden_size], _ranks(config, prefix, ["o"]),
                                        f"{prefix}.o")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(hidden_states)
        q, k = self.rotary_emb(positions, q, k)
        return self.o(self.attn(q, k, v))[0]


class LowRankMLP(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up = SharedInputProjections(["gate", "up"], hidden, [inner, inner],
                                              _ranks(config, prefix, ["gate", "up"]), f"{prefix}.gate_up")
        self.down = SharedInputProjections(["down"], inner, [hidden], _ranks(config, prefix, ["down"]),
                                           f"{prefix}.down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)[0]


class LowRankDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=LowRankAttention)
        self.mlp = LowRankMLP(config or vllm_config.model_config.hf_config, f"{prefix}.mlp")


class LowRankLlamaForCausalLM(LlamaForCausalLM):
    # vLLM's LoRA adapters address the fused dense projections, which this model does not have
    packed_modules_mapping: dict = {}

    def __init__(self, *, vllm_config, prefix: str = ""):
        servable(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=LowRankDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        names = {id(p): n for n, p in params.items()}
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name.startswith("lm_head.") and self.config.tie_word_embeddings):
                continue
            match = TENSOR_NAME.match(name)
            if match:
                layer, block, projection, factor = match.groups()
                group = modules.get(f"{layer}.{block}.{GROUP_OF[projection]}")
                if group is None:  # a layer another pipeline stage holds
                    continue
                loaded.add(names[id(group.load(projection, factor or "", tensor))])
            elif name in params:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
            else:
                raise ValueError(f"the checkpoint's tensor {name} has no place in the plugin's Llama; "
                                 f"{TRANSFORMERS_BACKEND}")
        return loaded
