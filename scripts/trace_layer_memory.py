#!/usr/bin/env python
"""Resident memory of one compress.py run layer by layer: the peak within each streamed layer.

    python scripts/trace_layer_memory.py --out scripts/results/bench_memory/trace.json -- \\
        --step 3 --model CHECKPOINT --stats_path STATS --save_path OUT --dtype float32 --device cpu ...

compress.main runs in this process with a thread sampling VmRSS every 10 ms; each time the layer
walk reads a layer from disk (utils.model.LayerStream.load) the peak since the previous read is
recorded, and each time it releases one the resident memory after a gc.collect. --no_mmap_fix
turns utils.layerwise.fix_mmap_threshold into a no-op (glibc's dynamic threshold, the code before
the fix). What grows per layer here grows with the depth in ru_maxrss (scripts/bench_memory.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def resident_gib() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 2 ** 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--no_mmap_fix", action="store_true", help="glibc's dynamic mmap threshold (before the fix)")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then compress.py's arguments")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    import compress
    import utils.layerwise as layerwise
    import utils.model as model_module
    if args.no_mmap_fix:
        layerwise.fix_mmap_threshold = lambda *a, **k: False
    peak = [0.0]
    window_peaks: list[float] = []
    between: list[float] = []

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], resident_gib())
            time.sleep(0.01)
    threading.Thread(target=sample, daemon=True).start()
    load, release = model_module.LayerStream.load, model_module.LayerStream.release

    def traced_load(self, model, index):
        window_peaks.append(round(peak[0], 4))
        peak[0] = 0.0
        load(self, model, index)

    def traced_release(self, model, index):
        release(self, model, index)
        gc.collect()
        between.append(round(resident_gib(), 4))
    model_module.LayerStream.load, model_module.LayerStream.release = traced_load, traced_release
    code = compress.main(argv)
    window_peaks.append(round(peak[0], 4))
    result = {"argv": argv, "rc": code, "mmap_fix": not args.no_mmap_fix,
              "peak_per_layer_gib": window_peaks[1:],  # the first window is the load before layer 0
              "resident_after_layer_gib": between,
              "maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 4)}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")
    print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
