"""Step 6: zero-shot (or few-shot) downstream tasks through lm-eval, offline.

The model in memory (the original, or a compressed one with its LowRankLinear modules) and its
tokenizer go into lm-eval's Hugging Face LM class (HFLM) as instances, so nothing is downloaded
and compressed models need no special support. Local tasks are the YAML files in tasks/: lm-eval
task configs whose prompts, choices, targets and metrics are the stock tasks' (lm-eval 0.4.13,
checked by tests/test_tasks.py) and whose data are the JSONL files under --tasks_data (default
../shared/data next to the repository). Any other --tasks name is a stock lm-eval task or group,
which reads its data from the Hugging Face hub.

Scoring is lm-eval's: per document, the log-likelihood of every choice given the prompt; acc =
the argmax is the target, acc_norm = the argmax of log-likelihood / the choice's length in
characters; standard errors are lm-eval's (sample standard deviation / sqrt(n) for means).
"""
from __future__ import annotations

import argparse
import copy
import glob
import importlib
import math
import os
import time

import torch
import yaml
from torch import nn

from utils.data import DatasetError

ROOT = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(ROOT, "tasks")


def default_tasks_data() -> str:
    """The shared data folder next to the repository: ../shared/data."""
    return os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


def local_tasks() -> dict[str, str]:
    """Local task name -> its YAML file in tasks/."""
    return {os.path.basename(path)[:-5]: path for path in sorted(glob.glob(os.path.join(TASKS_DIR, "*.yaml")))}


class _TaskLoader(yaml.SafeLoader):
    """YAML loader for task configs: `!function module.name` imports that function (as lm-eval does)."""


def _import_function(loader: yaml.Loader, node: yaml.Node):
    module, _, name = loader.construct_scalar(node).rpartition(".")
    return getattr(importlib.import_module(module), name)


_TaskLoader.add_constructor("!function", _import_function)


def read_task_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_TaskLoader)  # noqa: S506 - SafeLoader plus !function


def data_files(config: dict) -> dict[str, str]:
    """split -> data file (relative to --tasks_data) of a local task config."""
    return dict(config["dataset_kwargs"]["data_files"])


def local_task_config(name: str, data_dir: str) -> dict:
    """The lm-eval config of a local task with its data files made absolute under data_dir."""
    config = read_task_yaml(local_tasks()[name])
    config["dataset_kwargs"] = {**config["dataset_kwargs"],
                                "data_files": {split: os.path.join(os.path.abspath(data_dir), rel)
                                               for split, rel in data_files(config).items()}}
    return config


def parse_tasks(text: str | None) -> list[str]:
    """--tasks: a comma list; None or empty: every local task."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    return names or list(local_tasks())


def check_tasks(names: list[str], data_dir: str) -> None:
    """Before the model loads: every name is a local task with its data file under data_dir, or a
    stock lm-eval task whose data the hub can serve. DatasetError naming the flag and the fix."""
    local = local_tasks()
    mine = [n for n in names if n in local]
    if mine and not os.path.isdir(data_dir):
        raise DatasetError(f"--tasks_data {data_dir}: no such folder; point it at the folder holding "
                           f"piqa/, arc_easy/, ... (the shared data folder, ../shared/data next to the repository)")
    for name in mine:
        for rel in data_files(read_task_yaml(local[name])).values():
            if not os.path.isfile(os.path.join(data_dir, rel)):
                raise DatasetError(f"--tasks {name} reads {rel} under --tasks_data {data_dir}, which is not there: "
                                   f"pass the folder that holds it with --tasks_data")
    stock = [n for n in names if n not in local]
    if not stock:
        return
    from lm_eval.tasks import TaskManager
    known = set(TaskManager().all_tasks)
    for name in stock:
        if name not in known:
            hint = f" (the local copy is {name}_local)" if f"{name}_local" in local else ""
            raise DatasetError(f"--tasks {name}: not a local task ({', '.join(local)}) nor an lm-eval task or "
                               f"group{hint}; see `lm_eval ls tasks` for stock names")
    from utils.data import _hub_reachable
    if not _hub_reachable():
        name = stock[0]
        hint = f" use the local copy {name}_local," if f"{name}_local" in local else ""
        raise DatasetError(f"--tasks {name} is a stock lm-eval task whose data comes from the Hugging Face hub, which "
                           f"cannot be reached:{hint} use the local tasks ({', '.join(local)}), or set "
                           f"HF_DATASETS_OFFLINE=1 if its data set is in your datasets cache")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _task_entry(name: str, metrics: dict, counts: dict | None) -> dict:
    entry: dict = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in metrics:
            entry[metric] = _number(metrics[f"{metric},none"])
            entry[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
    if counts:
        entry["documents"], entry["documents_available"] = counts["effective"], counts["original"]
    return entry


def evaluate_tasks(model: nn.Module, tokenizer, names: list[str], data_dir: str | None = None,
                   device: str | torch.device = "cpu", num_fewshot: int = 0, limit: int | None = None,
                   batch_size: int = 1, keep_samples: bool = False, verbose: bool = True) -> dict:
    """Run lm-eval on `model` (already placed; inputs go to `device`) for every task name: a local
    task (tasks/*.yaml, data under data_dir) or a stock lm-eval task. Returns
    {"settings", "results": {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, documents,
    documents_available, seconds, ...}}, "mean": {acc, tasks, acc_norm, acc_norm_tasks}} and with
    keep_samples also "samples": lm-eval's per-document records (log-likelihood of every choice)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    data_dir = data_dir or default_tasks_data()
    local = local_tasks()
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise DatasetError("the tokenizer has neither a BOS nor an EOS token, which lm-eval puts before a prompt "
                           "with no context: give the tokenizer an eos_token")
    # a copy: HFLM may give the tokenizer a pad token, which must not leak into later steps
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, max_batch_size=batch_size)
    lm._device = torch.device(device)  # where lm-eval puts input ids; HFLM takes model.device otherwise
    manager = TaskManager(include_defaults=any(n not in local for n in names))
    results: dict[str, dict] = {}
    samples: dict[str, list] = {}
    for name in names:
        spec = local_task_config(name, data_dir) if name in local else name
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[spec], num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=keep_samples)
        seconds = round(time.perf_counter() - start, 3)
        counts = out.get("n-samples", {})
        for task, metrics in out["results"].items():
            subtasks = out.get("group_subtasks", {}).get(task)
            count = counts.get(task) or ({"effective": sum(counts[t]["effective"] for t in subtasks if t in counts),
                                          "original": sum(counts[t]["original"] for t in subtasks if t in counts)}
                                         if subtasks else None)
            entry = _task_entry(task, metrics, count)
            entry.update(num_fewshot=out.get("n-shot", {}).get(task, num_fewshot), limit=limit)
            if task == name:
                entry.update(seconds=seconds, version=out.get("versions", {}).get(task))
                if name in local:
                    config = read_task_yaml(local[name])
                    entry.update(stock_task=config["metadata"]["stock_task"],
                                 data={split: os.path.abspath(os.path.join(data_dir, rel))
                                       for split, rel in data_files(config).items()})
                else:
                    entry["stock_task"] = name
            results[task] = entry
        if keep_samples:
            samples.update(out.get("samples", {}))
        if verbose:
            print(format_task_line(name, results.get(name, {})), flush=True)
    data = {"settings": {"lm_eval": lm_eval_version(),
                         "tasks": names, "tasks_data": os.path.abspath(data_dir), "num_fewshot": num_fewshot,
                         "limit": limit, "batch_size": batch_size},
            "results": results, "mean": mean_accuracy(results, names)}
    if keep_samples:
        data["samples"] = samples
    return data


def lm_eval_version() -> str:
    from importlib.metadata import version
    return version("lm_eval")


def mean_accuracy(results: dict[str, dict], names: list[str]) -> dict:
    """Unweighted mean over the requested tasks of acc, and of acc_norm over those that have it."""
    acc = [n for n in names if results.get(n, {}).get("acc") is not None]
    norm = [n for n in names if results.get(n, {}).get("acc_norm") is not None]
    return {"acc": sum(results[n]["acc"] for n in acc) / len(acc) if acc else None, "tasks": acc,
            "acc_norm": sum(results[n]["acc_norm"] for n in norm) / len(norm) if norm else None,
            "acc_norm_tasks": norm}


def format_task_line(name: str, entry: dict) -> str:
    def metric(key: str) -> str:
        if entry.get(key) is None:
            return ""
        stderr = entry.get(f"{key}_stderr")
        return f"{key} {entry[key]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
    parts = ", ".join(p for p in (metric("acc"), metric("acc_norm")) if p)
    docs = (f"{entry['documents']} of {entry['documents_available']} documents" if "documents" in entry else "")
    return (f"tasks {name}: {parts or 'no acc metric'} ({docs}{', ' if docs else ''}"
            f"{entry.get('num_fewshot', 0)}-shot, {entry.get('seconds', 0):.1f} s)")


def tasks_step(args: argparse.Namespace, session) -> dict:
    """Step 6: every --tasks entry on the model; one JSON section, one printed line per task."""
    from evaluater import prepare_text_step, results_path, update_results
    from utils.model import dtype_name
    placement = prepare_text_step(args, session, "task prompts cannot be tokenized: save the tokenizer with the model",
                                  refuse_random="downstream accuracy")
    start = time.perf_counter()
    data = evaluate_tasks(session.model.eval(), session.tokenizer, parse_tasks(args.tasks), args.tasks_data,
                          placement.input_device, args.num_fewshot, args.limit, args.eval_batch_size)
    data["settings"].update(dtype=dtype_name(next(session.model.parameters()).dtype),
                            placement=placement.describe(), seconds=round(time.perf_counter() - start, 3))
    mean = data["mean"]
    if mean["acc"] is not None:
        print(f"tasks mean acc {mean['acc']:.4f} over {len(mean['tasks'])} tasks" +
              (f"; mean acc_norm {mean['acc_norm']:.4f} over {len(mean['acc_norm_tasks'])}"
               if mean["acc_norm"] is not None else ""))
    path = results_path(args, session)
    update_results(path, args, session, "tasks", data)
    print(f"tasks: results -> {path}")
    return data
