"""Step 6: local lm-eval tasks match the stock ones, accuracy equals a hand computation, bad input exits 2."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import compress
import tasks_eval

pytestmark = pytest.mark.usefixtures("one_thread")

STOCK = {"piqa_local": "piqa/piqa.yaml", "arc_easy_local": "arc/arc_easy.yaml",
         "arc_challenge_local": "arc/arc_challenge.yaml", "openbookqa_local": "openbookqa/openbookqa.yaml",
         "winogrande_local": "winogrande/default.yaml", "boolq_local": "super_glue/boolq/default.yaml"}
PROMPT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "should_decontaminate",
                 "doc_to_decontamination_query", "metric_list", "target_delimiter", "fewshot_delimiter")


def stock_config(name: str) -> dict:
    """The installed lm-eval's own task YAML, read by lm-eval's own loader (includes resolved)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml
    return load_yaml(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", STOCK[name]), resolve_func=True)


def arc_rows(n: int) -> list[dict]:
    return [{"id": f"t{i}", "question": f"Which word names thing {i}?",
             "choices": {"text": ["a stone", "the cat", "blue sky", f"number {i}"], "label": ["A", "B", "C", "D"]},
             "answerKey": "A"} for i in range(n)]


def write_jsonl(path, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def test_every_local_task_keeps_the_stock_prompts_choices_and_metrics():
    assert set(tasks_eval.local_tasks()) == set(STOCK)
    for name in STOCK:
        ours, stock = tasks_eval.read_task_yaml(tasks_eval.local_tasks()[name]), stock_config(name)
        for field in PROMPT_FIELDS:
            a, b = ours.get(field), stock.get(field)
            if callable(b):  # winogrande: the stock functions themselves
                assert (a.__module__, a.__qualname__) == ("lm_eval.tasks.winogrande.preprocess_winogrande",
                                                          b.__qualname__), (name, field)
            else:
                assert a == b, (name, field, a, b)
        assert ours["metadata"]["version"] == stock["metadata"]["version"]
        # the split scored is the stock task's evaluation split (test if it has one, else validation)
        split = "test" if stock.get("test_split") else "validation"
        assert list(tasks_eval.data_files(ours)) == [split] and ours[f"{split}_split"] == split


def _requests(config: dict, limit: int) -> list[tuple]:
    from lm_eval.tasks import TaskManager
    task = TaskManager(include_defaults=False).load(config)["tasks"][config["task"]]
    task.build_all_requests(limit=limit)
    return sorted((i.doc_id, i.idx, i.arguments) for i in task.instances)


@pytest.mark.parametrize("name,rows", [
    ("arc_easy_local", arc_rows(3)),
    ("piqa_local", [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0},
                    {"goal": "Dry hair", "sol1": "use a towel", "sol2": "use a spoon", "label": 0}]),
])
def test_prompt_construction_equals_the_stock_task_on_the_same_data(name, rows, tmp_path):
    """The requests lm-eval builds from our config equal those it builds from the stock YAML pointed
    at the same file, and read as the stock template says."""
    config = tasks_eval.local_task_config(name, str(tmp_path))
    (split, path), = config["dataset_kwargs"]["data_files"].items()
    write_jsonl(path, rows)
    stock = stock_config(name)
    stock.update({"task": f"stock_{name}", "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {split: path}}, "training_split": None,
                  "validation_split": None, "test_split": None})
    stock[f"{split}_split"] = split
    stock.pop("tag", None)
    ours, theirs = _requests(config, len(rows)), _requests(stock, len(rows))
    assert ours == theirs and len(ours) == sum(2 if "goal" in r else 4 for r in rows)
    first = rows[0]
    if name == "arc_easy_local":
        expected = [(f"Question: {first['question']}\nAnswer:", " " + text) for text in first["choices"]["text"]]
    else:
        expected = [(f"Question: {first['goal']}\nAnswer:", " " + first[k]) for k in ("sol1", "sol2")]
    assert [args for doc, _, args in ours if doc == 0] == expected


# ------------------------------------------------------------------------ accuracy against a hand computation

def _tiny_with_tokenizer(directory: str) -> str:
    """make_tiny_model's byte-level tiny Llama, with an EOS token (lm-eval needs a BOS or EOS)."""
    from transformers import AutoTokenizer
    from scripts.sweep import make_tiny_model
    path = make_tiny_model(directory)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = "Ā"  # the byte-level symbol of byte 0, never in text
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _tiny_with_tokenizer(str(tmp_path_factory.mktemp("tiny")))


def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log P(" " + choice | context), summed over the choice's tokens, from our own forward pass."""
    context_ids = tokenizer(context)["input_ids"]
    result = []
    with torch.no_grad():
        for choice in choices:
            ids = tokenizer(context + " " + choice)["input_ids"]
            assert ids[:len(context_ids)] == context_ids
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            result.append(sum(float(logp[pos - 1, ids[pos]]) for pos in range(len(context_ids), len(ids))))
    return result


def test_reported_accuracy_equals_accuracy_from_our_loglikelihoods(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    rows = arc_rows(5)
    lls = [choice_loglikelihoods(model, tokenizer, f"Question: {r['question']}\nAnswer:", r["choices"]["text"])
           for r in rows]
    best = [max(range(4), key=lambda k: ll[k]) for ll in lls]
    # gold = the model's favourite for documents 0-2 and its least favourite for 3-4: accuracy 3/5 exactly
    gold = [b if i < 3 else min(range(4), key=lambda k: ll[k]) for i, (b, ll) in enumerate(zip(best, lls))]
    for row, g in zip(rows, gold):
        row["answerKey"] = "ABCD"[g]
    write_jsonl(str(tmp_path / "data" / "arc_easy" / "test.jsonl"), rows)
    norm = [max(range(4), key=lambda k: ll[k] / len(r["choices"]["text"][k])) for ll, r in zip(lls, rows)]
    expected_acc_norm = sum(n == g for n, g in zip(norm, gold)) / 5

    results = tmp_path / "r.json"
    assert compress.main(["--step", "6", "--model", tiny_dir, "--tasks", "arc_easy_local", "--tasks_data",
                          str(tmp_path / "data"), "--eval_batch_size", "3", "--results", str(results),
                          "--device", "cpu"]) == 0
    record = json.loads(results.read_text())
    entry = record["tasks"]["results"]["arc_easy_local"]
    assert entry["acc"] == pytest.approx(0.6, abs=1e-12)
    assert entry["acc_norm"] == pytest.approx(expected_acc_norm, abs=1e-12)
    assert (entry["documents"], entry["documents_available"], entry["stock_task"]) == (5, 5, "arc_easy")
    assert entry["acc_stderr"] == pytest.approx((0.6 * 0.4 / 4) ** 0.5, rel=1e-9)  # sample std / sqrt(n)
    assert record["tasks"]["mean"]["acc"] == pytest.approx(0.6) and record["tasks"]["settings"]["limit"] is None
    assert record["model"]["compressed"] is False and record["model_description"]["num_layers"] == 2

    # per document, lm-eval's log-likelihood of every choice is ours; --limit keeps the first documents
    data = tasks_eval.evaluate_tasks(model, tokenizer, ["arc_easy_local"], str(tmp_path / "data"), limit=4,
                                     batch_size=2, keep_samples=True, verbose=False)
    samples = sorted(data["samples"]["arc_easy_local"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == [0, 1, 2, 3]
    for sample in samples:
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(lls[sample["doc_id"]], abs=1e-4)
    assert data["results"]["arc_easy_local"]["acc"] == pytest.approx(0.75)
    assert data["results"]["arc_easy_local"]["documents"] == 4


def test_compressed_model_is_scored_too(tiny_dir, tmp_path):
    saved = tmp_path / "c"
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                          "--save_path", str(saved)]) == 0
    write_jsonl(str(tmp_path / "data" / "piqa" / "validation.jsonl"),
                [{"goal": f"goal {i}", "sol1": "yes", "sol2": "no way", "label": i % 2} for i in range(4)])
    assert compress.main(["--step", "6", "--model_path", str(saved), "--tasks", "piqa_local", "--tasks_data",
                          str(tmp_path / "data"), "--device", "cpu"]) == 0
    record = json.loads((saved / "results.json").read_text())
    assert record["compression"]["ratio"] == 0.4 and record["tasks"]["results"]["piqa_local"]["documents"] == 4
    assert record["tasks"]["results"]["piqa_local"]["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)


# ------------------------------------------------------------------------ bad input

@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come first."""
    import utils.io
    import utils.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the argument checks")
    monkeypatch.setattr(utils.model, "load_model", refuse)
    monkeypatch.setattr(utils.io, "load_compressed", refuse)


@pytest.mark.parametrize("extra,needle", [
    (["--tasks_data", "/nonexistent/data"], "--tasks_data /nonexistent/data: no such folder"),
    pytest.param(["--tasks", "piqa_local,no_such_task"], "--tasks no_such_task: not a local task",
                 marks=pytest.mark.integration("piqa")),
    (["--tasks", "arc_easy_local", "--tasks_data", "EMPTY"], "arc_easy/test.jsonl"),
    (["--limit", "0"], "--limit"),
    (["--num_fewshot", "-1"], "--num_fewshot"),
])
def test_bad_task_input_exits_2_before_the_model_loads(extra, needle, tiny_dir, tmp_path, capsys, no_model_load):
    extra = [str(tmp_path) if e == "EMPTY" else e for e in extra]
    assert compress.main(["--step", "6", "--model", tiny_dir, "--device", "cpu"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_stock_task_without_the_hub_names_the_local_copy(tiny_dir, capsys, monkeypatch, no_model_load):
    import utils.data
    monkeypatch.setattr(utils.data, "_hub_reachable", lambda timeout=3.0: False)
    assert compress.main(["--step", "6", "--model", tiny_dir, "--tasks", "piqa", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face hub" in err and "piqa_local" in err


# ------------------------------------------------------------------------ SmolLM2-135M

SHARED = tasks_eval.default_tasks_data()
opt_in = pytest.mark.skipif(os.environ.get("RUN_SLOW_TESTS") != "1",
                            reason="about 10 minutes on 2 CPU cores: set RUN_SLOW_TESTS=1")
needs_smollm2 = pytest.mark.integration("smollm2", "piqa/validation.jsonl", "arc_easy")


@pytest.mark.slow
@opt_in
@needs_smollm2
def test_smollm2_piqa_arc_easy_above_chance_and_reproducible():
    """200 documents each. Standard error at n=200: PIQA sqrt(.25/200)=0.035 around chance 0.5, ARC-Easy
    sqrt(.1875/200)=0.031 around chance 0.25. The bars 0.57 and 0.35 are 2 and 3.3 standard errors above
    chance (a model scoring at chance passes with probability < 2.3% and < 0.1%); SmolLM2-135M-Instruct
    scores about 0.64 and 0.49, 2 and 4.5 standard errors above them."""
    from utils.model import load_model
    model, tokenizer = load_model("smollm2-135m")
    names = ["piqa_local", "arc_easy_local"]
    start = time.perf_counter()
    runs = [tasks_eval.evaluate_tasks(model, tokenizer, names, SHARED, limit=200, batch_size=32, verbose=False)
            for _ in range(2)]
    print(f"two runs: {time.perf_counter() - start:.0f} s")
    first, second = ({t: {k: v for k, v in r["results"][t].items() if k != "seconds"} for t in names} for r in runs)
    assert first == second
    assert first["piqa_local"]["documents"] == first["arc_easy_local"]["documents"] == 200
    assert first["piqa_local"]["acc"] > 0.57 and first["arc_easy_local"]["acc"] > 0.35
    assert runs[0]["mean"]["acc"] == pytest.approx((first["piqa_local"]["acc"] + first["arc_easy_local"]["acc"]) / 2)


def test_sweep_records_step_6_and_the_plot_reads_mean_accuracy(tiny_dir, tmp_path):
    from scripts import plot_results, sweep
    data = tmp_path / "data"
    write_jsonl(str(data / "arc_easy" / "test.jsonl"), arc_rows(4))
    out = tmp_path / "sweep"
    assert sweep.main(["--quick", "--model", tiny_dir, "--variants", "svd", "--ratios", "0.4,0.6", "--device", "cpu",
                       "--tasks", "arc_easy_local", "--tasks_data", str(data), "--limit", "3", "--out", str(out)]) == 0
    runs = {name: json.loads((out / "runs" / f"svd_r{name}.json").read_text()) for name in ("0.4", "0.6")}
    original = json.loads((out / "original.json").read_text())
    for record in list(runs.values()) + [original]:
        entry = record["tasks"]["results"]["arc_easy_local"]
        assert entry["documents"] == 3 and record["tasks"]["settings"]["limit"] == 3
        assert record["tasks"]["mean"]["acc"] == entry["acc"]
    rows = plot_results.load_runs([str(out / "original.json"), str(out / "runs")])
    assert [(r["variant"], r["ratio"], r["acc_mean"]) for r in rows] == [
        ("original", 0.0, original["tasks"]["mean"]["acc"]), ("svd", 0.4, runs["0.4"]["tasks"]["mean"]["acc"]),
        ("svd", 0.6, runs["0.6"]["tasks"]["mean"]["acc"])]
    table = plot_results.markdown_table(rows)
    assert "mean acc |" in table.splitlines()[0]
    assert table.splitlines()[3].endswith(f"| {runs['0.4']['tasks']['mean']['acc']:.4f} |")
    written = plot_results.plot(rows, str(tmp_path / "plots"))
    assert str(tmp_path / "plots" / "accuracy.png") in written


def test_dispatched_model_with_disk_offload_scores_the_same(tiny_dir, tmp_path):
    write_jsonl(str(tmp_path / "data" / "arc_easy" / "test.jsonl"), arc_rows(4))
    common = ["--step", "6", "--model", tiny_dir, "--tasks", "arc_easy_local", "--tasks_data", str(tmp_path / "data"),
              "--device", "cpu"]
    assert compress.main(common + ["--results", str(tmp_path / "whole.json")]) == 0
    assert compress.main(common + ["--results", str(tmp_path / "placed.json"), "--device_map", "sequential",
                                   "--max_memory", "cpu=300KB", "--offload_folder", str(tmp_path / "off")]) == 0
    whole, placed = (json.loads((tmp_path / f"{n}.json").read_text())["tasks"] for n in ("whole", "placed"))
    drop = ("seconds",)
    assert ({k: v for k, v in placed["results"]["arc_easy_local"].items() if k not in drop} ==
            {k: v for k, v in whole["results"]["arc_easy_local"].items() if k not in drop})
    assert placed["settings"]["placement"]["modules_per_device"]["disk"] > 0
