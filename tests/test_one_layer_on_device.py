"""Issue 33: steps 1 (with and without --fisher), 2 (duo, asvd and the ppl search) and 7 (LoRA with
--lora_offload_layers) hold at most two decoder layers on the device at once, on a tiny 6-layer model.

On a CPU-only machine "on the device" cannot be read off the tensors, so the test watches the one
way a layer comes to the device, utils.layerwise.layer_on_device (wrapped in every module that
uses it), and checks with a forward pre-hook inside every decoder layer (on its first child: step 7
moves a layer in inside its forward) that each layer runs only while it is one of the layers moved in: code that moved the whole stack (or a copy of the model) to the
device some other way would run layers that were never moved in, and fails here as well as code
that moved in more than two at once."""
from __future__ import annotations

import contextlib

import pytest
import torch

import lora
import methods.sensitivity
import utils.fisher
import utils.layerwise
from methods.sensitivity import SensitivityOptions, calibration_ppl, measure_sensitivity, plan_calibration_ppl
from tests.tiny_models import tiny_config
from utils.model import decoder_layers, target_shapes
from pipeline.steps import profile_model
from utils.plan import rank_for_ratio

pytestmark = pytest.mark.usefixtures("one_thread")
MOVERS = (utils.layerwise, utils.fisher, methods.sensitivity, lora)  # the modules that bring layers to the device
LAYERS = 6


def many_layer_model(family: str = "llama"):
    from transformers import AutoModelForCausalLM
    config = tiny_config(family).to_dict()
    config.pop("layer_types", None)
    config["num_hidden_layers"] = LAYERS
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(type(tiny_config(family))(**config), dtype=torch.float32).eval()


class Residency:
    """Which decoder layers are moved in (the most at once, every entry), and the forward passes of a
    decoder layer that was not moved in at the time (strays; a copy of a layer counts as one)."""

    def __init__(self, model, monkeypatch):
        self.index = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
        self.resident: set[int] = set()
        self.most, self.entries, self.runs, self.strays = 0, 0, 0, []
        real = utils.layerwise.layer_on_device

        @contextlib.contextmanager
        def tracked(layer, *args, **kwargs):
            with real(layer, *args, **kwargs) as on_device:
                self.resident.add(id(layer))
                self.entries += 1
                self.most = max(self.most, len(self.resident & set(self.index)))
                try:
                    yield on_device
                finally:
                    self.resident.discard(id(layer))

        for module in MOVERS:
            monkeypatch.setattr(module, "layer_on_device", tracked, raising=False)
        self.layer_of = {id(next(layer.children())): layer for layer in decoder_layers(model)}
        self.handles = [next(layer.children()).register_forward_pre_hook(self.check) for layer in decoder_layers(model)]

    def check(self, module, args):
        self.runs += 1
        layer = self.layer_of.get(id(module))
        if layer is None or id(layer) not in self.resident:
            self.strays.append("a copy" if layer is None else self.index[id(layer)])

    def close(self):
        for handle in self.handles:
            handle.remove()

    def assert_at_most(self, count: int) -> None:
        assert self.runs > 0 and self.entries >= LAYERS  # the step ran every layer
        assert not self.strays, f"decoder layers ran without being moved in: {sorted(set(map(str, self.strays)))}"
        assert 1 <= self.most <= count, f"{self.most} decoder layers on the device at once"


@pytest.fixture(scope="module")
def setting():
    model = many_layer_model()
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, windows, profile_model(model, windows, "cpu")


@pytest.fixture
def residency(setting, monkeypatch):
    tracker = Residency(setting[0], monkeypatch)
    yield tracker
    tracker.close()


@pytest.mark.parametrize("fisher", [False, True])
def test_step1_profile(setting, residency, fisher):
    model, windows, _ = setting
    stats = profile_model(model, windows, "cpu", fisher=fisher)
    residency.assert_at_most(1)
    assert (stats.fisher(next(iter(target_shapes(model)))) is not None) if fisher else True


@pytest.mark.parametrize("options", [SensitivityOptions("kl", (0.3, 0.6, 1.0), 0.4),  # duo
                                     SensitivityOptions("ppl", (0.3, 0.6))],  # asvd
                         ids=["duo-kl", "asvd-ppl"])
def test_step2_sensitivity(setting, residency, options):
    model, windows, stats = setting
    table = measure_sensitivity(model, windows, stats, "cpu", options, key={}, progress=False)
    residency.assert_at_most(2)
    assert residency.most == 2  # a perturbed layer and a later one: the test sees the second layer come in
    assert len(table.values) == len(target_shapes(model))


def test_step2_sensitivity_in_groups(setting, residency):
    """One perturbed stream per group (the smallest stream budget): still two layers at most."""
    model, windows, stats = setting
    measure_sensitivity(model, windows, stats, "cpu", SensitivityOptions("ppl", (0.5,)), key={}, progress=False,
                        stream_bytes=1)
    residency.assert_at_most(2)


def test_step2_ppl_search(setting, residency):
    model, windows, stats = setting
    shapes = target_shapes(model)
    evaluate = plan_calibration_ppl(model, stats, windows, "cpu")
    ppl = evaluate({n: rank_for_ratio(m, k, 0.5) for n, (m, k, _) in shapes.items()})
    dense = calibration_ppl(model, windows, "cpu")
    residency.assert_at_most(1)
    assert ppl > dense > 1.0


def low_rank_model():
    from pipeline.steps import CompressOptions, compress_model
    from utils.plan import Plan
    model = many_layer_model()
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    compress_model(model, Plan.uniform(target_shapes(model), 0.4), CompressOptions(), "cpu", profile_model(model, windows, "cpu"))
    return model


@pytest.mark.parametrize("offload_layers", [True, False])
def test_step7_lora(monkeypatch, offload_layers):
    """--lora_offload_layers: one layer at a time, also in the backward pass's recomputation; without it
    the whole model trains on the device, which the test must see (strays)."""
    from tests.test_lora import NoTokenizer, options, pattern_examples
    model = low_rank_model()
    residency = Residency(model, monkeypatch)
    try:
        lora.sequential_lora(model, NoTokenizer(), pattern_examples(n_train=4, n_val=2, length=16),
                             options(max_steps=2, offload_layers=offload_layers), progress=False)
    finally:
        residency.close()
    if offload_layers:
        residency.assert_at_most(1)
    else:
        assert residency.runs > 0 and residency.strays and residency.entries == 0
