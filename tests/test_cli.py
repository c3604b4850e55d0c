"""The CLI's own promises: --help shows every default and its examples run as written; sizes mean
what they say (--model_ratio); long passes are announced with an estimate before they start."""
import argparse
import os
import re
import shlex

import pytest

import compress
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m")))


# ------------------------------------------------------------------ --model_ratio

def test_model_ratio_removes_that_fraction_of_the_whole_model(tiny_dir, tmp_path, capsys):
    from utils.io import load_compressed
    from utils.model import count_parameters, load_model, target_shapes
    original, _ = load_model(tiny_dir)
    total, shapes = count_parameters(original), target_shapes(original)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "3", "--model", tiny_dir, "--model_ratio", "0.3", "--whitening", "none",
                          "--save_path", out, "--device", "cpu"]) == 0
    model, _, block = load_compressed(out)
    removed = 1 - count_parameters(model) / total  # counted on the saved model, not read from its record
    rank_step = sum(m + n for m, n, _ in shapes.values()) / total  # every matrix one rank more or less
    assert abs(removed - 0.3) <= rank_step, (removed, rank_step)
    assert block["ratio"] > 0.3  # the per-matrix ratio it took is larger: the embeddings stay dense
    assert block["model_ratio"]["asked"] == 0.3 and block["model_ratio"]["ratio"] == block["ratio"]
    printed = capsys.readouterr().out
    assert f"per-matrix ratio {block['ratio']}" in printed and f"{removed:.1%} removed" in printed
    assert re.search(r"\d+\.\d MiB on disk", printed)


def test_model_ratio_conversion_matches_the_uniform_plan():
    from utils.architecture import ratio_for_model_fraction
    from utils.plan import Plan
    shapes = {f"l{i}.{k}": (m, n, False) for i in range(4) for k, (m, n) in
              {"q": (512, 512), "up": (1408, 512), "down": (512, 1408)}.items()}
    total = sum(m * n for m, n, _ in shapes.values()) + 4000 * 512  # layers 77% of the model
    for fraction in (0.1, 0.25, 0.4):
        ratio = ratio_for_model_fraction(shapes, total, fraction)
        plan = Plan.uniform(shapes, ratio)
        removed = (plan.params_before() - plan.params_after()) / total
        assert abs(removed - fraction) <= sum(m + n for m, n, _ in shapes.values()) / total
    with pytest.raises(ValueError, match="unreachable"):
        ratio_for_model_fraction(shapes, total, 0.8)


# ------------------------------------------------------------------ costs said before the wait

def test_sensitivity_pass_is_estimated_before_it_starts_and_recorded(tiny_dir, tmp_path, capsys, monkeypatch):
    import json

    import methods.sensitivity as sensitivity
    printed_before = []
    original = sensitivity.sensitivity_table

    def watched(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)  # everything printed before the pass starts
        return original(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "sensitivity_table", watched)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "1-2", "--model", tiny_dir, "--allocation", "duo", "--ratio", "0.3",
                          "--dataset", "random", "--whitening_nsamples", "4", "--model_seq_len", "16",
                          "--sensitivity_nsamples", "8", "--sensitivity_seq_len", "300", "--save_path", out,
                          "--device", "cpu"]) == 0
    line = next(l for l in printed_before[0].splitlines() if l.startswith("sensitivity pass (kl): about"))
    assert "14 matrices x 10 candidates x 8 windows" in line  # the tiny llama: 2 layers x 7 linears
    assert "one window of 300 tokens" in line  # --sensitivity_seq_len, not --model_seq_len
    for flag in ("--sensitivity_nsamples 2", "--sensitivity_ratios 0.25,0.5,0.75,1", "--sensitivity_seq_len 128"):
        assert flag in line, line
    with open(os.path.join(out + ".stats", "plan_0.3.json")) as handle:
        detail = json.load(handle)["detail"]
    cost = detail["sensitivity_cost"]
    assert cost["counts"] == {"matrices": 14, "candidates": 10, "windows": 8}
    assert cost["estimated_s"] > 0 and cost["actual_s"] > 0 and detail["sensitivity_seq_len"] == 300
    with open(os.path.join(out + ".stats", "meta.json")) as handle:
        profile = json.load(handle)["cost"]["profile"]
    assert profile["counts"] == {"windows": 4} and profile["actual_s"] > 0


def test_refinement_is_estimated_before_it_starts_and_recorded(tiny_dir, tmp_path, capsys, monkeypatch):
    import pipeline.steps as pipeline
    from utils.io import load_compressed
    printed_before = []
    original = pipeline.compress_model

    def watched(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compress_model", watched)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--dataset", "random",
                          "--model_seq_len", "16", "--refine", "gradient", "--refine_epochs", "3",
                          "--refine_nsamples", "4", "--save_path", out, "--device", "cpu"]) == 0
    line = next(l for l in printed_before[0].splitlines() if l.startswith("refinement (block): about"))
    assert "2 layers x 3 epochs x 4 windows" in line and "--refine_epochs 1" in line
    cost = load_compressed(out)[2]["cost"]["refine"]
    assert cost["counts"] == {"layers": 2, "epochs": 3, "windows": 4} and cost["actual_s"] > 0


def test_estimate_is_counts_times_the_timed_unit():
    from utils.cost import estimate
    e = estimate("pass", {"matrices": 210, "candidates": 10, "windows": 16}, "one window", 0.5, 0.5,
                 [("--sensitivity_nsamples 4", 0.25), ("--not-cheaper 1", 1.0)])
    assert e.seconds == pytest.approx(210 * 10 * 16 * 0.5 * 0.5)
    assert e.message().startswith("pass: about 2.3 h = 210 matrices x 10 candidates x 16 windows")
    assert "--sensitivity_nsamples 4 (about 35 min)" in e.message() and "--not-cheaper" not in e.message()
    assert e.record(12.0)["estimated_s"] == pytest.approx(8400.0) and e.record(12.0)["actual_s"] == 12.0


# ------------------------------------------------------------------ --help

def _help_blocks(parser: argparse.ArgumentParser) -> dict[str, str]:
    """First option string -> its whole entry in --help, whitespace collapsed."""
    blocks = {}
    for block in re.split(r"\n(?=  -)", parser.format_help()):
        words = block.split()
        if words and words[0].startswith("-"):
            blocks[words[0].rstrip(",")] = " ".join(words)
    return blocks


def test_help_shows_every_default():
    parser = compress.build_parser()
    blocks = _help_blocks(parser)
    missing = []
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is argparse.SUPPRESS or isinstance(default, bool):
            continue  # None: the help says what happens; on/off flags are off
        block = blocks[action.option_strings[0]]
        if f"(default: {default})" not in block and f"(default {default}" not in block:
            missing.append(action.option_strings[0])
    assert not missing, missing
    for flag, value in (("--whitening_nsamples", 256), ("--model_seq_len", 2048), ("--eval_datasets", "wikitext2"),
                        ("--refine_batch_size", 8)):  # the ones that decide what a first run costs
        assert f"(default: {value})" in blocks[flag]


def _examples() -> list[tuple[str, list[str]]]:
    """(the comment above it, argv) of every command in --help's examples, in order."""
    lines = compress.EXAMPLES.splitlines()
    return [(lines[i - 1].strip(), shlex.split(line)[2:]) for i, line in enumerate(lines)
            if line.strip().startswith("python compress.py")]


def test_parser_keeps_every_flag_alias_default_and_help():
    """The parser built from the method registry (methods/registry.py) has the flags it had before the
    registry: each action's names, destination, default, type, choices, help and argument group, in
    help order (tests/data/parser.json; regenerate it with python -m tests.parser_fixture only when
    a flag is meant to change)."""
    import json
    from tests.parser_fixture import describe_parser
    with open(os.path.join(os.path.dirname(__file__), "data", "parser.json")) as f:
        expected = json.load(f)
    found = describe_parser(compress.build_parser())
    assert [a["option_strings"] for a in found] == [a["option_strings"] for a in expected]
    for got, want in zip(found, expected):
        assert got == want, want["option_strings"]


def test_help_examples_say_how_long_they_take():
    examples = _examples()
    assert len(examples) >= 2 and compress.EXAMPLES in compress.build_parser().format_help()
    for comment, argv in examples:
        assert re.search(r"\(about \d+ (s|min)\)", comment), comment  # minutes at most, on a CPU
        assert "--device" in argv and argv[argv.index("--device") + 1] == "cpu"


@pytest.fixture(scope="module")
def tiny_compressed(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("c") / "model")
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--save_path", out,
                          "--device", "cpu"]) == 0
    return out


@pytest.mark.integration("smollm2")
def test_help_examples_run_as_written_offline(tiny_compressed, tmp_path, monkeypatch):
    """Each example, in order, from a fresh folder with the hub unreachable, through every argument
    check to the steps it asks for; the steps themselves are recorded, not run (the time they take
    is the comment's), and step 3 leaves a compressed model where the next example reads it."""
    import shutil

    import evaluater
    import generate
    import tasks_eval
    import utils.model
    from utils import data
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    ran = []

    def recorder(step):
        def run(args, session):
            ran.append(step)
            if step == 3:
                shutil.copytree(tiny_compressed, args.save_path, dirs_exist_ok=True)
        return run

    def refuse(*args, **kwargs):
        raise AssertionError("an example loaded weights during its checks")

    for name, step in (("run_profile", 1), ("run_allocate", 2), ("run_compress", 3), ("run_lora", 7),
                       ("run_quantize", 8)):
        monkeypatch.setattr(compress, name, recorder(step))
    monkeypatch.setattr(evaluater, "perplexity_step", recorder(4))
    monkeypatch.setattr(evaluater, "efficiency_step", recorder(5))
    monkeypatch.setattr(tasks_eval, "tasks_step", recorder(6))
    monkeypatch.setattr(generate, "generate_step", recorder(9))
    monkeypatch.setattr(generate, "ask_step", lambda args, session: ran.append("ask"))
    monkeypatch.setattr(utils.model, "load_model", refuse)
    for comment, argv in _examples():
        ran.clear()
        assert compress.main(argv) == 0, argv
        assert ran == compress.parse_steps(argv[argv.index("--step") + 1]) + ["ask"] * ("--ask" in argv), (argv, ran)
