"""Plots and a markdown table from the results JSON of steps 4-6 (one file per run).

    python scripts/plot_results.py scripts/results/sweep_smollm2 --out scripts/results/sweep_smollm2/plots

Reads every *.json under the given files/folders that steps 4-5 wrote (they carry
"results_version"), and draws: perplexity vs ratio per variant (log scale, the original as a
dashed line), throughput ratio compressed/original vs ratio, compression time per variant, the
fraction of parameters retained vs ratio, and (where step 6 ran) the mean task accuracy vs ratio.
One PNG per plot.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

VARIANT_ORDER = ("svd", "whiten_svd", "whiten_rsvd", "whiten_svd_update", "whiten_rsvd_update", "eigen_svd")


def variant_of(record: dict) -> str:
    """The sweep's variant name, else one derived from the compression block ('original' if none)."""
    if record.get("sweep", {}).get("variant"):
        return record["sweep"]["variant"]
    compression = record.get("compression")
    if compression is None:
        return "original"
    whitening = compression.get("whitening", "none")
    name = "svd" if whitening == "none" else ("whiten" if whitening == "cholesky" else whitening)
    if whitening != "none":
        name += "_" + compression.get("decomposition", "svd")
    if compression.get("update", "none") != "none":
        name += "_update"
    return name


MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json", "meta.json")


def result_files(paths: list[str]) -> list[str]:
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += [f for f in sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
                      if os.path.basename(f) not in MODEL_FILES and not os.path.basename(f).startswith("ranks_")]
        else:
            files.append(path)
    return files


def load_runs(paths: list[str]) -> list[dict]:
    """One flat row per results file: variant, ratio, parameters, perplexities, times, speed ratios."""
    rows = []
    for file in result_files(paths):
        with open(file, encoding="utf-8") as handle:
            try:
                record = json.load(handle)
            except ValueError:
                continue
        if not isinstance(record, dict) or "results_version" not in record:
            continue
        compression = record.get("compression") or {}
        params = compression.get("parameters", {})
        timings = record.get("timings", {})
        efficiency = record.get("efficiency", {})
        profile_s = record.get("sweep", {}).get("profile_s", timings.get("profile_s", 0.0))
        rows.append({
            "file": file, "variant": variant_of(record),
            "ratio": compression.get("ratio", 0.0),
            "params_retained": (params["compressed"] / params["original"]) if params else 1.0,
            "ppl": {name: r.get("ppl") for name, r in record.get("perplexity", {}).items()},
            "non_finite": {name: r.get("non_finite_tokens", 0) for name, r in record.get("perplexity", {}).items()},
            "compress_s": timings.get("compress_s"), "profile_s": profile_s,
            "prefill_ratio": efficiency.get("ratios", {}).get("prefill_throughput"),
            "decode_ratio": efficiency.get("ratios", {}).get("decode_throughput"),
            # step 6: the mean over tasks of acc, and acc per task
            "acc_mean": record.get("tasks", {}).get("mean", {}).get("acc"),
            "acc": {name: r.get("acc") for name, r in record.get("tasks", {}).get("results", {}).items()},
        })
    order = {name: i for i, name in enumerate(("original",) + VARIANT_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["ratio"]))


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """Variant, ratio, parameters retained, perplexity per dataset, times and speed ratios."""
    datasets = sorted({name for row in rows for name in row["ppl"]})
    baseline = {name: next((r["ppl"].get(name) for r in rows if r["variant"] == "original"), None)
                for name in datasets}
    with_tasks = any(row.get("acc_mean") is not None for row in rows)
    header = (["variant", "ratio", "params kept"] + [f"ppl {os.path.basename(d)}" for d in datasets]
              + ["profile s", "compress s", "prefill x", "decode x"] + (["mean acc"] if with_tasks else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], _fmt(row["ratio"]), _fmt(row["params_retained"], 3)]
        for name in datasets:
            ppl = row["ppl"].get(name)
            cell = "not finite" if ppl is None and name in row["ppl"] else _fmt(ppl)
            if ppl is not None and baseline[name] and row["variant"] != "original":
                cell += f" ({ppl / baseline[name]:.2f}x)"
            cells.append(cell)
        cells += [_fmt(row["profile_s"], 1), _fmt(row["compress_s"], 1),
                  _fmt(row["prefill_ratio"], 3), _fmt(row["decode_ratio"], 3)]
        if with_tasks:
            cells.append(_fmt(row.get("acc_mean"), 4))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _by_variant(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["variant"] != "original":
            groups.setdefault(row["variant"], []).append(row)
    return groups


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """Write the PNGs into out_dir; return their paths (plots without data are skipped)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    groups = _by_variant(rows)
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    datasets = sorted({name for row in rows for name in row["ppl"]})
    if datasets:
        fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
        for ax, name in zip(axes[0], datasets):
            for variant, group in groups.items():
                points = [(r["ratio"], r["ppl"][name]) for r in group if r["ppl"].get(name) is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=variant)
            base = next((r["ppl"].get(name) for r in rows if r["variant"] == "original"), None)
            if base is not None:
                ax.axhline(base, color="gray", linestyle="--", label="original")
            ax.set_yscale("log")
            ax.set(xlabel="ratio (fraction of parameters removed)", ylabel="perplexity",
                   title=f"perplexity: {os.path.basename(name)}")
            ax.legend(fontsize=8)
        save(fig, "perplexity.png")
    if any(r["prefill_ratio"] is not None for r in rows):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for variant, group in groups.items():
            for key, style in (("prefill_ratio", "-"), ("decode_ratio", ":")):
                points = [(r["ratio"], r[key]) for r in group if r[key] is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", label=f"{variant} {key.split('_')[0]}")
        ax.axhline(1.0, color="gray", linestyle="--")
        ax.set(xlabel="ratio", ylabel="throughput compressed / original", title="speed ratio")
        ax.legend(fontsize=7)
        save(fig, "throughput.png")
    if groups:
        fig, ax = plt.subplots(figsize=(6, 4))
        ratios = sorted({r["ratio"] for g in groups.values() for r in g})
        width = 0.8 / max(1, len(ratios))
        for i, ratio in enumerate(ratios):
            values = [next(((r["profile_s"] or 0) + (r["compress_s"] or 0) for r in g if r["ratio"] == ratio), 0)
                      for g in groups.values()]
            ax.bar([k + i * width for k in range(len(groups))], values, width, label=f"ratio {ratio:g}")
        ax.set_xticks([k + width * (len(ratios) - 1) / 2 for k in range(len(groups))], list(groups), fontsize=8)
        ax.set(ylabel="seconds (statistics + compression)", title="compression time per variant")
        ax.legend(fontsize=8)
        save(fig, "compression_time.png")
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for variant, group in groups.items():
            ax.plot([r["ratio"] for r in group], [r["params_retained"] for r in group], marker="o", label=variant)
        xs = sorted({r["ratio"] for g in groups.values() for r in g})
        ax.plot(xs, [1 - x for x in xs], color="gray", linestyle="--", label="1 - ratio")
        ax.set(xlabel="ratio", ylabel="parameters retained (whole model)", title="parameters retained")
        ax.legend(fontsize=8)
        save(fig, "parameters.png")
    if any(r.get("acc_mean") is not None for r in rows):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for variant, group in groups.items():
            points = [(r["ratio"], r["acc_mean"]) for r in group if r.get("acc_mean") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=variant)
        base = next((r["acc_mean"] for r in rows if r["variant"] == "original" and r.get("acc_mean") is not None), None)
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", label="original")
        ax.set(xlabel="ratio (fraction of parameters removed)", ylabel="mean accuracy over tasks",
               title="downstream tasks (step 6)")
        ax.legend(fontsize=8)
        save(fig, "accuracy.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="results JSON files or folders holding them")
    parser.add_argument("--out", default=None, help="folder for the PNGs and table.md (default: the first folder)")
    args = parser.parse_args(argv)
    rows = load_runs(args.paths)
    if not rows:
        print(f"error: no results JSON (from steps 4-6) under {', '.join(args.paths)}", file=sys.stderr)
        return 2
    out = args.out or (args.paths[0] if os.path.isdir(args.paths[0]) else os.path.dirname(args.paths[0]) or ".")
    for path in plot(rows, out):
        print(f"wrote {path}")
    print(markdown_table(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
