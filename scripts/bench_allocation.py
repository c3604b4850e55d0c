"""Allocation benchmark (issue 20, so far uniform and v2): held-out perplexity and time per step.

    OMP_NUM_THREADS=1 python scripts/bench_allocation.py --out scripts/results/bench_allocation_smollm2_cpu.json

One process: load SmolLM2-135M, profile the calibration windows once (statistics in memory),
compute the whitened spectra once (what --allocation v2 costs on top of uniform), then per ratio
and allocation compress a fresh copy with whitening + SVD and score it on a held-back slice. The
JSON is rewritten after every run, so a stopped run keeps what it finished.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2", "wiki.valid.tokens")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default=DATA + "[0:0.8]")
    p.add_argument("--evaluation", default=DATA + "[0.8:1]")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=64, help="held-back windows scored")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--allocations", default="uniform,v2")
    p.add_argument("--v2_max_shift", type=float, default=0.15)
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_allocation_smollm2_cpu.json"))
    return p


def main(argv: list[str] | None = None) -> dict:
    import torch

    import api
    from evaluater import perplexity
    from methods.allocation import v2_plan, whitened_spectra
    from utils.data import tokenize
    from utils.io import write_json
    args = build_parser().parse_args(argv)
    model, tokenizer = api.load_model(args.model, "auto", args.seed, args.num_layers)
    windows = api.calibration_windows(args.calibration, tokenizer, args.nsamples, args.seq_len, args.seed)
    eval_ids = tokenize(tokenizer, api.load_text(args.evaluation, "test"))
    result = {"settings": {**vars(args), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "runs": [], "partial": True}

    def timed(fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        return out, round(time.perf_counter() - start, 3)

    original, result["original_eval_s"] = timed(perplexity, model, eval_ids, args.seq_len, 1, args.device, args.eval_limit)
    result["original_ppl"] = original["ppl"]
    stats, result["profile_s"] = timed(api.profile_model, model, windows, args.device)
    sigmas, result["spectra_s"] = timed(whitened_spectra, model, stats, args.device)
    write_json(args.out, result)
    for ratio in (float(r) for r in args.ratios.split(",")):
        for allocation in args.allocations.split(","):
            if allocation == "uniform":
                plan, allocate_s = timed(api.uniform_plan, model, ratio)
                allocate_s = round(allocate_s, 3)
            elif allocation == "v2":
                (plan, detail), allocate_s = timed(v2_plan, model, ratio, sigmas, args.v2_max_shift)
                plan.detail = detail
                allocate_s = round(allocate_s + result["spectra_s"], 3)  # the spectra are v2's cost
            else:
                raise SystemExit(f"error: --allocations {allocation}: not built yet (uniform, v2)")
            compressed = copy.deepcopy(model)
            record, compress_s = timed(api.compress_model, compressed, plan, api.CompressOptions(), args.device, stats)
            scored, eval_s = timed(perplexity, compressed, eval_ids, args.seq_len, 1, args.device, args.eval_limit)
            result["runs"].append({"ratio": ratio, "allocation": allocation, "ppl": scored["ppl"],
                                   "windows": scored["windows"], "allocate_s": allocate_s, "compress_s": compress_s,
                                   "allocation_overhead": round(allocate_s / compress_s, 3), "eval_s": eval_s,
                                   "removed_fraction": round(plan.removed_fraction(), 6),
                                   "model_removed_fraction": record["parameters"]["removed_fraction"],
                                   "groups": (plan.detail or {}).get("groups")})
            print(f"{allocation} @ {ratio}: ppl {scored['ppl']:.2f}, removed {plan.removed_fraction():.4f}, "
                  f"allocate {allocate_s:.1f} s, compress {compress_s:.1f} s", flush=True)
            write_json(args.out, result)
            del compressed
    result["partial"] = False
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
