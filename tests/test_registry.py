"""methods.registry: a method is one module. A toy method declared here only (its flag, options,
check and pass) reaches the CLI's parser, step 3's options and the layer walk without editing any
other file; the built-in methods' selectors and record fields come from the registry."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import compress
from component import LowRankLinear
from methods.registry import Flag, FlagError, Method, MethodOptions, PassInputs, Registry
from tests.tiny_models import save_tiny_model
from utils.io import load_compressed


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
