"""Benchmark of issue 27's recipes: every `--recipe` on SmolLM2-135M at 20/40/60% removed, each run
as the one command a user types, and the choice of `best` on a validation slice.

    python scripts/bench_recipes.py --out scripts/results/bench_recipes/bench_recipes_smollm2_cpu.json

Protocol: each row is `python compress.py --recipe NAME --ratio R --model M --dataset CALIBRATION
--eval_datasets VALIDATION,TEST --eval_limit N --save_path WORK/NAME_R` in its own process (the recipe's
CPU settings unless --device cuda; --data_path for the recipes that need one), so what is measured is
exactly the recipe's pipeline, its steps chained in memory, ending with step 4 on the compressed model
and on the original. Calibration: wiki.valid.tokens[0:0.8]; validation: [0.8:0.9]; test: [0.9:1].
Nothing is tuned on the test slice.

Choosing `best`: at each ratio the recipe with the lowest VALIDATION perplexity is chosen, and only
its test perplexity is the reported figure (the summary's "chosen"). `best` (recipes.py) stays
provisional until it is the chosen row at the ratios of its bands; if another recipe wins on
validation, recipes.py's `best` row is to be changed to that recipe's flags (per ratio band), not
tuned against the test slice. Rows whose process fails are recorded with their return code and the
last lines of their output.

Resumable: the JSON is rewritten (atomically) after every row; --resume keeps an earlier --out's
rows and runs only the missing (recipe, ratio) pairs. --extra passes flags to every row (they
override the recipe's, e.g. a smaller --whitening_nsamples for a smoke run).

Smoke run (not a benchmark; about a minute of CPU on SmolLM2's first 2 layers):
    python scripts/bench_recipes.py --recipes svd-llm --ratios 0.4 --eval_limit 1 \\
        --extra "--whitening_nsamples 4 --model_seq_len 64 --num_layers 2" --out /tmp/bench_recipes_smoke.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import recipes  # noqa: E402
from utils.io import write_json  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
WIKI = os.path.join(SHARED, "wikitext2", "wiki.valid.tokens")
ALPACA = os.path.join(SHARED, "alpaca_demo", "alpaca_en_demo.jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default=",".join(recipes.names()), help="comma list (default: every recipe)")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--calibration", default=WIKI + "[0:0.8]")
    p.add_argument("--validation", default=WIKI + "[0.8:0.9]", help="chooses best (never the test slice)")
    p.add_argument("--test", default=WIKI + "[0.9:1]", help="reported for the chosen row only")
    p.add_argument("--eval_limit", type=int, default=16, help="windows of each evaluation slice")
    p.add_argument("--lora_data", default=ALPACA, help="--data_path of recipes that need one (svd-llm-lora)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each row's process")
    p.add_argument("--extra", default="", help="flags added to every row (they override the recipe's)")
    p.add_argument("--work", default="/tmp/bench_recipes", help="where the rows' models go (replaced)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per row at most")
    p.add_argument("--resume", action="store_true", help="keep the rows of an earlier --out, run the missing ones")
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_recipes",
                                                 "bench_recipes_smollm2_cpu.json"))
    return p


def row_command(opts, name: str, ratio: float) -> tuple[list[str], str]:
    save = os.path.join(opts.work, f"{name}_{ratio:g}")
    command = [sys.executable, os.path.join(ROOT, "compress.py"), "--recipe", name, "--ratio", f"{ratio:g}",
               "--model", opts.model, "--dataset", opts.calibration, "--device", opts.device,
               "--eval_datasets", f"{opts.validation},{opts.test}", "--eval_limit", str(opts.eval_limit),
               "--save_path", save, "--overwrite"]
    if "data_path" in recipes.RECIPES[name].needs:
        command += ["--data_path", opts.lora_data]
    return command + shlex.split(opts.extra), save


def read_row(save: str, opts) -> dict:
    """Perplexities of the compressed model and of the original from the row's two results JSONs."""
    def ppl(path: str) -> dict:
        with open(path) as handle:
            section = json.load(handle)["perplexity"]
        return {"validation": section[opts.validation]["ppl"], "test": section[opts.test]["ppl"]}
    with open(os.path.join(save, "config.json")) as handle:
        block = json.load(handle)["compression"]
    return {"ppl": ppl(os.path.join(save, "results.json")), "original": ppl(os.path.join(save, "results.original.json")),
            "parameters": block.get("parameters"), "recipe_record": block.get("recipe")}


def summarize(record: dict, ratios: list[float]) -> None:
    """Per ratio: the row with the lowest validation perplexity, its test figure, and whether it is best."""
    summary = {}
    for ratio in ratios:
        rows = [r for r in record["rows"] if r["ratio"] == ratio and r.get("ppl", {}).get("validation") is not None]
        if not rows:
            continue
        chosen = min(rows, key=lambda r: r["ppl"]["validation"])
        summary[f"{ratio:g}"] = {"chosen": chosen["recipe"], "validation_ppl": chosen["ppl"]["validation"],
                                 "test_ppl": chosen["ppl"]["test"], "best_is_chosen": chosen["recipe"] == "best",
                                 "rows": len(rows)}
    record["summary"] = summary


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    names = [n for n in opts.recipes.split(",") if n]
    unknown = [n for n in names if n not in recipes.RECIPES]
    if unknown:
        print(f"error: --recipes {unknown[0]}: not a recipe ({', '.join(recipes.names())})", file=sys.stderr)
        return 2
    ratios = [float(r) for r in opts.ratios.split(",") if r]
    record = {"partial": True, "settings": {**vars(opts), "machine": platform.processor() or platform.machine(),
                                            "cpus": os.cpu_count(), "load_avg_start": list(os.getloadavg())},
              "rows": []}
    if opts.resume and os.path.isfile(opts.out):
        with open(opts.out) as handle:
            earlier = json.load(handle)
        record["rows"] = [r for r in earlier["rows"] if r.get("returncode") == 0]
        record["resumed"] = earlier.get("resumed", []) + [{"settings": earlier["settings"]}]
    done = {(r["recipe"], r["ratio"]) for r in record["rows"]}
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    for ratio in ratios:
        for name in names:
            if (name, ratio) in done:
                continue
            command, save = row_command(opts, name, ratio)
            print(f"{name} at {ratio:g}: {shlex.join(command[1:])}", flush=True)
            start = time.perf_counter()
            try:
                run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=opts.timeout)
                code, tail = run.returncode, (run.stdout + run.stderr).splitlines()[-5:]
            except subprocess.TimeoutExpired:
                code, tail = None, [f"stopped after {opts.timeout} s"]
            row = {"recipe": name, "ratio": ratio, "returncode": code, "seconds": round(time.perf_counter() - start, 1),
                   "command": shlex.join(command[1:])}
            if code == 0:
                row.update(read_row(save, opts))
                print(f"  validation {row['ppl']['validation']:.2f} (original {row['original']['validation']:.2f}), "
                      f"{row['seconds']:.0f} s", flush=True)
            else:
                row["output_tail"] = tail
                print(f"  failed ({code}): {tail[-1] if tail else ''}", flush=True)
            record["rows"].append(row)
            summarize(record, ratios)
            write_json(opts.out, record)
    record["partial"] = False
    record["settings"]["load_avg_end"] = list(os.getloadavg())
    summarize(record, ratios)
    write_json(opts.out, record)
    print(json.dumps(record["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
