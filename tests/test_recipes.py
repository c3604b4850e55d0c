"""--recipe NAME: each recipe expands to its table row, typed flags win, --print shows it, a recipe
without --step runs its steps in order (and perplexity before/after), missing data fails first."""
import json
import os
import re

import pytest

import compress
import recipes
from tests.tiny_models import save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """The hub counts as reachable unless a test says otherwise (no network in the tests)."""
    import utils.data
    monkeypatch.setattr(utils.data, "_hub_reachable", lambda timeout=3.0: True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m")))


def applied(argv):
    """The namespace main() would run with: parsed, then the recipe applied (no model, no validation)."""
    args = compress.build_parser().parse_args(argv)
    assert compress.apply_recipe(args, argv) is False
    return args


def parser_dests():
    return {a.dest for a in compress.build_parser()._actions}


@pytest.mark.parametrize("name", recipes.names())
@pytest.mark.parametrize("ratio", [0.2, 0.6])
def test_each_recipe_expands_to_its_table_row(name, ratio, tmp_path):
    recipe = recipes.RECIPES[name]
    expected = {**recipe.flags, **recipes.band_flags(recipe, ratio)}
    assert set(expected) <= parser_dests(), "a recipe sets a flag compress.py does not have"
    extra = ["--data_path", "x.jsonl"] if "data_path" in recipe.needs else []
    args = applied(["--recipe", name, "--ratio", str(ratio), "--save_path", str(tmp_path / "o"),
                    "--device", "cuda", *extra])  # cuda: the authors' (GPU) row; not validated here
    for dest, value in expected.items():
        assert getattr(args, dest) == value, f"{name}: --{dest}"
    assert args.step == ",".join(map(str, recipe.steps))
    cpu = applied(["--recipe", name, "--ratio", str(ratio), "--save_path", str(tmp_path / "o"), "--device", "cpu",
                   *extra])
    for dest, value in recipe.cpu.items():
        assert getattr(cpu, dest) == value, f"{name} on the CPU: --{dest}"


def test_recipes_say_what_their_papers_say():
    """A few rows checked against the papers' settings written out here, not read from the table."""
    def gpu(name, ratio=0.2):
        return recipes.expand(name, ratio).flags
    assert {k: gpu("svd-llm")[k] for k in ("whitening", "whitening_nsamples", "model_seq_len", "dataset")} == \
        {"whitening": "cholesky", "whitening_nsamples": 256, "model_seq_len": 2048, "dataset": "wikitext2"}
    assert gpu("svd-llm-update")["update"] == "closed_form"
    assert (gpu("svd-llm-lora")["lora_r"], gpu("svd-llm-lora")["learning_rate"], gpu("svd-llm-lora")["batch_size"]) \
        == (8, 1e-4, 64)
    assert (gpu("svd-llm-gptq")["quant"], gpu("svd-llm-gptq")["wbits"]) == ("gptq", 4)
    assert gpu("rsvd-llm")["decomposition"] == "rsvd"
    assert (gpu("svd-llm-v2")["whitening"], gpu("svd-llm-v2")["allocation"]) == ("eigen", "v2")
    asvd = gpu("asvd")
    assert (asvd["scaling"], asvd["alpha"], asvd["sigma_fuse"], asvd["allocation"], asvd["whitening"]) == \
        ("abs_mean", 0.5, "UV", "asvd", "none")
    duo = gpu("duo-svd")
    assert (duo["allocation"], duo["sensitivity_metric"], duo["column_preserve"]) == ("duo", "kl", True)
    assert (gpu("gsvd")["refine_target"], gpu("gsvd")["gradient_iters"]) == ("matrix", 500)
    aa = gpu("aa-svd")
    assert (aa["update"], aa["refine_target"], aa["refine_epochs"], aa["refine_lr"]) == ("anchored", "block", 25, 1e-4)
    assert gpu("best", 0.2)["anchor_alpha"] == 0.5 and gpu("best", 0.4)["anchor_alpha"] == 1.0
    assert gpu("best", 0.6)["update"] == "none" and gpu("best", 0.6)["refine_epochs"] == 8  # no anchored fit
    assert all(gpu("best", r)["lora_guard"] is True for r in (0.2, 0.4, 0.6))
    assert recipes.RECIPES["best"].steps == (1, 3, 7) and "validation slice" in recipes.RECIPES["best"].notes[-1]


def test_readme_table_lists_every_recipe():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M)
    assert sorted(listed) == sorted(recipes.names())


def test_offline_and_cpu_substitutes_are_local_and_smaller():
    offline = recipes.expand("svd-llm", cpu=True, offline=True)
    assert offline.flags["dataset"] not in recipes.HUB_DATASETS
    assert offline.flags["whitening_nsamples"] < 256 and offline.flags["model_seq_len"] < 2048
    assert "GPU: 256" in offline.origin["whitening_nsamples"]


def test_typed_flags_override_the_recipe_even_at_their_default(tmp_path):
    # --whitening_nsamples 256 is also the parser's default: typed, it must still beat the CPU row's 32
    args = applied(["--recipe", "aa-svd", "--refine_epochs", "3", "--whitening_nsamples", "256", "--device", "cpu",
                    "--save_path", str(tmp_path / "o")])
    assert args.refine_epochs == 3 and args.whitening_nsamples == 256
    assert args.model_seq_len == 512  # not typed: the recipe's CPU value
    assert args.recipe_record["origin"]["refine_epochs"] == "yours"
    assert set(args.recipe_record["overridden"]) == {"refine_epochs", "whitening_nsamples"}
    # --step picks the steps; the recipe still sets the flags
    args = applied(["--recipe", "svd-llm-update", "--step", "3", "--device", "cpu", "--save_path", str(tmp_path)])
    assert args.step == "3" and args.update == "closed_form" and not args.recipe_eval


def test_a_typed_choice_drops_the_recipe_flags_that_belong_to_another(tmp_path, capsys):
    # best's 20% band sets the anchored fit's flags; --update none must run without them, not fail
    # on "--anchor_alpha is for --update anchored"
    args = applied(["--recipe", "best", "--ratio", "0.2", "--update", "none", "--device", "cpu",
                    "--save_path", str(tmp_path / "o")])
    assert args.update == "none" and args.anchor_alpha is None and args.anchor_holdout is None
    assert set(args.recipe_record["dropped"]) == {"anchor_alpha", "anchor_holdout"}
    assert "anchor_alpha" not in args.recipe_record["flags"]
    assert args.refine_epochs == 4  # the band's other flags stay
    assert compress.main(["--recipe", "best", "--ratio", "0.2", "--update", "none", "--print", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("dropped: ") == 2
    # the band's own choice keeps them
    args = applied(["--recipe", "best", "--ratio", "0.2", "--device", "cpu", "--save_path", str(tmp_path / "p")])
    assert args.anchor_alpha == 0.5 and args.recipe_record["dropped"] == {}


def test_print_shows_the_expansion_and_exits_0(capsys):
    assert compress.main(["--recipe", "asvd", "--print", "--alpha", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "--scaling abs_mean" in out and "--alpha 1 " in out and "yours" in out
    assert "runs: python compress.py --step 1,2,3" in out
    # --print without --recipe, and no --step without --recipe: one line, exit 2
    assert compress.main(["--print"]) == 2
    assert compress.main(["--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 2


def record_steps(monkeypatch):
    ran = []
    for step, name in ((1, "run_profile"), (2, "run_allocate"), (3, "run_compress"), (7, "run_lora"),
                       (8, "run_quantize")):
        def record(args, session, step=step):
            ran.append(step)
            if step == 3:  # step 3 leaves its model in the session, as the real one does
                session.model = session.model or "the compressed model"
        monkeypatch.setattr(compress, name, record)
    monkeypatch.setattr(compress, "_plan_for_step3", lambda args, session, shapes=None: None)
    return ran


@pytest.mark.parametrize("name", recipes.names())
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_recipe_without_step_runs_its_steps_in_order(name, device, tiny_dir, tmp_path, monkeypatch):
    """Every recipe's flags pass every check (its GPU row too: CUDA faked, the steps are recorded, not run)."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ran = record_steps(monkeypatch)
    data = tmp_path / "train.txt"
    data.write_text("some text to train on\n" * 50)
    extra = ["--data_path", str(data)] if 7 in recipes.RECIPES[name].steps else []
    assert compress.main(["--recipe", name, "--model", tiny_dir, "--dataset", "random", "--save_path",
                          str(tmp_path / "o"), "--device", device, *extra]) == 0
    assert ran == list(recipes.RECIPES[name].steps)


def test_recipe_run_records_the_recipe_and_reuses_statistics(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    argv = ["--recipe", "svd-llm", "--model", tiny_dir, "--dataset", "random", "--whitening_nsamples", "4",
            "--model_seq_len", "16", "--ratio", "0.4", "--save_path", out, "--device", "cpu"]
    assert compress.main(argv) == 0
    block = json.load(open(os.path.join(out, "config.json")))["compression"]
    assert block["recipe"]["name"] == "svd-llm" and block["recipe"]["steps"] == [1, 3]
    assert block["recipe"]["flags"]["seed"] == 3 and block["recipe"]["origin"]["dataset"] == "yours"
    assert block["calibration"]["seed"] == 3  # the recipe's seed reached step 1
    stats_meta = os.path.join(out + ".stats", "meta.json")
    stamp = os.stat(stats_meta).st_mtime_ns
    capsys.readouterr()
    assert compress.main(argv + ["--overwrite"]) == 0  # the same statistics: step 1 is skipped
    assert "reused (step 1 skipped)" in capsys.readouterr().out
    assert os.stat(stats_meta).st_mtime_ns == stamp
    block = json.load(open(os.path.join(out, "config.json")))["compression"]
    assert block["recipe"]["steps"] == [1, 3] and block["recipe"]["reused_statistics"].endswith("stats")
    assert compress.main(argv + ["--overwrite", "--whitening_nsamples", "5"]) == 0  # other windows: profiled anew
    assert "reused" not in capsys.readouterr().out


def test_recipe_run_ends_with_perplexity_before_and_after(tiny_dir, tmp_path, monkeypatch, capsys):
    import evaluater
    ran = record_steps(monkeypatch)
    seen = []

    def fake_perplexity(args, session):
        seen.append((len(ran), args.results, session.model is None))
        return {"pydoc": {"ppl": 30.0 if session.model is None else 10.0}}
    monkeypatch.setattr(evaluater, "perplexity_step", fake_perplexity)
    out = str(tmp_path / "o")
    assert compress.main(["--recipe", "svd-llm", "--model", tiny_dir, "--dataset", "random", "--save_path", out,
                          "--device", "cpu", "--eval_datasets", "pydoc"]) == 0
    # after every step: first the model the steps left (in memory), then the original in a fresh session
    assert [(n, fresh) for n, _, fresh in seen] == [(2, False), (2, True)]
    assert seen[0][1] is None and seen[1][1] == os.path.join(out, "results.original.json")
    assert "perplexity pydoc: before 30.0000 -> after 10.0000 (0.33x)" in capsys.readouterr().out
    # with --step, --eval_datasets is only a flag: no perplexity
    seen.clear()
    assert compress.main(["--recipe", "svd-llm", "--step", "1,3", "--model", tiny_dir, "--dataset", "random",
                          "--save_path", out, "--device", "cpu", "--eval_datasets", "pydoc"]) == 0
    assert seen == []


@pytest.mark.parametrize("argv,needle", [
    (["--recipe", "svd-llm-lora"], "--data_path"),  # SVD-LLM's hub Alpaca: no offline default
    (["--recipe", "best", "--dataset", "random"], "--data_path"),  # best trains on --dataset: random has no text
    (["--recipe", "svd-llm", "--dataset", "wikitext2", "--hub_offline"], "hub"),  # a typed hub set, offline
    (["--recipe", "svd-llm", "--eval_datasets", "nonexistent.txt"], "nonexistent"),
])
def test_missing_data_fails_before_the_first_step(argv, needle, tiny_dir, tmp_path, monkeypatch, capsys):
    import utils.data
    ran = record_steps(monkeypatch)
    if "--hub_offline" in argv:
        argv = [a for a in argv if a != "--hub_offline"]
        monkeypatch.setattr(utils.data, "_hub_reachable", lambda timeout=3.0: False)
    assert compress.main([*argv, "--model", tiny_dir, "--save_path", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert ran == [] and err.count("\n") == 1 and needle in err
    assert not os.path.exists(tmp_path / "o")


def test_bench_chooses_best_on_the_validation_slice_not_the_test_slice():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_recipes", os.path.join(ROOT, "scripts", "bench_recipes.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = {"rows": [{"recipe": "best", "ratio": 0.2, "ppl": {"validation": 30.0, "test": 10.0}},
                       {"recipe": "svd-llm", "ratio": 0.2, "ppl": {"validation": 20.0, "test": 50.0}},
                       {"recipe": "asvd", "ratio": 0.2, "returncode": 1}]}
    bench.summarize(record, [0.2])
    assert record["summary"]["0.2"] == {"chosen": "svd-llm", "validation_ppl": 20.0, "test_ppl": 50.0,
                                        "best_is_chosen": False, "rows": 2}
    command, save = bench.row_command(bench.build_parser().parse_args(["--extra", "--whitening_nsamples 4"]),
                                      "svd-llm-lora", 0.4)
    assert command[2:4] == ["--recipe", "svd-llm-lora"] and "--data_path" in command
    assert command[-2:] == ["--whitening_nsamples", "4"]  # the extra flags come last and override the recipe
    output = ("fallbacks (H not positive definite): 0; times: load_s 2.5s, profile_s 10.0s, compress_s 4.2s\n"
              "lora: done; times: load_s 2.5s, profile_s 10.0s, compress_s 4.2s, lora_s 31.0s\n")
    assert bench.step_times(output) == {"load": 2.5, "profile": 10.0, "compress": 4.2, "lora": 31.0}
    opts = bench.build_parser().parse_args([])
    shared = bench.stats_name(opts, "svd-llm")  # step 1 shared only where it is the same whitening pass
    assert shared == bench.stats_name(opts, "svd-llm-update") == bench.stats_name(opts, "duo-svd")
    assert len({shared, bench.stats_name(opts, "asvd"), bench.stats_name(opts, "best"), bench.stats_name(opts, "gsvd")}) == 4
    assert bench.stats_name(bench.build_parser().parse_args(["--extra", "--seed 1"]), "svd-llm") == "svd-llm.stats"


def test_a_recipe_run_with_perplexity_can_be_replaced_with_overwrite(tiny_dir, tmp_path):
    """The original's results JSON a recipe run writes beside the model counts as ours."""
    from utils.outputs import OutputError, check_output_path
    out = tmp_path / "o"
    assert compress.main(["--recipe", "svd-llm", "--model", tiny_dir, "--dataset", "random", "--whitening_nsamples",
                          "4", "--model_seq_len", "16", "--save_path", str(out), "--device", "cpu"]) == 0
    (out / "results.original.json").write_text("{}")
    check_output_path(str(out), "model", True)  # raises if the file were foreign
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError):
        check_output_path(str(out), "model", True)


def test_bench_scores_the_zero_shot_rows_it_is_asked_for_and_merges_them(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_recipes", os.path.join(ROOT, "scripts", "bench_recipes.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    opts = bench.build_parser().parse_args(["--tasks_rows", "original,best@0.2", "--tasks_limit", "7"])
    assert bench.wants_tasks(opts, "original", 0.0) and bench.wants_tasks(opts, "best", 0.2)
    assert not bench.wants_tasks(opts, "best", 0.4) and not bench.wants_tasks(opts, "svd-llm", 0.2)
    command = bench.eval_command(opts, "M", "R.json", tasks=True)
    assert command[command.index("--step") + 1] == "4,6" and command[command.index("--limit") + 1] == "7"
    assert "--step" in bench.eval_command(opts, "M", "R.json") and "--limit" not in bench.eval_command(opts, "M", "R.json")
    results = tmp_path / "r.json"  # step 6's section as tasks_eval.evaluate_tasks writes it
    results.write_text(json.dumps({"perplexity": {}, "tasks": {
        "settings": {"limit": 7, "lm_eval": "0.4.13"},
        "results": {"piqa_local": {"acc": 0.6, "acc_norm": 0.62, "documents": 7, "seconds": 1.0},
                    "boolq_local": {"acc": 0.4, "acc_norm": None, "documents": 7}},
        "mean": {"acc": 0.5, "acc_norm": 0.62, "tasks": ["piqa_local", "boolq_local"]}}}))
    scores = bench.read_tasks(str(results))
    assert scores["mean_acc"] == 0.5 and scores["tasks"]["piqa_local"] == {"acc": 0.6, "acc_norm": 0.62, "documents": 7}
    settings = {**{k: "x" for k in ("model", "calibration", "validation", "test", "device")},
                "eval_limit": 16, "eval_seq_len": 512, "extra": ""}
    record = {"settings": dict(settings), "rows": [
        {"recipe": "best", "ratio": 0.2, "returncode": 0, "ppl": {"validation": 30.0, "test": 48.0}}]}
    other = {"settings": dict(settings), "rows": [
        {"recipe": "best", "ratio": 0.2, "returncode": 0, "ppl": {"validation": 30.1, "test": 48.1}, "zero_shot": scores},
        {"recipe": "original", "ratio": 0.0, "returncode": 0, "ppl": {"validation": 22.8, "test": 31.1},
         "zero_shot": scores}]}
    assert bench.merge(record, other, "other.json") == 1  # the original's row is new; best's gains its scores
    best = next(r for r in record["rows"] if r["recipe"] == "best")
    assert best["ppl"]["validation"] == 30.0 and best["zero_shot"]["from"] == "other.json"
    assert best["zero_shot"]["ppl_there"]["validation"] == 30.1
    record["settings"].update(recipes="best", out=str(tmp_path / "x.json"), threads=1, cpus=2, ratios="0.2")
    table = bench.markdown(record)
    assert "| `best` | 0.2 | 0.400 | 0.600 | 0.500 | 0.620 |" in table, table


def test_merging_the_last_missing_rows_completes_a_partial_run():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_recipes", os.path.join(ROOT, "scripts", "bench_recipes.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = {**{k: "x" for k in ("model", "calibration", "validation", "test", "device")},
                "eval_limit": 16, "eval_seq_len": 512, "extra": "", "ratios": "0.2,0.4"}
    record = {"partial": True, "settings": {**settings, "recipes": "svd-llm,asvd"}, "rows": [
        {"recipe": "svd-llm", "ratio": r, "returncode": 0, "ppl": {"validation": 50.0, "test": 80.0}}
        for r in (0.2, 0.4)]}
    assert bench.missing_rows(record) == [("asvd", 0.2), ("asvd", 0.4)]

    def asvd_at(ratio: float) -> dict:
        return {"settings": {**settings, "recipes": "asvd"}, "rows": [
            {"recipe": "asvd", "ratio": ratio, "returncode": 0, "ppl": {"validation": 70.0, "test": 90.0}}]}

    assert bench.merge(record, asvd_at(0.2), "a.json") == 1 and record["partial"]  # asvd 0.4 still to come
    assert bench.merge(record, asvd_at(0.4), "b.json") == 1
    assert record["partial"] is False and bench.missing_rows(record) == []
