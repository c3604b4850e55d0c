"""The speed work changes no result: fused shared-input factors, the low-bit CPU kernels and
rank rounding give what the plain paths give (to float rounding), and rounded plans keep the budget."""
import pytest
import torch

from component import LowRankLinear
from component.low_rank_linear import unshare_inputs
from component.quant_linear import quant_linear_from, set_low_bit_kernel
from gptq import QuantSpec, rtn
from tests.tiny_models import FAMILIES, tiny_model
from utils.io import load_compressed, save_compressed
from utils.model import decoder_layers, fuse_shared_inputs, layer_prefix, set_submodule, target_linears, target_shapes
from utils.plan import Plan, PlanError


def low_rank_everywhere(family: str, rank: int = 5) -> tuple[torch.nn.Module, dict]:
    """A tiny model with every target linear replaced by random rank-`rank` factors."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(11)
    prefix, ranks = layer_prefix(model), {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, dense in target_linears(layer).items():
            u = torch.randn(dense.out_features, rank, generator=generator) / rank ** 0.5
            v = torch.randn(rank, dense.in_features, generator=generator) / dense.in_features ** 0.5
            bias = None if dense.bias is None else torch.randn(dense.out_features, generator=generator)
            qualified = f"{prefix}.{index}.{name}"
            set_submodule(model, qualified, LowRankLinear.from_factors(u, v, bias, torch.float32, "cpu"))
            ranks[qualified] = rank
    return model.eval(), {"format_version": 1, "base_model": "tiny", "ranks": ranks}


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_shared_inputs_give_the_unfused_logits(family, tmp_path):
    model, compression = low_rank_everywhere(family)
    with torch.no_grad():
        expected = model(ids()).logits
    path = str(tmp_path / "m")
    save_compressed(model, None, path, compression)
    fused, _, _ = load_compressed(path, fuse=True)
    groups = {id(m.shared_input) for m in fused.modules() if getattr(m, "shared_input", None) is not None}
    # q/k/v in every family, gate/up in all but OPT (fc1 has no sibling), per layer
    assert len(groups) == 2 * (1 if family == "opt" else 2)
    with torch.no_grad():
        got = fused(ids()).logits
        again = fused(ids()).logits  # a second forward: fresh input, no stale product
    # float32 rounding of two matmul shapes, carried through the layers: 1e-6 of the largest logit
    # per fused layer, a few times that at the logits (float64: test_fusion_survives_a_cast...)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(got, again)
    x = torch.randn(2, 7, fused.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for layer, plain in zip(decoder_layers(fused), decoder_layers(model)):
        for group in ("self_attn", "mlp"):
            names = [n for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1")
                     if hasattr(getattr(layer, group, layer), n)]
            with torch.no_grad():
                for name in names:
                    out = getattr(getattr(layer, group, layer), name)(x)
                    ref = getattr(getattr(plain, group, plain), name)(x)
                    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max(), name
    # the saved tensors are untouched: same names, shapes and values as the unfused model's
    state = fused.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    # the v weights are views into one storage: no extra memory
    attention = decoder_layers(fused)[0].self_attn
    q, k = attention.q_proj.v.weight, attention.k_proj.v.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()


def test_fusion_survives_a_cast_and_a_second_save(tmp_path):
    model, compression = low_rank_everywhere("llama")
    save_compressed(model, None, str(tmp_path / "a"), compression)
    fused, _, _ = load_compressed(str(tmp_path / "a"), fuse=True)
    with torch.no_grad():
        fused(ids())
        expected = model.double()(ids()).logits
        got = fused.double()(ids()).logits  # the cast gives each v its own tensor; fused again at the call
    assert (got - expected).abs().max() <= 1e-12 * expected.abs().max()
    save_compressed(fused, None, str(tmp_path / "b"), compression)  # shared storage is split for safetensors
    reloaded, _, _ = load_compressed(str(tmp_path / "b"), torch.float64)
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, model(ids()).logits)


def test_fused_groups_run_unfused_under_gradients_and_hooks():
    model, _ = low_rank_everywhere("llama")
    assert fuse_shared_inputs(model) == 4
    q = decoder_layers(model)[0].self_attn.q_proj
    x = torch.randn(3, 64)
    assert q.shared_input.project(x, q) is None  # gradients wanted: parameters must see their use
    with torch.no_grad():
        assert q.shared_input.project(x, q) is not None
        seen = []
        handle = q.v.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        q(x)
        handle.remove()
    assert len(seen) == 1  # GPTQ's input capture hooks v: v must still run
    assert unshare_inputs(model) == 10  # 2 layers x (q, k, v, gate, up)


def quantized_pair(bits: int, groupsize: int, out_features: int = 40, in_features: int = 200, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    layer = quant_linear_from(rtn(weight, QuantSpec(bits, groupsize)), bias, torch.float32)
    return layer, torch.randn(3, 5, in_features, generator=generator)


@pytest.mark.parametrize("bits,groupsize,kernel", [(4, 64, "int4pack"), (4, -1, "int4pack"), (4, 128, "int4pack"),
                                                   (3, 32, "int4pack"), (2, 64, "int4pack"), (8, -1, "int8pack")])
def test_low_bit_kernel_matches_dequantization(bits, groupsize, kernel):
    layer, x = quantized_pair(bits, groupsize)
    assert layer.kernel() == kernel
    weight = layer.dequantized_weight()
    with torch.no_grad():
        exact = torch.nn.functional.linear(x, weight, layer.bias)
        assert torch.equal(layer(x), exact)  # float32 inputs de-quantize unless asked
        # bfloat16 inputs take the kernel: the de-quantized product in bfloat16, to its rounding (2^-8)
        got = layer(x.bfloat16())
        expected = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16(), layer.bias.bfloat16())
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        assert (got.float() - expected.float()).abs().max() <= 1e-2 * expected.float().abs().max()
        assert set_low_bit_kernel(layer, torch.bfloat16, cast=True) == 1  # float32 through the kernel
        cast = layer(x)
        assert cast.dtype == torch.float32
        assert 0 < (cast - exact).abs().max() <= 1e-2 * exact.abs().max()
        set_low_bit_kernel(layer, None)
        assert torch.equal(layer(x.bfloat16()), expected)  # no kernel: de-quantized in bfloat16


@pytest.mark.parametrize("bits,groupsize", [(8, 64), (4, 48)])
def test_layouts_without_a_kernel_dequantize(bits, groupsize):
    layer, x = quantized_pair(bits, groupsize)
    assert layer.kernel().startswith("dequantize (")
    assert set_low_bit_kernel(layer, torch.bfloat16, cast=True) == 0
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias))


def test_rounded_plan_keeps_multiples_and_the_budget():
    shapes = target_shapes(tiny_model("llama"))
    plan = Plan.uniform(shapes, 0.3)
    for multiple in (2, 4, 8, 16):
        rounded = plan.round_ranks(multiple)
        assert all(rank % multiple == 0 for rank in rounded.ranks.values())
        assert rounded.params_after() <= plan.params_after()
        rounded.validate(shapes)
    with pytest.raises(PlanError, match="rank multiple"):
        plan.round_ranks(0)


def test_rank_below_the_multiple_takes_the_multiple_or_stays_dense():
    from utils.plan import ModulePlan
    plan = Plan({"a": ModulePlan(100, 100, False, 3), "b": ModulePlan(100, 100, False, 47),
                 "c": ModulePlan(20, 20, False, 3)})
    rounded = plan.round_ranks(16)
    assert rounded.modules["a"].rank == 16 and rounded.modules["b"].rank == 32
    assert rounded.modules["c"].rank is None  # 16 (20 + 20) is not below 20 x 20
    assert rounded.params_after() == 16 * 200 + 32 * 200 + 400 <= plan.params_after() == 3 * 200 + 47 * 200 + 3 * 40
    with pytest.raises(PlanError, match="more than the plan"):  # nothing to pay for a's 3 -> 16
        Plan({"a": ModulePlan(100, 100, False, 3)}).round_ranks(16)


def test_perplexity_unchanged_by_fusion(tmp_path):
    from evaluater import perplexity
    model, compression = low_rank_everywhere("qwen2")
    save_compressed(model, None, str(tmp_path / "m"), compression)
    text = torch.randint(0, 256, (4 * 32,), generator=torch.Generator().manual_seed(9))
    plain = perplexity(load_compressed(str(tmp_path / "m"))[0], text, 32)["ppl"]
    fused = perplexity(load_compressed(str(tmp_path / "m"), fuse=True)[0], text, 32)["ppl"]
    assert plain == pytest.approx(fused, rel=1e-4)
    assert plain > 200  # a random model on random tokens: near the vocabulary size, so the check has teeth


def test_a_fused_group_recomputes_for_a_changed_input_or_a_replaced_weight():
    model, _ = low_rank_everywhere("llama")
    assert fuse_shared_inputs(model) == 4
    attn = decoder_layers(model)[0].self_attn
    x = torch.randn(3, 64)

    def error(member: LowRankLinear) -> float:  # against the member's own two matmuls, relative
        expected = member.u(member.v(x))
        return float((member(x) - expected).abs().max() / expected.abs().max())

    with torch.no_grad():
        attn.q_proj(x)  # the product made; k and v wait for their slices of it
        x.mul_(2)  # changed in place: k must not take the stale product
        assert error(attn.k_proj) <= 1e-6
        attn.v_proj.v.weight.data = torch.randn_like(attn.v_proj.v.weight)  # v given storage of its own
        assert error(attn.v_proj) <= 1e-6
        assert error(attn.q_proj) <= 1e-6


def test_factors_run_as_plain_matmuls_unless_something_watches_them():
    """LowRankLinear runs a plain factor as F.linear (no module call); a hook on a factor, a global
    hook or a forward replaced on the instance (accelerate's offload) must still see it run."""
    torch.manual_seed(0)
    layer = LowRankLinear(12, 10, 4, bias=True)
    x = torch.randn(3, 12)
    expected = x @ layer.v.weight.T @ layer.u.weight.T + layer.u.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    handle = layer.v.register_forward_hook(lambda m, i, o: o * 2)
    assert torch.allclose(layer(x), 2 * (x @ layer.v.weight.T) @ layer.u.weight.T + layer.u.bias, atol=1e-6)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o + 1 if m is layer.u else None)
    try:
        assert torch.allclose(layer(x), expected + 1, atol=1e-6)
    finally:
        handle.remove()
    plain = layer.u.forward
    layer.u.forward = lambda inputs: plain(inputs) - 3
    assert torch.allclose(layer(x), expected - 3, atol=1e-6)
    del layer.u.forward
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_fixed_cost_of_a_step_and_what_a_limit_attains_with_it():
    """bench_speed --fixed_cost: the original with every linear free keeps its output shapes and
    reads no weight matrix; a limit is attained only on the part of the step that shrinks."""
    from scripts.bench_speed import attainable, decode_weight_bytes, without_linears
    model = tiny_model("llama")
    free = without_linears(model)
    assert not any(type(m) is torch.nn.Linear for m in free.modules())
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # the copy, not the original
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        assert free(ids).logits.shape == model(ids).logits.shape
    assert decode_weight_bytes(model) > 0
    assert attainable(2.0, 1.0, 0.0) == pytest.approx(2.0)
    assert attainable(2.0, 1.0, 0.5) == pytest.approx(1 / (0.5 + 0.25))
    assert attainable(1.0, 1.0, 0.3) == pytest.approx(1.0)
