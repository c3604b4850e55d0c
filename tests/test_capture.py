"""Issue 33: the one way a pass captures a layer's module inputs (utils.layerwise.recording_inputs,
first_inputs, LayerContext.capture / collect) and the one listing of linear units (utils.model.linear_units)."""
import pytest
import torch
from torch import nn

from component import ColumnPreservedLinear, LowRankLinear, QuantLinear
from tests.tiny_models import tiny_model
from utils.layerwise import (LayerContext, StopLayer, capture_layer_inputs, feed_layer, first_inputs,
                             recording_inputs, run_layer)
from utils.model import decoder_layers, layer_linear_units, linear_units, set_submodule, target_linears

WINDOWS = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def layer_and_inputs():
    model = tiny_model("llama")
    hidden, layer_args = capture_layer_inputs(model, WINDOWS, "cpu")
    return decoder_layers(model)[0], hidden, layer_args[0]


def _hooks(*modules: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def _seen_by_a_hook(layer, hidden, layer_args, modules):
    """(name, copy of the input) of every call of `modules`, from a plain forward hook, whole layer run."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.append((n, args[0].clone())))
               for n, m in modules.items()]
    try:
        run_layer(layer, hidden, layer_args)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_records_exactly_what_a_hook_sees(layer_and_inputs):
    layer, hidden, layer_args = layer_and_inputs
    modules = target_linears(layer)
    expected = _seen_by_a_hook(layer, hidden, layer_args, modules)
    recorded = []
    with recording_inputs(modules, lambda name, x: recorded.append((name, x.clone()))):
        outputs = run_layer(layer, hidden, layer_args)
    assert [n for n, _ in recorded] == [n for n, _ in expected]
    assert len(recorded) == 7 * len(WINDOWS)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(recorded, expected))
    assert torch.equal(outputs, run_layer(layer, hidden, layer_args))  # recording changes nothing
    # first_inputs: per window, each module's input at its first call, in the order they ran
    captured = first_inputs(layer, modules, hidden, layer_args)
    per_window = len(expected) // len(WINDOWS)
    for w, window in enumerate(captured):
        calls = expected[w * per_window:(w + 1) * per_window]
        assert list(window) == [n for n, _ in calls]
        assert all(torch.equal(window[n], x) for n, x in calls)
    # q/k/v share one tensor, gate/up another: what the execution groups are built on
    window = captured[0]
    assert window["self_attn.q_proj"] is window["self_attn.k_proj"] is window["self_attn.v_proj"]
    assert window["mlp.gate_proj"] is window["mlp.up_proj"]
    assert window["self_attn.o_proj"] is not window["self_attn.q_proj"]


def test_stops_the_layer_when_asked(layer_and_inputs):
    layer, hidden, layer_args = layer_and_inputs
    attention = {n: layer.get_submodule(f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")}
    later = {n: layer.get_submodule(n) for n in ("self_attn.o_proj", "mlp.down_proj")}
    ran = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: ran.append(n)) for n, m in later.items()]
    try:
        recorded = []
        with recording_inputs(attention, lambda name, x: recorded.append(name), stop_layer=layer):
            feed_layer(layer, hidden, layer_args)
        # every window stops after v_proj: nothing after it runs, and each window records q, k, v once
        assert ran == []
        assert recorded == ["q_proj", "k_proj", "v_proj"] * len(WINDOWS)
        with pytest.raises(StopLayer):  # outside feed_layer the stop reaches the caller
            with recording_inputs(attention, lambda name, x: None, stop_layer=layer):
                run_layer(layer, hidden, layer_args, range(0, 1))
        assert ran == []
        # without stop_layer the whole layer runs
        with recording_inputs(attention, lambda name, x: None):
            feed_layer(layer, hidden, layer_args)
        assert ran == list(later) * len(WINDOWS)
        # a module that never runs: no window can stop, each runs to the end and lacks it
        ran.clear()
        stray = {"stray": nn.Linear(64, 64), "q_proj": attention["q_proj"]}
        captured = first_inputs(layer, stray, hidden, layer_args)
        assert [list(w) for w in captured] == [["q_proj"]] * len(WINDOWS)
        assert ran == list(later) * len(WINDOWS)
    finally:
        for handle in handles:
            handle.remove()
    assert _hooks(layer, *layer.modules()) == 0


def test_hooks_are_released_when_the_layer_raises(layer_and_inputs):
    layer, hidden, layer_args = layer_and_inputs
    modules = target_linears(layer)

    def failing(name, x):
        if name == "mlp.up_proj":
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        with recording_inputs(modules, failing, stop_layer=layer):
            feed_layer(layer, hidden, layer_args)
    assert _hooks(*layer.modules()) == 0
    context = LayerContext(0, "model.layers.0", layer, "cpu", hidden, layer_args)
    with pytest.raises(ValueError, match="boom"):
        context.capture(modules, failing)
    assert _hooks(*layer.modules()) == 0

    def raising(module, args):
        raise ValueError("layer failed")

    handle = layer.mlp.down_proj.register_forward_pre_hook(raising)  # the layer itself raises
    try:
        for stop_after in (False, True):
            with pytest.raises(ValueError, match="layer failed"):
                context.collect(modules, stop_after=stop_after)
            with pytest.raises(ValueError, match="layer failed"):
                first_inputs(layer, modules, hidden, layer_args)
    finally:
        handle.remove()
    assert _hooks(*layer.modules()) == 0


def test_collect_matches_statistics_of_the_captured_inputs(layer_and_inputs):
    layer, hidden, layer_args = layer_and_inputs
    modules = target_linears(layer)
    context = LayerContext(0, "model.layers.0", layer, "cpu", hidden, layer_args)
    expected = _seen_by_a_hook(layer, hidden, layer_args, modules)
    for stop_after in (False, True):
        collector = context.collect(modules, range(1, 3), stop_after=stop_after)
        assert set(collector.streams) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
        assert collector.stream_of["self_attn.v_proj"] == "self_attn.q_proj"
        for stream, stats in collector.streams.items():
            xs = [x for n, x in expected[7:] if n == stream]  # windows 1 and 2
            x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
            assert stats.tokens == 2 * WINDOWS.shape[1]
            assert torch.allclose(stats.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    assert _hooks(*layer.modules()) == 0


def test_linear_units_of_every_kind():
    model = tiny_model("llama")
    layer = decoder_layers(model)[0]
    q = layer.self_attn.q_proj
    set_submodule(layer, "self_attn.q_proj", LowRankLinear.from_factors(torch.randn(64, 4), torch.randn(4, 64),
                                                                         None, torch.float32, "cpu"))
    set_submodule(layer, "self_attn.k_proj", ColumnPreservedLinear(64, 32, 4, 2, False))
    set_submodule(layer, "mlp.up_proj", QuantLinear(64, 160, 4, 16))
    units = linear_units(layer)
    assert list(units) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert isinstance(units["self_attn.k_proj"], ColumnPreservedLinear)
    # only plain nn.Linear: the factors of the low-rank and column-preserved modules are listed, not them
    dense = linear_units(layer, (nn.Linear,))
    assert list(dense) == ["self_attn.q_proj.v", "self_attn.q_proj.u", "self_attn.k_proj.v", "self_attn.k_proj.u",
                           "self_attn.k_proj.c", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                           "mlp.down_proj"]
    assert dense == target_linears(layer)
    assert list(linear_units(layer, (LowRankLinear,))) == ["self_attn.q_proj"]
    assert list(linear_units(model, (LowRankLinear, ColumnPreservedLinear))) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    qualified = layer_linear_units(model)
    assert len(qualified) == 14 and "lm_head" not in qualified  # the decoder layers' only
    assert list(qualified)[7] == "model.layers.1.self_attn.q_proj"
    assert q not in units.values()
