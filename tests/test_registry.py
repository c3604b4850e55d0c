"""methods.registry: a method is one module. A toy method declared here only (its flag, options,
check and pass) reaches the CLI's parser, step 3's options and the layer walk without editing any
other file; so does a toy allocation method of step 2 (chosen by --allocation, its plan applied by
step 3); the built-in methods' selectors and record fields come from the registry."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import compress
from component import LowRankLinear
from methods.registry import (AllocationOptions, Flag, FlagError, Method, MethodOptions, PassInputs, PlanInputs,
                              Registry)
from tests.tiny_models import save_tiny_model
from utils.io import load_compressed
from utils.model import target_shapes
from utils.plan import ModulePlan, Plan, rank_for_ratio


# ------------------------------------------------------------------ the toy method: all of it

@dataclass
class ScaleOptions(MethodOptions):
    factor: float = 1.0
    slot = "scale_u"
    role = "the u scaling"

    def to_dict(self) -> dict:
        return {"method": "scale_u", "factor": self.factor}

    @property
    def walk_label(self) -> str:
        return "scale_u"

    def record_fields(self, records: dict, layer_records: dict) -> dict:
        return {"u_scaled": sum("scale_u" in r for r in records.values())}

    def make_pass(self, inputs: PassInputs) -> "ScaleU":
        return ScaleU(self.factor, inputs.records)


class ScaleU:
    """Multiplies the u factor of every low-rank linear of the layer by `factor`."""
    needs_activations = False
    needs_reference = False

    def __init__(self, factor: float, records: dict):
        self.factor, self.records = factor, records

    def __call__(self, context) -> None:
        for name, module in context.layer.named_modules():
            if isinstance(module, LowRankLinear):
                before = float(module.u.weight.norm())
                module.u.weight.data.mul_(self.factor)
                self.records[f"{context.name}.{name}"]["scale_u"] = [before, float(module.u.weight.norm())]


def check_scale(values: dict) -> dict:
    if values["scale_u"] is not None and not values["scale_u"] > 0:
        raise FlagError(f"--scale_u {values['scale_u']}: must be positive, e.g. 0.5")
    return {}


SCALE_U = Method("scale_u", (Flag(("--scale_u", "--scale-u"), "scale_u", "toy method (test)", type=float,
                                  help="multiply every low-rank u by this"),),
                 lambda values: ScaleOptions(values["scale_u"]) if values["scale_u"] is not None else None,
                 check_scale, label=lambda record: f"+scale_u({record['scale_u']['factor']:g})" if "scale_u" in record
                 else "")


# ------------------------------------------------------------------ the toy allocation method: all of it

@dataclass
class FrontLoadedOptions(AllocationOptions):
    """Layer i of L removes ratio * (1 - tilt + 2 tilt i / (L - 1)) of its matrices: the first layers
    keep more rank, the last ones less."""
    ratio: float
    tilt: float

    def make_plan(self, inputs: PlanInputs) -> Plan:
        shapes = target_shapes(inputs.model)
        layers = 1 + max(_layer_of(name) for name in shapes)
        modules = {}
        for name, (m, n, bias) in shapes.items():
            share = 1 - self.tilt + 2 * self.tilt * _layer_of(name) / max(1, layers - 1)
            modules[name] = ModulePlan(m, n, bias, rank_for_ratio(m, n, self.ratio * share))
        return Plan(modules, self.ratio, "front_loaded", {"tilt": self.tilt})


def _layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def check_tilt(values: dict) -> dict:
    if values["allocation"] == "front_loaded" and not 0 <= values["front_tilt"] < 1:
        raise FlagError(f"--front_tilt {values['front_tilt']}: give a number in [0, 1), e.g. 0.5")
    return {}


FRONT_LOADED = Method("front_loaded", (Flag(("--front_tilt",), "front_tilt", "toy allocation (test)", default=0.5,
                                            type=float, help="front_loaded: how much more the first layers keep"),),
                      lambda values: FrontLoadedOptions(values["ratio"], values["front_tilt"]), check_tilt,
                      selector="allocation", step=2)


# ------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m")))


def _step3(tiny_dir: str, save_path: str, *extra: str, registry=None) -> int:
    return compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                          "--save_path", save_path, "--device", "cpu", *extra], registry=registry)


def test_a_method_declared_in_one_module_reaches_parser_options_and_walk(tiny_dir, tmp_path, capsys):
    registry = Registry.builtin().with_method(SCALE_U)
    parser = compress.build_parser(registry)
    group = next(g for g in parser._action_groups if g.title == "toy method (test)")
    assert [a.option_strings for a in group._group_actions] == [["--scale_u", "--scale-u"]]
    assert "--scale_u" not in compress.build_parser().format_help()  # only where it is registered

    plain, scaled = str(tmp_path / "plain"), str(tmp_path / "scaled")
    assert _step3(tiny_dir, plain) == 0
    assert _step3(tiny_dir, scaled, "--scale-u", "0.5", registry=registry) == 0
    assert "compress+scale_u" in capsys.readouterr().err  # the walk's progress line names the pass
    base, _, base_block = load_compressed(plain)
    model, _, block = load_compressed(scaled)
    assert block["scale_u"] == {"method": "scale_u", "factor": 0.5}  # its options reached compress_model
    assert (base_block["method"], block["method"]) == ("svd", "svd+scale_u(0.5)")  # and its label the method's name
    low_rank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    base_low_rank = dict(base.named_modules())
    assert low_rank and block["u_scaled"] == len(low_rank) == len(block["ranks"])
    for name, module in low_rank.items():  # its pass ran on every layer: u halved, v untouched
        torch.testing.assert_close(module.u.weight, 0.5 * base_low_rank[name].u.weight, rtol=1e-6, atol=0)
        torch.testing.assert_close(module.v.weight, base_low_rank[name].v.weight, rtol=0, atol=0)
        before, after = block["modules"][name]["scale_u"]
        assert after == pytest.approx(0.5 * before, rel=1e-5)
    assert {k: v for k, v in base_block.items() if k not in ("modules",)}.keys() == \
        {k for k in block if k not in ("modules", "scale_u", "u_scaled")}  # nothing else of the record moved


def test_a_registered_methods_check_refuses_bad_input_in_one_line(tiny_dir, tmp_path, capsys):
    registry = Registry.builtin().with_method(SCALE_U)
    assert _step3(tiny_dir, str(tmp_path / "out"), "--scale_u", "-1", registry=registry) == 2
    err = capsys.readouterr().err
    assert err == "error: --scale_u -1.0: must be positive, e.g. 0.5\n"


def test_selector_choices_and_record_defaults_come_from_the_methods():
    registry = Registry.builtin()
    parser = compress.build_parser(registry)
    choices = {a.dest: list(a.choices) for a in parser._actions if a.dest in ("update", "refine")}
    assert choices == {"update": ["none", "closed_form", "anchored"], "refine": ["none", "gradient"]}
    assert registry.record_defaults() == {"updates_accepted": None, "refine_losses": None}
    with pytest.raises(ValueError, match="already registered"):
        registry.with_method(Method("anchored"))
    values = vars(parser.parse_args(["--update", "anchored", "--updating_nsamples", "8"]))
    resolved = registry.resolve(values)
    assert (resolved["anchor_holdout"], resolved["refine_nsamples"], resolved["whitening"]) == (0.25, 8, "cholesky")
    chosen = registry.options(resolved)
    assert [o.slot for o in chosen] == ["decompose", "update"] and chosen[1].nsamples == 8
    assert chosen[1].heldout_positions() == [6, 7]
    quantize = registry.resolve(vars(parser.parse_args(["--step", "3", "--weight_quant", "rtn_int8"])) | {"steps": [3]})
    assert quantize["steps"] == [3, 8]  # ASVD's alias adds step 8 and sets its flags
    (options,) = registry.options(quantize, step=8)
    assert (options.method, options.wbits, options.groupsize) == ("rtn", 8, -1)


def test_an_allocation_method_declared_in_one_module_makes_the_plan_step3_applies(tiny_dir, tmp_path, capsys):
    registry = Registry.builtin().with_method(FRONT_LOADED)
    choices = {a.dest: list(a.choices) for a in compress.build_parser(registry)._actions if a.dest == "allocation"}
    assert choices == {"allocation": ["uniform", "asvd", "v2", "duo", "front_loaded"]}  # no "none": one always plans
    with pytest.raises(SystemExit):  # only where it is registered
        compress.build_parser().parse_args(["--allocation", "front_loaded"])
    capsys.readouterr()

    plan_path, save = str(tmp_path / "plan.json"), str(tmp_path / "front")
    # no step 1: the toy declares no statistics, windows or table, so none is asked for
    assert compress.main(["--step", "2-3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                          "--allocation", "front_loaded", "--front_tilt", "0.75", "--plan", plan_path,
                          "--save_path", save, "--device", "cpu"], registry=registry) == 0
    assert "allocate: front_loaded plan for ratio 0.4" in capsys.readouterr().out
    plan = Plan.load(plan_path)
    assert (plan.allocation, plan.detail) == ("front_loaded", {"tilt": 0.75})
    _, _, block = load_compressed(save)
    assert block["ranks"] == plan.ranks  # step 3 applied the toy's plan, matrix by matrix
    first = {n.split(".layers.0.")[1]: r for n, r in plan.ranks.items() if ".layers.0." in n}
    last = {n.split(".layers.1.")[1]: r for n, r in plan.ranks.items() if ".layers.1." in n}
    assert first.keys() == last.keys() and len(first) == 7
    for kind, rank in first.items():  # layer 0 removes 0.4 x 0.25, layer 1 0.4 x 1.75
        m, n = plan.modules[f"model.layers.0.{kind}"].out_features, plan.modules[f"model.layers.0.{kind}"].in_features
        assert (rank, last[kind]) == (rank_for_ratio(m, n, 0.1), rank_for_ratio(m, n, 0.7))
        assert rank > last[kind]


def test_a_registered_allocation_methods_check_refuses_bad_input_in_one_line(tiny_dir, tmp_path, capsys):
    registry = Registry.builtin().with_method(FRONT_LOADED)
    assert compress.main(["--step", "2", "--model", tiny_dir, "--allocation", "front_loaded", "--front_tilt", "1.5",
                          "--plan", str(tmp_path / "plan.json"), "--device", "cpu"], registry=registry) == 2
    assert capsys.readouterr().err == "error: --front_tilt 1.5: give a number in [0, 1), e.g. 0.5\n"
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("flags, declared", [
    ([], ("UniformOptions", False, False, None, 0)),
    (["--allocation", "v2"], ("V2Options", True, True, None, 0)),
    (["--allocation", "asvd", "--sensitivity_metric", "stable_rank"], ("AsvdOptions", True, False, "stable_rank", 0)),
    (["--allocation", "asvd", "--sensitivity_metric", "stable_rank", "--ppl_target", "40"],
     ("AsvdOptions", True, False, "stable_rank", 16)),  # the search measures perplexity on windows
    (["--strategy", "dp", "--sensitivity_nsamples", "4"], ("DuoOptions", True, True, "kl", 4)),
])
def test_builtin_allocations_declare_what_their_plan_needs(flags, declared):
    """What step 2's driver opens for each built-in allocation (statistics, windows, table) comes from
    its options, not from its name."""
    registry = Registry.builtin()
    values = registry.resolve(vars(compress.build_parser(registry).parse_args(["--ratio", "0.3", *flags]))
                              | {"steps": [2]})
    allocation = registry.allocation(values)
    table = allocation.sensitivity
    assert (type(allocation).__name__, allocation.needs_stats, allocation.needs_whitening,
            table and table.metric, allocation.windows_needed) == declared
    if table is not None:  # duo's table is measured against every other matrix at --ratio (its path says so)
        assert table.base_ratio == (0.3 if declared[0] == "DuoOptions" else None)
