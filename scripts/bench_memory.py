#!/usr/bin/env python
"""Host memory of steps 1 and 3 against model depth, with the layers streamed from disk.

    python scripts/bench_memory.py --layers 2 4 8 --dtype float16 --nsamples 8 --seq_len 256
    # TinyLlama-1.1B's layer shape in float32 (a CPU-sized run)
    python scripts/bench_memory.py --layers 2 4 8 --dtype float32 --name tinyllama-shape \
        --override '{"hidden_size": 2048, "intermediate_size": 5632, "num_key_value_heads": 4}'

For each depth N, the first N decoder layers of a random-weight preset (`--preset`, seeded,
utils/presets.py) are saved as a sharded safetensors checkpoint under a temporary folder
(--workdir, default the system's), then step 1 and step 3 (cholesky whitening, --decomposition
rsvd) each run in a fresh subprocess of compress.py, which reports its own peak resident memory
(getrusage ru_maxrss). The growth of the peak per extra layer (least-squares slope over the
depths) is compared with one decoder layer's weight bytes: with the layers streamed it should be
a small fraction of it (the target is 5%), where a model held whole grows by at least one layer's
bytes per layer. Checkpoints, statistics and outputs are deleted after each depth.

Writes scripts/results/bench_memory/<preset>_<dtype>_<N>x<L>.json.
"""
from __future__ import annotations

import argparse
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

# run in the child: compress.main with the given argv, then its own peak RSS (kB on Linux)
CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import compress
code = compress.main({argv!r})
print("BENCH_MEMORY " + json.dumps({{"rc": code, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def run_step(argv: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, argv=argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_MEMORY ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"compress.py {' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    if result["rc"] != 0:
        raise RuntimeError(f"compress.py {' '.join(argv)} exited {result['rc']}: {done.stderr[-2000:]}")
    return {"peak_rss_gib": round(result["maxrss_kib"] / 2 ** 20, 4), "seconds": round(seconds, 1)}


def save_checkpoint(preset: str, layers: int, dtype: str, directory: str, seed: int, override: dict) -> dict:
    """The preset's first `layers` layers saved sharded; returns one layer's and the non-layer bytes."""
    import torch
    from utils.model import DTYPES, decoder_layers
    from utils.presets import build_random_model
    model = build_random_model(f"random:{preset}", DTYPES[dtype], seed, layers, **override)
    layer_bytes = sum(p.numel() * p.element_size() for p in decoder_layers(model)[0].parameters())
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    model.save_pretrained(directory, max_shard_size="1GB")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"layer_weight_bytes": layer_bytes, "non_layer_weight_bytes": total - layers * layer_bytes}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", default="{}", help="JSON: config fields replacing the preset's (a smaller shape)")
    parser.add_argument("--name", default=None, help="name of the shape in the result file (default: the preset)")
    parser.add_argument("--workdir", default=None, help="where checkpoints and outputs go (deleted after)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if len(set(args.layers)) < 2:
        parser.error("--layers needs at least two depths to fit a growth per layer")
    override = json.loads(args.override)
    out = args.out or os.path.join(ROOT, "scripts", "results", "bench_memory",
                                   f"{args.name or args.preset}_{args.dtype}_{args.nsamples}x{args.seq_len}.json")
    runs = []
    sizes = None
    for layers in args.layers:
        work = tempfile.mkdtemp(prefix="bench-memory-", dir=args.workdir)
        try:
            checkpoint = os.path.join(work, "model")
            sizes = save_checkpoint(args.preset, layers, args.dtype, checkpoint, args.seed, override)
            common = ["--model", checkpoint, "--dtype", args.dtype, "--dataset", "random", "--device", "cpu",
                      "--whitening_nsamples", str(args.nsamples), "--model_seq_len", str(args.seq_len),
                      "--seed", str(args.seed), "--save_path", os.path.join(work, "out"),
                      "--stats_path", os.path.join(work, "stats")]
            step1 = run_step(["--step", "1", *common], args.threads)
            step3 = run_step(["--step", "3", *common, "--ratio", str(args.ratio), "--decomposition", "rsvd"],
                             args.threads)
            runs.append({"layers": layers, "step1": step1, "step3": step3})
            print(f"{layers} layers: step 1 {step1['peak_rss_gib']:.3f} GiB ({step1['seconds']} s), "
                  f"step 3 {step3['peak_rss_gib']:.3f} GiB ({step3['seconds']} s)", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    layer_gib = sizes["layer_weight_bytes"] / 2 ** 30
    growth = {}
    for step in ("step1", "step3"):
        per_layer = slope([r["layers"] for r in runs], [r[step]["peak_rss_gib"] for r in runs])
        growth[step] = {"gib_per_layer": round(per_layer, 4), "fraction_of_layer_bytes": round(per_layer / layer_gib, 4),
                        "target_met": per_layer / layer_gib < 0.05}
    result = {"preset": args.preset, "override": override, "random_weights": True, "dtype": args.dtype, "nsamples": args.nsamples,
              "seq_len": args.seq_len, "ratio": args.ratio, "decomposition": "rsvd", "whitening": "cholesky",
              "threads": args.threads, "layer_weight_gib": round(layer_gib, 4),
              "non_layer_weight_gib": round(sizes["non_layer_weight_bytes"] / 2 ** 30, 4),
              "runs": runs, "growth": growth, "machine": platform.platform(), "cpus": os.cpu_count(),
              "measured": "peak RSS of a fresh compress.py process per step (getrusage ru_maxrss)"}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    os.replace(out + ".tmp", out)
    print(json.dumps(growth, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
