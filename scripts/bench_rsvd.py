"""Micro-benchmark: exact SVD vs randomized SVD (utils/rsvd.py) on LLM-sized matrices.

    python scripts/bench_rsvd.py --out scripts/results/bench_rsvd_cpu.json

Synthetic float32 A = Q1 diag(s) Q2^T with a power-law spectrum s_i = i^-0.6 (as in
../shared/notes/decomposition-speed.md), rank r = floor(m n (1 - ratio) / (m + n)).
For every shape, ratio and (oversamples, n_iter):
  time ratio     exact seconds / randomized seconds (the exact SVD is timed before and after the
                 randomized runs of that shape and the mean is used, so machine load hits both);
  excess         ||A - A_r||_F / optimum - 1, optimum = sqrt(sum_{i>r} s_i^2) (Eckart-Young);
  excess_vs_exact  ||A - A_r||_F / ||A - A_r(exact svd)||_F - 1 (the issue's "higher truncation loss").
torch.svd_lowrank (q = r + 10, niter = 2) is run as the reference of the notes.
Optionally (--stats_path from step 1, --model) the same on a few real whitened W S of the model;
--save_whitened writes those matrices to a safetensors file (a few MB) and --whitened_file reads
them back, so they can travel to a GPU machine that has no model. On CUDA (--device cuda),
--exact_driver picks the exact SVD's cuSOLVER driver (gesvda, or the default), and every row's
exact_excess is that driver's truncation error against the float64 optimum.

GPU run (no model needed there; the file comes from a CPU run with --save_whitened):
    python scripts/bench_rsvd.py --device cuda --exact_driver gesvda --configs 10:2,100:4 \
        --whitened_file .gpu_carry/whitened_smollm2.safetensors --out $OUT/bench_rsvd_gesvda.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from utils.decompose import rank_for_ratio  # noqa: E402
from utils.measure import synchronize  # noqa: E402
from utils.rsvd import randomized_svd, route_cost  # noqa: E402


def synthetic(m: int, n: int, alpha: float, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q1 diag(s) Q2^T on `device` (the QRs run there: single-threaded on a GPU machine's CPU
    they would take tens of seconds at 11008 x 4096)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=g).to(device))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=g).to(device))
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-alpha)
    return (q1 * s.float().to(device)) @ q2.T, s


def residual(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - (u * s) @ vh))


def timed(fn, device: torch.device | str = "cpu"):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def exact(a: torch.Tensor, driver: str | None):
    return torch.linalg.svd(a, full_matrices=False, driver=driver if a.is_cuda else None)


def bench_matrix(name: str, a: torch.Tensor, optimum_of, ratios, configs, lowrank: bool, log,
                 routes: tuple[str, ...] = ("auto",), driver: str | None = None) -> dict:
    m, n = a.shape
    exact(a, driver)  # warm-up (CUDA handles, workspace)
    (eu, es, evh), t0 = timed(lambda: exact(a, driver), a.device)
    log(f"{name}: exact svd {t0:.2f} s")
    rows, times = [], []
    for ratio in ratios:
        rank = rank_for_ratio(m, n, ratio)
        exact_err = residual(a, eu[:, :rank], es[:rank], evh[:rank])
        optimum = optimum_of(rank, es)
        runs = [(f"rsvd-{route}", p, q) for route in routes for p, q in configs]
        runs += [("svd_lowrank", 10, 2)] if lowrank else []
        for kind, p, q in runs:
            g = torch.Generator(device=a.device).manual_seed(0)
            if kind.startswith("rsvd"):
                route = kind.split("-", 1)[1]
                if route == "auto":  # record the route auto picks
                    cost = route_cost(m, n, rank, min(rank + p, m, n), q)
                    kind = "rsvd-auto(" + ("gram" if cost["gram"] < cost["direct"] else "direct") + ")"
                (u, s, vh), t = timed(lambda: randomized_svd(a, rank, p, q, g, route=route), a.device)
            else:
                torch.manual_seed(0)
                (u, s, v), t = timed(lambda: torch.svd_lowrank(a, q=min(rank + p, min(m, n)), niter=q), a.device)
                u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
            err = residual(a, u, s, vh)
            rows.append({"ratio": ratio, "rank": rank, "method": kind, "oversamples": p, "n_iter": q,
                         "seconds": round(t, 3), "excess": err / optimum - 1,
                         "excess_vs_exact": err / exact_err - 1, "exact_excess": exact_err / optimum - 1})
            times.append(t)
            log(f"{name} ratio {ratio} r={rank} {kind} p={p} q={q}: {t:.2f} s, excess {100 * (err / optimum - 1):.2f}% "
                f"(vs exact {100 * (err / exact_err - 1):.2f}%)")
    _, t1 = timed(lambda: exact(a, driver), a.device)
    exact_s = (t0 + t1) / 2
    log(f"{name}: exact svd again {t1:.2f} s")
    for row, t in zip(rows, times):  # the unrounded time: a tiny matrix can round to 0.000 s
        row["speedup"] = round(exact_s / t, 3)
    return {"shape": [m, n], "device": str(a.device), "exact_driver": driver, "exact_svd_s": [round(t0, 3), round(t1, 3)], "exact_svd_mean_s": round(exact_s, 3),
            "runs": rows}


def whitened_matrices(stats_path: str, model: str, layers: list[int], modules: str = "q_proj,up_proj,down_proj"
                      ) -> dict[str, torch.Tensor]:
    """W S of the named linears ("all": every target linear) of the given layers (float32), from step-1
    statistics."""
    from safetensors.torch import load_file
    from utils.model import decoder_layers, load_model, target_linears
    from utils.io import read_json
    from utils.stats import saved_gram
    from utils.whitening import whitening_factor
    meta = read_json(os.path.join(stats_path, "meta.json"))
    net, _ = load_model(model)
    out = {}
    for index in layers:
        stats = load_file(os.path.join(stats_path, f"layer_{index:04d}.safetensors"))
        streams = meta["streams"][str(index)]
        for name, linear in target_linears(decoder_layers(net)[index]).items():
            if modules != "all" and name.split(".")[-1] not in modules.split(","):
                continue
            factor = whitening_factor(saved_gram(stats, streams[name]), "cholesky")
            out[f"layer{index}.{name}"] = factor.right_multiply(linear.weight.detach()).float()
    return out


def summarize(record: dict, max_excess: float = 0.01, min_speedup: float = 2.0) -> dict:
    """Per (oversamples, n_iter): worst speedup and worst excess_vs_exact over the synthetic runs,
    and whether the issue's target (>= 2x faster, <= 1% higher truncation loss) holds everywhere."""
    table: dict[str, dict] = {}
    for shape, block in record["synthetic"].items():
        for row in block["runs"]:
            key = f"{row['method']} p={row['oversamples']} q={row['n_iter']}"
            cell = table.setdefault(key, {"cases": {}})
            cell["cases"][f"{shape}@{row['ratio']:g}"] = {"speedup": row["speedup"],
                                                         "excess_vs_exact": round(row["excess_vs_exact"], 5)}
    for cell in table.values():
        cases = cell["cases"].values()
        cell["min_speedup"] = min(c["speedup"] for c in cases)
        cell["max_excess_vs_exact"] = max(c["excess_vs_exact"] for c in cases)
        cell["meets_target"] = {name: c["speedup"] >= min_speedup and c["excess_vs_exact"] <= max_excess
                                for name, c in cell["cases"].items()}
    return table


def merge(paths: list[str], out: str) -> None:
    record: dict = {"settings": [], "synthetic": {}, "whitened": {}}
    for path in paths:
        with open(path) as handle:
            part = json.load(handle)
        record["settings"].append(part["settings"])
        for shape, block in part.get("synthetic", {}).items():
            if shape not in record["synthetic"]:
                record["synthetic"][shape] = {**block, "runs": list(block["runs"]), "parts": [block]}
            else:  # the same shape measured in another run: keep every row, and each run's exact timings
                record["synthetic"][shape]["runs"].extend(block["runs"])
                record["synthetic"][shape]["parts"].append(block)
        record["whitened"].update(part.get("whitened", {}))
    record["summary"] = summarize(record)
    with open(out, "w") as handle:
        json.dump(record, handle, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,11008x4096")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--configs", default="10:2,10:4,100:3,200:3",
                   help="comma list of oversamples:n_iter for utils.rsvd.randomized_svd")
    p.add_argument("--routes", default="auto", help="comma list of randomized_svd routes: auto, gram, direct")
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--no_lowrank", action="store_true", help="skip the torch.svd_lowrank reference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the matrices are decomposed (cpu, cuda)")
    p.add_argument("--exact_driver", default=None, choices=[None, "gesvd", "gesvdj", "gesvda"],
                   help="cuSOLVER driver of the exact SVD on CUDA (default: torch's choice)")
    p.add_argument("--save_whitened", default=None, help="write the whitened matrices to this safetensors file")
    p.add_argument("--whitened_file", default=None, help="read whitened matrices from this safetensors file")
    p.add_argument("--stats_path", default=None, help="step-1 statistics for real whitened matrices")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,15,29")
    p.add_argument("--modules", default="q_proj,up_proj,down_proj", help="linears to take from each layer, or all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_rsvd_cpu.json"))
    p.add_argument("--merge", nargs="+", default=None, help="merge these result files into --out and stop")
    opts = p.parse_args(argv)
    if opts.merge:
        merge(opts.merge, opts.out)
        return 0
    torch.set_num_threads(opts.threads)
    ratios = [float(r) for r in opts.ratios.split(",")]
    configs = [tuple(int(x) for x in c.split(":")) for c in opts.configs.split(",")]
    routes = tuple(opts.routes.split(","))
    record = {"settings": {**vars(opts), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "gpu": torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") else None,
                           "load_avg_start": os.getloadavg()},
              "synthetic": {}, "whitened": {}}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out + ".tmp", "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(opts.out + ".tmp", opts.out)

    def log(text):
        print(text, flush=True)

    mats = {}
    if opts.stats_path:
        mats = whitened_matrices(opts.stats_path, opts.model, [int(x) for x in opts.layers.split(",")],
                                 opts.modules)
        if opts.save_whitened:
            from safetensors.torch import save_file
            os.makedirs(os.path.dirname(os.path.abspath(opts.save_whitened)), exist_ok=True)
            save_file({k: v.contiguous() for k, v in mats.items()}, opts.save_whitened,
                      metadata={"model": opts.model, "stats_path": opts.stats_path, "layers": opts.layers})
    if opts.whitened_file:
        from safetensors.torch import load_file
        mats.update(load_file(opts.whitened_file))
    for name, a in mats.items():
        s64 = torch.linalg.svdvals(a.double().cpu())  # optimum: exact singular values in float64
        record["whitened"][name] = bench_matrix(
            name, a.to(opts.device), lambda rank, es, s64=s64: float(s64[rank:].square().sum().sqrt()), ratios,
            configs, False, log, routes, opts.exact_driver)
        save()
    # the synthetic shapes after the real matrices: a run cut short by a time limit keeps those
    for shape in filter(None, opts.shapes.split(",")):
        m, n = (int(x) for x in shape.split("x"))
        a, s = synthetic(m, n, opts.alpha, opts.seed, opts.device)
        record["synthetic"][shape] = bench_matrix(
            shape, a, lambda rank, es, s=s: float(s[rank:].square().sum().sqrt()), ratios,
            configs, not opts.no_lowrank, log, routes, opts.exact_driver)
        save()
    record["settings"]["load_avg_end"] = os.getloadavg()
    record["summary"] = summarize(record)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
