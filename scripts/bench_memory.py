#!/usr/bin/env python
"""Host memory (and device peak on CUDA) of every pipeline step against model depth, layers streamed from disk.

    # every step on a small llama shape in float32 (the CPU-sized run of the results files)
    python scripts/bench_memory.py --layers 2 4 8 --dtype float32 --nsamples 4 --seq_len 128 --name llama-1024 \
        --override '{"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 8}'
    # steps 1 and 3 only (what the first results files measured), TinyLlama-1.1B's layer shape
    python scripts/bench_memory.py --steps 1 3 --dtype float32 --name tinyllama-shape \
        --override '{"hidden_size": 2048, "intermediate_size": 5632, "num_key_value_heads": 4}'
    # the table of docs/scale.md from the results files
    python scripts/bench_memory.py --markdown scripts/results/bench_memory/*.json

For each depth N, the first N decoder layers of a random-weight preset (`--preset`, seeded,
utils/presets.py) are saved as a sharded safetensors checkpoint under a temporary folder
(--workdir, default the system's), with SmolLM2's tokenizer (the vocabulary is set to its 49152)
and without the preset's random-weights mark in config.json, so that the steps that read text
(2 with a perplexity search, 4, 7) run on it; the weights are still random (the JSON says so) and
every figure but memory means nothing. Then each step of --steps runs in a fresh subprocess of
compress.py, which reports its own peak resident memory (getrusage ru_maxrss) and, on CUDA, the
device's peak allocation. Steps 7, 8 and 4 run on step 3's output (or on `3_plain`'s, the same ranks
without whitening, where the whitened step 3 would take minutes a layer). The growth of the peak per
extra layer (least-squares slope over the depths) is compared with one decoder layer's weight
bytes: with the layers streamed it should be a small fraction of it (target: 5%), where a model
held whole grows by at least one layer's bytes per layer. Rows are written to the JSON as they
finish (`partial: true` until the last depth); checkpoints, statistics and outputs are deleted
after each depth.

Writes scripts/results/bench_memory/<name>_<dtype>_<N>x<L>_steps.json (--out to choose).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TARGET = 0.05  # growth per extra layer, as a fraction of one layer's weight bytes
# what the fitted growth (a fraction of a layer's bytes per extra layer) adds beyond a 2-layer run:
# (name, decoder layers, one layer's float16 weight bytes) of LLaMA-2-7B and LLaMA-2-70B
PROJECTIONS = (("7B, 32 layers", 32, 202_383_360 * 2), ("70B, 80 layers", 80, 855_638_016 * 2))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "alpaca_demo", "alpaca_en_demo.jsonl")

# run in the child: compress.main with the given argv, then its own peak RSS and CUDA peak. The peak is
# VmHWM (the high-water mark of this process image): Linux carries ru_maxrss over fork and exec, so a
# child's ru_maxrss is at least its parent's resident memory when it was forked
CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import compress, torch
code = compress.main({argv!r})
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
print("BENCH_MEMORY " + json.dumps({{"rc": code, "hwm_kib": hwm, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                     "cuda_peak_bytes": gpu}}))
"""
# run in a child too, so that this process stays small (its size would be a floor of ru_maxrss)
SAVE = """
import json, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {scripts!r})
from bench_memory import save_checkpoint
print("BENCH_SAVE " + json.dumps(save_checkpoint(*{args!r})))
"""


def step_commands(work: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """compress.py's arguments of every measurable step (name -> argv), in the order they run."""
    checkpoint, stats, out3 = (os.path.join(work, name) for name in ("model", "stats", "out3"))
    dtype = args.compute_dtype or args.dtype
    common = ["--model", checkpoint, "--dtype", dtype, "--device", args.device, "--seed", str(args.seed),
              "--dataset", "random", "--whitening_nsamples", str(args.nsamples), "--model_seq_len", str(args.seq_len)]
    at = ["--stats_path", stats, "--ratio", str(args.ratio)]
    three = [*common, *at, "--step", "3", "--decomposition", "rsvd"]
    few = ["--updating_nsamples", str(args.nsamples), "--sensitivity_nsamples", str(max(2, args.nsamples // 2)),
           "--sensitivity_seq_len", str(args.seq_len)]  # step 2's sensitivity pass: as few windows as step 1's
    compressed = ["--model", checkpoint, "--model_path", out3, "--dtype", dtype, "--device", args.device,
                  "--seed", str(args.seed)]
    return {
        "1": [*common, "--stats_path", stats, "--step", "1"],
        "1_fisher": [*common, "--stats_path", os.path.join(work, "stats_fisher"), "--step", "1", "--fisher"],
        "2_v2": [*common, *at, "--step", "2", "--allocation", "v2", "--plan", os.path.join(work, "plan_v2.json")],
        # two candidates each: a sensitivity pass's memory does not depend on how many it tries in turn
        "2_duo": [*common, *at, *few, "--step", "2", "--allocation", "duo", "--sensitivity_ratios", "0.5,1",
                  "--plan", os.path.join(work, "plan_duo.json")],
        "2_asvd_ppl_search": [*common, *at, *few, "--step", "2", "--allocation", "asvd", "--sensitivity_ratios", "0.5,0.9",
                              "--ppl_target", "1e9", "--plan", os.path.join(work, "plan_asvd.json")],
        "3": [*three, "--save_path", out3],
        "3_anchored_block": [*three, "--updating_nsamples", str(args.nsamples), "--update", "anchored", "--refine", "gradient", "--refine_target", "block",
                             "--refine_epochs", "1", "--save_path", os.path.join(work, "out3_refined")],
        "3_column_preserve": [*three, "--column_preserve", "--save_path", os.path.join(work, "out3_columns")],
        # step 3's output for 7, 8 and 4 without step 1 and without the whitening's float64 products: a
        # plain sketch (no power iteration) of every matrix at the same ranks, for the shapes where the
        # whitened step 3 takes minutes a layer on the CPU (those steps' memory depends on the factors'
        # shapes, not on their values)
        "3_plain": [*common, "--ratio", str(args.ratio), "--step", "3", "--whitening", "none", "--decomposition", "rsvd",
                    "--rsvd_n_iter", "0", "--save_path", out3],
        "7": [*compressed, "--step", "7", "--data_path", args.data_path, "--max_steps", "2", "--batch_size", "2",
              "--micro_batch_size", "1", "--cutoff_len", str(max(args.seq_len, 256)), "--val_set_size", "2",
              "--save_path", os.path.join(work, "out7")],
        # the same with the decoder layers left on disk (read where they run, merged ones written to the
        # offload folder): a CPU budget (--offload_cpu_budget) of about the embedding and a layer
        "7_offload": [*compressed, "--step", "7", "--data_path", args.data_path, "--max_steps", "2", "--batch_size", "2",
                      "--micro_batch_size", "1", "--cutoff_len", str(max(args.seq_len, 256)), "--val_set_size", "2",
                      "--device_map", "sequential", "--max_memory", f"cpu={args.offload_cpu_budget}",
                      "--offload_folder", os.path.join(work, "offload7"), "--gradient_checkpointing",
                      "--save_path", os.path.join(work, "out7_offload")],
        "8": [*compressed, "--step", "8", "--dataset", "random", "--nsamples", str(args.nsamples),
              "--model_seq_len", str(args.seq_len), "--save_path", os.path.join(work, "out8")],
        "4": [*compressed, "--step", "4", "--eval_datasets", "pydoc", "--eval_limit", str(args.nsamples),
              "--model_seq_len", str(args.seq_len), "--results", os.path.join(work, "ppl.json")],
    }


STEPS = tuple(step_commands("", argparse.Namespace(dtype="", compute_dtype=None, device="", seed=0, nsamples=2, seq_len=0, ratio=0,
                                                  data_path="", offload_cpu_budget="")))


def run_step(argv: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, argv=argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_MEMORY ")]
    if done.returncode != 0 or not lines or json.loads(lines[-1].split(" ", 1)[1])["rc"] != 0:
        return {"error": (done.stderr.strip().splitlines() or ["(no output)"])[-1][-500:], "seconds": round(seconds, 1)}
    result = json.loads(lines[-1].split(" ", 1)[1])
    row = {"peak_rss_gib": round(result["hwm_kib"] / 2 ** 20, 4), "ru_maxrss_gib": round(result["maxrss_kib"] / 2 ** 20, 4),
           "seconds": round(seconds, 1)}
    if result["cuda_peak_bytes"] is not None:
        row["peak_cuda_gib"] = round(result["cuda_peak_bytes"] / 2 ** 30, 4)
    return row


def save_checkpoint(preset: str, layers: int, dtype: str, directory: str, seed: int, override: dict) -> dict:
    """The preset's first `layers` layers saved sharded with SmolLM2's tokenizer and without the
    random-weights mark; returns one layer's and the non-layer bytes."""
    import torch
    from utils.model import DTYPES, decoder_layers, load_tokenizer, resolve_model
    from utils.presets import build_random_model
    model = build_random_model(f"random:{preset}", DTYPES[dtype], seed, layers, **override)
    layer_bytes = sum(p.numel() * p.element_size() for p in decoder_layers(model)[0].parameters())
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    if hasattr(model.config, "random_weights_preset"):
        del model.config.random_weights_preset
    model.save_pretrained(directory, max_shard_size="1GB")
    load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(directory)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"layer_weight_bytes": layer_bytes, "non_layer_weight_bytes": total - layers * layer_bytes}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def growth(runs: list[dict], layer_gib: float, steps: list[str]) -> dict:
    """Per step: the fitted growth of the peak per extra layer, as GiB and as a fraction of a layer."""
    fitted = {}
    for step in steps:
        points = [(r["layers"], r[step]["peak_rss_gib"]) for r in runs if "peak_rss_gib" in r.get(step, {})]
        if len({x for x, _ in points}) < 2:
            continue
        per_layer = slope([x for x, _ in points], [y for _, y in points])
        fitted[step] = {"gib_per_layer": round(per_layer, 4), "fraction_of_layer_bytes": round(per_layer / layer_gib, 4),
                        "target_met": per_layer / layer_gib < TARGET, "depths": [x for x, _ in points]}
    return fitted


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def markdown(paths: list[str]) -> str:
    """docs/scale.md's table: one row per (file, step) with peaks at each depth and the fitted growth."""
    lines = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
        depths = sorted({r["layers"] for r in result["runs"]})
        steps = [s for s in STEPS if any(s in r for r in result["runs"])] + \
            [s for s in ("step1", "step3") if any(s in r for r in result["runs"])]
        shape = result.get("name") or result["preset"]
        lines += [f"`{os.path.basename(path)}`: {shape}, {result['dtype']}"
                  f"{'' if result.get('compute_dtype', result['dtype']) == result['dtype'] else ' read as ' + result['compute_dtype']}"
                  f", one layer "
                  f"{result['layer_weight_gib']:.4f} GiB, {result['nsamples']} x {result['seq_len']} windows"
                  f"{' (partial)' if result.get('partial') else ''}", "",
                  "| step | " + " | ".join(f"{d} layers" for d in depths) + " | growth per layer | of a layer's bytes | "
                  f"under {TARGET:.0%} | " + " | ".join(f"+ {name} (fp16)" for name, _, _ in PROJECTIONS) + " |",
                  "|---|" + "---|" * (len(depths) + 3 + len(PROJECTIONS))]
        for step in steps:
            cells = []
            for depth in depths:
                row = next((r.get(step) for r in result["runs"] if r["layers"] == depth), None) or {}
                cells.append(f"{row['peak_rss_gib']:.3f} GiB" if "peak_rss_gib" in row else
                             ("failed" if "error" in row else ""))
            fit = result["growth"].get(step)
            tail = (f"{fit['gib_per_layer'] * 1024:.1f} MiB | {fit['fraction_of_layer_bytes']:.1%} | "
                    f"{'yes' if fit['target_met'] else 'no'} | " + " | ".join(
                        f"{max(fit['fraction_of_layer_bytes'], 0) * size * (layers - 2) / 2 ** 30:.1f} GiB"
                        for _, layers, size in PROJECTIONS)) if fit else " | ".join([" "] * (3 + len(PROJECTIONS)))
            lines.append(f"| {step.replace('step', '')} | " + " | ".join(cells) + f" | {tail} |")
        lines.append("")
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """One result from runs of the same shape, dtype and windows (each step from the last file that
    measured it at every depth, the files named per step under "sources"), its growth refitted."""
    results = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            results.append(json.load(handle))
    shape = ("name", "dtype", "nsamples", "seq_len", "layer_weight_gib")
    for result, path in zip(results[1:], paths[1:]):
        if any(result.get(key) != results[0].get(key) for key in shape):
            raise SystemExit(f"--merge: {path} measured another shape ({', '.join(f'{k}={result.get(k)}' for k in shape)})")
    merged = {key: value for key, value in results[0].items() if key not in ("runs", "growth", "commands", "steps")}
    merged.update(runs=[], commands={}, sources={}, partial=any(r.get("partial") for r in results))
    depths = sorted({r["layers"] for result in results for r in result["runs"]})
    for step in STEPS:
        for result, path in zip(results, paths):
            if step in result.get("steps", []) and step in result.get("commands", {}):
                merged["sources"][step] = os.path.basename(path)
                merged["commands"][step] = result["commands"][step]
    merged["steps"] = [s for s in STEPS if s in merged["sources"]]
    for depth in depths:
        row = {"layers": depth}
        for step, source in merged["sources"].items():
            result = results[[os.path.basename(p) for p in paths].index(source)]
            found = next((r.get(step) for r in result["runs"] if r["layers"] == depth), None)
            if found is not None:
                row[step] = found
        merged["runs"].append(row)
    merged["growth"] = growth(merged["runs"], merged["layer_weight_gib"], merged["steps"])
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", nargs="+", default=[s for s in STEPS if s != "3_plain"], choices=STEPS, metavar="STEP",
                        help=f"which of {', '.join(STEPS)} (default: all but 3_plain; 7, 8, 4 need 3 or 3_plain)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--compute_dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="the steps' --dtype, each layer cast to it when read (default: --dtype, the checkpoint's); "
                             "CPU float16 matmuls are far slower than bfloat16 or float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_path", default=DATA, help="step 7's training data (default: the shared Alpaca sample)")
    parser.add_argument("--offload_cpu_budget", default="500MB",
                        help="step 7_offload's --max_memory cpu= (the embedding, the largest module accelerate keeps room for, a layer or so)")
    parser.add_argument("--override", default="{}", help="JSON: config fields replacing the preset's (a smaller shape)")
    parser.add_argument("--name", default=None, help="name of the shape in the result file (default: the preset)")
    parser.add_argument("--workdir", default=None, help="where checkpoints and outputs go (deleted after)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", nargs="+", metavar="JSON", help="print docs/scale.md's table of these files")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="write to --out one result from these files' runs (same shape; a later file's step wins)")
    args = parser.parse_args()
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        write_json(args.out, merge(args.merge))
        print(f"-> {args.out}")
        return 0
    if args.markdown:
        print(markdown([p for pattern in args.markdown for p in sorted(glob.glob(pattern))]))
        return 0
    if len(set(args.layers)) < 2:
        parser.error("--layers needs at least two depths to fit a growth per layer")
    if {"7", "7_offload", "8", "4"} & set(args.steps) and not {"3", "3_plain"} & set(args.steps):
        parser.error("--steps 7, 8 and 4 run on step 3's output: add 3 (or 3_plain)")
    if {"3", "3_plain"} <= set(args.steps):
        parser.error("--steps 3 and 3_plain both write step 3's output: choose one")
    if {"2_v2", "2_duo", "2_asvd_ppl_search", "3", "3_anchored_block", "3_column_preserve"} & set(args.steps) \
            and "1" not in args.steps:
        parser.error("--steps 2 and 3 read step 1's statistics: add 1")
    override = {"vocab_size": 49152, **json.loads(args.override)}
    name = args.name or args.preset
    out = args.out or os.path.join(ROOT, "scripts", "results", "bench_memory",
                                   f"{name}_{args.dtype}_{args.nsamples}x{args.seq_len}_steps.json")
    steps = [s for s in STEPS if s in args.steps]
    result = {"name": name, "preset": args.preset, "override": override, "random_weights": True,
              "tokenizer": "SmolLM2-135M-Instruct's (vocabulary 49152)", "dtype": args.dtype, "compute_dtype": args.compute_dtype or args.dtype,
              "device": args.device,
              "nsamples": args.nsamples, "seq_len": args.seq_len, "ratio": args.ratio, "decomposition": "rsvd",
              "whitening": "cholesky", "threads": args.threads, "steps": steps,
              "commands": {s: " ".join(a) for s, a in step_commands("WORK", args).items() if s in steps},
              "machine": platform.platform(), "cpus": os.cpu_count(), "target_fraction_of_layer_bytes": TARGET,
              "measured": "peak RSS of a fresh compress.py process per step and depth (VmHWM; ru_maxrss beside it, "
                          "which Linux carries over from the parent); CUDA: torch.cuda.max_memory_allocated", "runs": [], "growth": {}, "partial": True}
    for layers in args.layers:
        work = tempfile.mkdtemp(prefix="bench-memory-", dir=args.workdir)
        try:
            saved = subprocess.run([sys.executable, "-c", SAVE.format(
                root=ROOT, scripts=os.path.dirname(os.path.abspath(__file__)),
                args=(args.preset, layers, args.dtype, os.path.join(work, "model"), args.seed, override))],
                cwd=ROOT, capture_output=True, text=True, check=True)
            sizes = json.loads([line for line in saved.stdout.splitlines() if line.startswith("BENCH_SAVE ")][-1][11:])
            result["layer_weight_gib"] = round(sizes["layer_weight_bytes"] / 2 ** 30, 4)
            result["non_layer_weight_gib"] = round(sizes["non_layer_weight_bytes"] / 2 ** 30, 4)
            row = {"layers": layers}
            result["runs"].append(row)
            for step, argv in step_commands(work, args).items():
                if step not in steps:
                    continue
                row[step] = run_step(argv, args.threads)
                print(f"{layers} layers, step {step}: {row[step]}", flush=True)
                result["growth"] = growth(result["runs"], result["layer_weight_gib"], steps)
                write_json(out, result)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result["partial"] = False
    write_json(out, result)
    print(json.dumps(result["growth"], indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
