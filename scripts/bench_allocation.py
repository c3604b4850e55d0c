"""Allocation benchmark (issue 20, with ASVD's search of issue 16): uniform, asvd (ppl; stable_rank),
v2 and duo, each with whitening, each with and without column preservation; held-out perplexity
and time per step, the sensitivity passes especially.

    OMP_NUM_THREADS=1 python scripts/bench_allocation.py                      # everything
    OMP_NUM_THREADS=1 python scripts/bench_allocation.py --phase tables       # only the sensitivity tables

Setting (docs of the shared protocol): SmolLM2-135M float32 on the CPU, seed 0; step-1 statistics
of 64 x 512 calibration windows of wiki.valid.tokens[0:0.8] (read from --stats_path when it is
there, else profiled here); held-back perplexity on the first 32 windows of 512 of [0.8:1].
The sensitivity passes take their windows from the same calibration slice, scaled to the CPU
(--sensitivity_nsamples x --sensitivity_seq_len, --duo_candidates / --asvd_candidates): their
tables are cached under --tables_dir and reused (key-checked) by a later run, so `--phase tables`
may run first. The JSON is rewritten (atomically) after every run with "partial": true until done.
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
RESULTS = os.path.join(ROOT, "scripts", "results", "bench_allocation")
CACHED_STATS = "/work/cache/stats_smollm2_w64x512"
ALLOCATIONS = ("uniform", "v2", "asvd_ppl", "asvd_stable_rank", "duo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default=DATA + "[0:0.8]")
    p.add_argument("--evaluation", default=DATA + "[0.8:1]")
    p.add_argument("--scaling", default="none", choices=["none", "abs_mean", "abs_max"],
                   help="decompose with ASVD's scaling (whitening none) instead of whitening: the sensitivity "
                        "tables and step 3 both use it (issue 16's ASVD scaling + search rows)")
    p.add_argument("--alpha", type=float, default=0.5, help="ASVD's scaling exponent (with --scaling)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=32, help="held-back windows scored")
    p.add_argument("--stats_path", default=CACHED_STATS if os.path.isdir(CACHED_STATS) else None,
                   help="step-1 statistics of exactly this calibration (profiled here when absent)")
    p.add_argument("--ratios", default="0.4,0.6,0.2", help="in the order they run")
    p.add_argument("--duo_ratios", default="0.4,0.6", help="ratios at which duo runs (its table depends on the ratio)")
    p.add_argument("--allocations", default=",".join(ALLOCATIONS))
    p.add_argument("--column_preserve", default="off,on", help="off, on or both (off,on)")
    p.add_argument("--column_preserve_ratios", default="0.4,0.6", help="ratios that also run with column preservation")
    p.add_argument("--column_preserve_allocations", default="uniform,v2,duo")
    p.add_argument("--sensitivity_nsamples", type=int, default=1)
    p.add_argument("--sensitivity_seq_len", type=int, default=128)
    p.add_argument("--duo_candidates", default="around:0.2",
                   help="kept fractions (+ the base state 1 - ratio), or around:D = {1 - ratio - D, 1 - ratio + D, 1.0}")
    p.add_argument("--asvd_candidates", default="0.25,0.5,0.75", help="kept fractions")
    p.add_argument("--duo_table_ratios", default=None, help="ratios whose duo table --phase tables measures "
                                                              "(default: --duo_ratios)")
    p.add_argument("--tables_dir", default=os.path.join(RESULTS, "stats"))
    p.add_argument("--v2_max_shift", type=float, default=0.15)
    p.add_argument("--phase", default="all", choices=["all", "tables", "merge"],
                   help="all: the runs; tables: only the sensitivity tables; merge: combine the runs of --inputs "
                        "(parallel processes, each with its own --out) into --out and summarise")
    p.add_argument("--inputs", default=None, help="merge: comma list of JSON files written by --phase all")
    p.add_argument("--expected_runs", type=int, default=None, help="merge: partial stays true below this count")
    p.add_argument("--original_from", default=None,
                   help="take the original model's held-out perplexity from this earlier output (same settings)")
    p.add_argument("--skip_spectra", action="store_true", help="no spectra pass (a process that runs no v2)")
    p.add_argument("--skip_svdvals_timing", action="store_true",
                   help="do not time the former svdvals spectra (another process measures v2's cost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(RESULTS, "smollm2_cpu.json"))
    return p


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    import torch

    import api
    from evaluater import perplexity
    from methods import DecomposeOptions
    from methods.allocation import asvd_plan, duo_plan, v2_plan, whitened_spectra
    from methods.sensitivity import SensitivityOptions, sensitivity_table
    from utils.data import tokenize
    from utils.io import read_json, write_json
    from pipeline.steps import Statistics
    args = build_parser().parse_args(argv)
    if args.phase == "merge":
        return merge(args)
    allocations = args.allocations.split(",")
    unknown = [a for a in allocations if a not in ALLOCATIONS]
    if unknown:
        raise SystemExit(f"error: --allocations {unknown[0]}: choose from {', '.join(ALLOCATIONS)}")
    whitening = "cholesky" if args.scaling == "none" else "none"
    if args.scaling != "none" and ("on" in args.column_preserve.split(",") or {"v2", "duo"} & set(allocations)):
        raise SystemExit("error: --scaling is ASVD's decomposition: run it with uniform / asvd_* allocations and "
                         "--column_preserve off (v2, duo and column preservation read whitened spectra)")
    model, tokenizer = api.load_model(args.model, "auto", args.seed)
    model.eval()
    result = {"settings": {**vars(args), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "runs": [], "tables": {}, "partial": True}
    if args.phase == "all" and os.path.exists(args.out):  # a stopped run: keep what it finished
        earlier = read_json(args.out)
        if earlier.get("settings", {}).get("sensitivity_seq_len") == args.sensitivity_seq_len:
            result["runs"] = earlier.get("runs", [])
            result.update({k: earlier[k] for k in ("original_ppl", "original_eval_s") if k in earlier})

    def timed(fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        return out, round(time.perf_counter() - start, 3)

    def save():
        if args.phase == "all":
            write_json(args.out, result)

    # ---- step 1: the lead's statistics of exactly this calibration, or profile here
    if args.stats_path and os.path.isfile(os.path.join(args.stats_path, "meta.json")):
        stats = Statistics.open(args.stats_path)
        profile_file = args.stats_path.rstrip("/") + ".profile_s.json"
        result["profile_s"] = read_json(profile_file)["profile_s"] if os.path.isfile(profile_file) else None
        result["profile_source"] = {"stats_path": args.stats_path, "profile_s_file": profile_file}
    else:
        windows = api.calibration_windows(args.calibration, tokenizer, args.nsamples, args.seq_len, args.seed)
        stats, result["profile_s"] = timed(api.profile_model, model, windows, args.device)
        result["profile_source"] = "profiled in this process"
    stats.check_model(model)
    sens_windows = api.calibration_windows(args.calibration, tokenizer, args.sensitivity_nsamples,
                                           args.sensitivity_seq_len, args.seed)
    windows_info = {"dataset": args.calibration, "seed": args.seed}
    os.makedirs(args.tables_dir, exist_ok=True)

    def table_for(metric: str, ratio: float | None):
        if metric == "kl" and args.duo_candidates.startswith("around:"):
            step = float(args.duo_candidates.split(":", 1)[1])
            candidates = sorted({round(min(max(1 - ratio + d, 0.05), 1.0), 6) for d in (-step, step)} | {1.0})
        else:
            candidates = floats(args.duo_candidates if metric == "kl" else args.asvd_candidates)
        options = SensitivityOptions(metric, tuple(candidates), ratio if metric == "kl" else None, whitening,
                                     scaling=args.scaling, alpha=args.alpha)
        name = f"sensitivity_{metric}" + (f"_r{ratio:g}" if metric == "kl" else "") + \
            f"_{args.sensitivity_nsamples}x{args.sensitivity_seq_len}" + \
            (f"_{args.scaling}{args.alpha:g}" if args.scaling != "none" and metric != "stable_rank" else "") + ".json"
        path = os.path.join(args.tables_dir, name)
        (table, reused), seconds = timed(sensitivity_table, model, sens_windows if metric != "stable_rank" else None,
                                         stats, args.device, options, path, windows_info)
        record = {"metric": metric, "base_ratio": ratio, "path": os.path.relpath(path, ROOT), "reused": reused,
                  "measure_s": round(table.seconds, 3), "evaluations": table.evaluations,
                  "seconds_this_process": seconds, "candidates": options.ratios, "base_value": table.base_value,
                  "windows": f"{args.sensitivity_nsamples} x {args.sensitivity_seq_len}"}
        result["tables"][f"{metric}" + (f"_r{ratio:g}" if metric == "kl" else "")] = record
        print(f"table {metric} ratio {ratio}: {'reused' if reused else 'measured'}, {table.evaluations} evaluations, "
              f"{table.seconds:.1f} s", flush=True)
        return table, record

    ratios = floats(args.ratios)
    if args.phase == "tables":
        for ratio in floats(args.duo_table_ratios or args.duo_ratios):
            if "duo" in allocations:
                table_for("kl", ratio)
        if "asvd_ppl" in allocations:
            table_for("ppl", None)
        return result

    eval_ids = tokenize(tokenizer, api.load_text(args.evaluation, "test"))
    if args.original_from and "original_ppl" not in result:
        earlier = read_json(args.original_from)
        result.update({"original_ppl": earlier["original_ppl"], "original_eval_s": earlier["original_eval_s"],
                       "original_from": os.path.relpath(args.original_from, ROOT)})
    if "original_ppl" not in result:
        original, result["original_eval_s"] = timed(perplexity, model, eval_ids, args.seq_len, 1, args.device,
                                                    args.eval_limit)
        result["original_ppl"] = original["ppl"]
    # ---- v2's cost: the spectra, by the eigenvalues of the smaller Gram and (before) by svdvals
    sigmas = None
    if not args.skip_spectra:
        sigmas, result["spectra_s"] = timed(whitened_spectra, model, stats, args.device)
        if not args.skip_svdvals_timing:
            _, result["spectra_svdvals_s"] = timed(whitened_spectra, model, stats, args.device, method="svdvals")
        result["spectra_method"] = "whitened_gram_spectrum (W H W^T / S^T W^T W S, float32 products)"
    save()
    done = {(r["ratio"], r["allocation"], r["column_preserve"]) for r in result["runs"]}
    preserve_modes = args.column_preserve.split(",")
    for ratio in ratios:
        for preserve in preserve_modes:
            for allocation in allocations:
                on = preserve == "on"
                if on and (ratio not in floats(args.column_preserve_ratios)
                           or allocation not in args.column_preserve_allocations.split(",")):
                    continue
                if (ratio, allocation, on) in done:
                    continue
                if allocation == "duo" and ratio not in floats(args.duo_ratios):
                    continue
                sensitivity_s, table_record = 0.0, None
                start = time.perf_counter()
                if allocation == "uniform":
                    plan = api.uniform_plan(model, ratio)
                elif allocation == "v2":
                    plan, plan.detail = v2_plan(model, ratio, sigmas, args.v2_max_shift)
                elif allocation == "duo":
                    table, table_record = table_for("kl", ratio)
                    sensitivity_s = table_record["measure_s"]
                    start = time.perf_counter()
                    plan, plan.detail = duo_plan(model, ratio, table)
                else:
                    metric = "ppl" if allocation == "asvd_ppl" else "stable_rank"
                    table, table_record = table_for(metric, None)
                    sensitivity_s = table_record["measure_s"]
                    start = time.perf_counter()
                    plan, plan.detail = asvd_plan(model, ratio, table)
                search_s = round(time.perf_counter() - start, 3)
                compressed = copy.deepcopy(model)
                options = api.CompressOptions(DecomposeOptions(whitening, column_preserve=on, scaling=args.scaling,
                                                               alpha=args.alpha))
                record, compress_s = timed(api.compress_model, compressed, plan, options, args.device, stats)
                scored, eval_s = timed(perplexity, compressed, eval_ids, args.seq_len, 1, args.device, args.eval_limit)
                allocate_s = round(search_s + sensitivity_s + (result["spectra_s"] if allocation == "v2" else 0.0), 3)
                run = {"ratio": ratio, "allocation": allocation, "column_preserve": on, "ppl": scored["ppl"],
                       "decomposition": "whitening" if args.scaling == "none" else f"{args.scaling} alpha {args.alpha:g}",
                       "windows": scored["windows"], "sensitivity_s": sensitivity_s, "search_s": search_s,
                       "allocate_s": allocate_s, "compress_s": compress_s, "eval_s": eval_s,
                       "removed_fraction": round(plan.removed_fraction(), 6),
                       "params_after": plan.params_after(), "params_before": plan.params_before(),
                       "budget_ok": plan.params_after() <= int((1 - ratio) * plan.params_before()),
                       "model_removed_fraction": record["parameters"]["removed_fraction"],
                       "groups": (plan.detail or {}).get("groups"), "table": table_record,
                       "column_preserved_matrices": sum(bool(m.get("columns_kept")) for m in record["modules"].values())}
                if allocation == "v2":
                    run["spectra_s"] = result["spectra_s"]
                result["runs"].append(run)
                print(f"{allocation}{' +cp' if on else ''} @ {ratio}: ppl {scored['ppl']:.2f}, removed "
                      f"{plan.removed_fraction():.4f}, allocate {allocate_s:.1f} s, compress {compress_s:.1f} s, "
                      f"eval {eval_s:.1f} s", flush=True)
                save()
                del compressed
    summarise(result)
    result["partial"] = False
    save()
    return result


def merge(args: argparse.Namespace) -> dict:
    """One JSON from the outputs of parallel processes: the first input's settings and shared
    figures, every input's runs and tables (each run keeps its own timings), then the summary."""
    from utils.io import read_json, write_json
    parts = [read_json(path) for path in args.inputs.split(",")]
    result = {k: v for k, v in parts[0].items() if k not in ("runs", "tables", "summary", "partial")}
    for part in parts:  # the spectra figures of the last part that measured them (the newest code)
        if "spectra_s" in part:
            result.update({k: part.get(k) for k in ("spectra_s", "spectra_svdvals_s", "spectra_method")})
    result["spectra_by_part"] = [{k: p.get(k) for k in ("spectra_s", "spectra_svdvals_s", "spectra_method")}
                                 for p in parts]
    result["runs"], result["tables"] = [], {}
    result["merged_from"] = [{"path": os.path.relpath(path, ROOT), "settings": part["settings"],
                              "partial": part.get("partial"), "runs": len(part.get("runs", []))}
                             for path, part in zip(args.inputs.split(","), parts)]
    seen = set()
    for part in parts:
        result["tables"].update(part.get("tables", {}))
        for run in part.get("runs", []):
            key = (run["ratio"], run["allocation"], run["column_preserve"])
            if key not in seen:
                seen.add(key)
                result["runs"].append(run)
    result["runs"].sort(key=lambda r: (r["ratio"], r["column_preserve"], ALLOCATIONS.index(r["allocation"])))
    summarise(result)
    result["partial"] = any(p.get("partial", True) for p in parts) or (
        args.expected_runs is not None and len(result["runs"]) < args.expected_runs)
    write_json(args.out, result)
    return result


def summarise(result: dict) -> None:
    """Best combination per ratio against uniform whitening, and v2's overhead."""
    summary = {}
    for ratio in sorted({r["ratio"] for r in result["runs"]}):
        runs = [r for r in result["runs"] if r["ratio"] == ratio and r["ppl"] is not None]
        uniform = next((r for r in runs if r["allocation"] == "uniform" and not r["column_preserve"]), None)
        best = min(runs, key=lambda r: r["ppl"], default=None)
        if best is None:
            continue
        entry = {"best": f"{best['allocation']}{' + column_preserve' if best['column_preserve'] else ''}",
                 "best_ppl": best["ppl"], "uniform_ppl": uniform["ppl"] if uniform else None}
        if uniform:
            entry["improvement_vs_uniform"] = round(1 - best["ppl"] / uniform["ppl"], 4)
            entry["extra_time_s"] = round(best["allocate_s"] + best["compress_s"] - uniform["compress_s"], 3)
            v2 = next((r for r in runs if r["allocation"] == "v2" and not r["column_preserve"]), None)
            if v2:
                entry["v2_overhead_vs_step3"] = round(result["spectra_s"] / uniform["compress_s"], 4)
                if result.get("profile_s"):
                    entry["v2_overhead_vs_steps1_3"] = round(
                        result["spectra_s"] / (result["profile_s"] + uniform["compress_s"]), 4)
        summary[f"{ratio:g}"] = entry
    result["summary"] = summary


if __name__ == "__main__":
    main()
