"""Benchmark of step 8 (issue 17): low rank, quantization and both, at equal bytes on disk.

    OMP_NUM_THREADS=1 python scripts/bench_quant.py --out scripts/results/bench_quant_smollm2_cpu.json

One process, through the Python API: load SmolLM2-135M once; profile 64 x 512 calibration windows
of wiki.valid.tokens[0:0.8] once (step 1, for every SVD-LLM point); then for every point build the
model from a copy (SVD-LLM at a ratio: step 3; GPTQ / RTN: step 8 on the original or on the SVD-LLM
model), cast what stays float (embeddings, norms, biases; the SVD-LLM factors) to float16, save it
with save_compressed, measure the bytes of its linear weights IN THE FILE (safetensors header) and
the file's size, load it back with load_compressed (float32 compute; the stored values) and measure
perplexity on the held-back slice wiki.valid.tokens[0.8:1]. GPTQ takes the first --gptq_nsamples of
the same calibration windows. Bits per weight = 8 x linear bytes / weights of the original matrices;
the float16 original is 16.

Also measured: the cost of the de-quantization choice (component/quant_linear.py) on the GPTQ 4-bit
model, per forward (default) against the cached dense weight, prefill and decode, and memory.

JSON is rewritten after every point (atomically), so an interrupted run keeps what it measured.

A quick check that it runs (seconds, not a benchmark):
    python scripts/bench_quant.py --num_layers 2 --nsamples 4 --gptq_nsamples 2 --seq_len 64 --eval_limit 2 \
        --out /tmp/bench_quant_tiny.json --workdir /tmp/bench_quant_tiny
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2", "wiki.valid.tokens")

# name -> (SVD-LLM ratio or None, (method, bits, groupsize) or None)
POINTS = {
    "original_fp16": (None, None),
    "gptq4_g128": (None, ("gptq", 4, 128)),
    "gptq3_g128": (None, ("gptq", 3, 128)),
    "svdllm20_fp16": (0.2, None),
    "svdllm20_gptq4_g128": (0.2, ("gptq", 4, 128)),
    "svdllm20_rtn8": (0.2, ("rtn", 8, -1)),
    "svdllm40_fp16": (0.4, None),
    "svdllm75_fp16": (0.75, None),  # low rank alone at about 25% of the float16 bytes
    # references for GPTQ itself (not in the default run; bench_quant_smollm2_cpu_rtn.json)
    "rtn4_g128": (None, ("rtn", 4, 128)),
    "rtn3_g128": (None, ("rtn", 3, 128)),
}
DEFAULT_POINTS = [name for name in POINTS if not name.startswith("rtn")]


def describe(name: str) -> str:
    ratio, quant = POINTS[name]
    parts = [f"SVD-LLM {ratio:.0%}" if ratio else "original"]
    if quant:
        method, bits, groupsize = quant
        parts.append(f"{method.upper()} {bits}-bit " + ("per channel" if groupsize == -1 else f"g{groupsize}"))
    else:
        parts.append("float16")
    return " + ".join(parts)


@torch.no_grad()
def dequantization_costs(model, ids: torch.Tensor, decode_steps: int = 16) -> dict:
    """Per-forward de-quantization against the cached dense weight, on `model` (quantized)."""
    from component import QuantLinear, set_weight_cache
    from evaluater import generate_timed

    def timed() -> dict:
        generate_timed(model, ids, 2, "cpu")  # warm-up
        runs = [generate_timed(model, ids, decode_steps, "cpu") for _ in range(2)]
        return {"prefill_s": min(r["prefill_s"] for r in runs),
                "decode_step_ms": 1e3 * min(sum(r["step_s"]) / len(r["step_s"]) for r in runs)}

    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    model.config.use_cache = True
    set_weight_cache(model, False)
    start = time.perf_counter()
    for module in modules:
        module.dequantized_weight()
    dequantize_all_s = time.perf_counter() - start
    per_forward = timed()
    set_weight_cache(model, True)
    cached = timed()
    cache_bytes = sum(m.weight_cache.numel() * m.weight_cache.element_size() for m in modules)
    set_weight_cache(model, False)
    packed = sum(t.numel() * t.element_size() for m in modules for n, t in m.named_buffers(recurse=False)
                 if n != "weight_cache")
    return {"prompt_tokens": int(ids.numel()), "decode_steps": decode_steps,
            "per_forward": {**per_forward, "resident_linear_bytes": packed},
            "cached": {**cached, "resident_linear_bytes": packed + cache_bytes},
            "dequantize_every_linear_once_s": dequantize_all_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default=DATA + "[0:0.8]")
    p.add_argument("--evaluation", default=DATA + "[0.8:1]")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows (profile of SVD-LLM)")
    p.add_argument("--gptq_nsamples", type=int, default=32, help="of those, the first N for GPTQ")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=24, help="evaluation windows of --seq_len tokens")
    p.add_argument("--points", default=",".join(DEFAULT_POINTS),
                   help=f"comma list of {', '.join(POINTS)} (default: all but the rtn references)")
    p.add_argument("--num_layers", type=int, default=None, help="first N decoder layers only (quick checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/bench_quant", help="saved models go here (each removed after use)")
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_quant_smollm2_cpu.json"))
    args = p.parse_args(argv)
    points = args.points.split(",")
    unknown = [name for name in points if name not in POINTS]
    if unknown:
        print(f"error: unknown point {unknown[0]!r}; choose from {', '.join(POINTS)}", file=sys.stderr)
        return 2
    if not 1 <= args.gptq_nsamples <= args.nsamples:
        print("error: --gptq_nsamples must be between 1 and --nsamples", file=sys.stderr)
        return 2

    import evaluater
    from methods.quantize import QuantizeOptions
    from utils.data import calibration_windows, load_text, tokenize
    from utils.io import load_compressed, safetensors_tensor_bytes, save_compressed, write_json
    from utils.model import load_model, target_shapes
    from pipeline.steps import (CompressOptions, compress_model, compression_block, linear_storage, profile_model,
                                quantize_model, uncompressed_block)
    from utils.plan import Plan

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, "float32", args.seed, args.num_layers)
    windows = calibration_windows(args.calibration, tokenizer, args.nsamples, args.seq_len, args.seed)
    eval_ids = tokenize(tokenizer, load_text(args.evaluation, "test"))
    result = {
        "benchmark": "bench_quant", "model": args.model, "num_layers": args.num_layers,
        "settings": {"calibration": args.calibration, "nsamples": args.nsamples, "seq_len": args.seq_len,
                     "gptq_nsamples": args.gptq_nsamples, "evaluation": args.evaluation, "eval_limit": args.eval_limit,
                     "seed": args.seed, "compute_dtype": "float32", "stored_float_dtype": "float16",
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                     "machine": platform.processor() or platform.machine(),
                     "load_average_1min_at_start": round(os.getloadavg()[0], 2),
                     "gptq": {"percdamp": 0.01, "blocksize": 128, "act_order": False, "sym": False}},
        "points": {},
    }
    stats = None
    if any(POINTS[name][0] for name in points):
        start = time.perf_counter()
        stats = profile_model(model, windows, "cpu")
        result["profile_s"] = round(time.perf_counter() - start, 3)
    low_rank: dict[float, tuple] = {}  # ratio -> (model, block, decompose seconds), reused by its points
    os.makedirs(args.workdir, exist_ok=True)

    for name in points:
        ratio, quant = POINTS[name]
        record = {"description": describe(name), "ratio": ratio}
        if ratio is None:
            built, block, build_s = copy.deepcopy(model), uncompressed_block(args.model, model, args.seed, args.num_layers), 0.0
        else:
            if ratio not in low_rank:
                base = copy.deepcopy(model)
                start = time.perf_counter()
                compressed = compress_model(base, Plan.uniform(target_shapes(base), ratio), CompressOptions(), "cpu", stats)
                low_rank[ratio] = (base, compression_block(compressed, args.model, base, stats, args.seed, args.num_layers),
                                   time.perf_counter() - start)
            base, block, build_s = low_rank[ratio]
            built = copy.deepcopy(base)
            record["decompose_s"] = round(build_s, 3)
        if quant:
            method, bits, groupsize = quant
            options = QuantizeOptions(method, bits, groupsize)
            start = time.perf_counter()
            section = quantize_model(built, options, "cpu", windows[:args.gptq_nsamples] if options.needs_activations else None,
                                     {"dataset": args.calibration, "seed": args.seed})
            record["quantize_s"] = round(time.perf_counter() - start, 3)
            record["mean_relative_gptq_loss"] = section["mean_relative_loss"]
            block = {**block, "quantization": section}
        record["compress_s"] = round(build_s + record.get("quantize_s", 0.0), 3)
        # what stays float is stored in float16 (QuantLinear keeps its codes and float16 scales); the
        # nn.Module cast: transformers refuses .half() on a model it read from a GGUF file
        torch.nn.Module.to(built, torch.float16)
        path = os.path.join(args.workdir, name)
        start = time.perf_counter()
        save_compressed(built, tokenizer, path, block, overwrite=True)  # its own work folder: a rerun replaces it
        record["save_s"] = round(time.perf_counter() - start, 3)
        file = os.path.join(path, "model.safetensors")
        record["storage"] = linear_storage(built, safetensors_tensor_bytes(file))
        record["file_bytes"] = os.path.getsize(file)
        del built
        gc.collect()
        loaded, _, _ = load_compressed(path, torch.float32)
        start = time.perf_counter()
        ppl = evaluater.perplexity(loaded, eval_ids, args.seq_len, 1, "cpu", args.eval_limit, desc=f"ppl {name}")
        record["eval_s"] = round(time.perf_counter() - start, 3)
        record["perplexity"] = {k: ppl[k] for k in ("ppl", "windows", "tokens", "seq_len", "non_finite_tokens")}
        if name == "gptq4_g128":
            result["dequantization"] = dequantization_costs(loaded, eval_ids[:args.seq_len][None])
        del loaded
        gc.collect()
        shutil.rmtree(path)
        result["points"][name] = record
        s = record["storage"]
        print(f"{name}: ppl {ppl['ppl']:.3f}, linear weights {s['linear_bytes'] / 2**20:.2f} MiB = "
              f"{s['bits_per_weight']:.3f} bits/weight ({s['fraction_of_fp16']:.1%} of float16), "
              f"compress {record['compress_s']:.1f}s, eval {record['eval_s']:.1f}s", flush=True)
        result["table"] = table(result["points"])
        result["total_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out, result)
    if stats is not None:
        stats.close()
    print(f"-> {args.out} ({result['total_s']:.0f} s)")
    return 0


def table(points: dict) -> dict:
    """Points by bytes, and the comparison at about 25% of the float16 bytes (18% to 28%)."""
    rows = sorted(({"point": n, "description": r["description"], "ppl": r["perplexity"]["ppl"],
                    "bits_per_weight": r["storage"]["bits_per_weight"],
                    "fraction_of_fp16": r["storage"]["fraction_of_fp16"],
                    "linear_bytes": r["storage"]["linear_bytes"], "compress_s": r["compress_s"]}
                   for n, r in points.items()), key=lambda row: row["linear_bytes"])
    near = [row for row in rows if 0.18 <= row["fraction_of_fp16"] <= 0.28 and row["ppl"] is not None]
    best = min(near, key=lambda row: row["ppl"]) if near else None
    return {"by_bytes": rows, "about_25_percent": {"window": [0.18, 0.28], "points": [r["point"] for r in near],
                                                   "lowest_ppl": best["point"] if best else None}}


if __name__ == "__main__":
    sys.exit(main())
