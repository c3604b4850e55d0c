"""scripts/plot_results.py on JSON fixtures written here, and a quick sweep end to end."""
from __future__ import annotations

import json
import os

import pytest
import torch

from scripts import plot_results, sweep

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("perplexity.png", "throughput.png", "compression_time.png", "parameters.png")


pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_record(variant: str | None, ratio: float, ppl: float | None, prefill: float | None) -> dict:
    compression = None if variant is None else {
        "base_model": "m", "ratio": ratio, "whitening": "none" if variant == "svd" else "cholesky",
        "decomposition": "svd", "update": "none",
        "parameters": {"original": 1000, "compressed": int(1000 * (1 - ratio))}}
    record = {"results_version": 1, "model": {}, "compression": compression,
              "timings": {"compress_s": 2.0 if variant else 0.0},
              "perplexity": {"wiki": {"ppl": ppl, "non_finite_tokens": 0 if ppl else 7}}}
    if variant:
        record["sweep"] = {"variant": variant, "ratio": ratio, "profile_s": 0.0 if variant == "svd" else 3.0}
    if prefill is not None:
        record["efficiency"] = {"ratios": {"prefill_throughput": prefill, "decode_throughput": prefill / 2}}
    return record


def write_fixtures(directory) -> None:
    os.makedirs(directory / "runs")
    (directory / "original.json").write_text(json.dumps(fixture_record(None, 0.0, 20.0, None)))
    for variant, scale in (("svd", 10.0), ("whiten_svd", 1.0)):
        for ratio in (0.2, 0.4, 0.6):
            ppl = None if (variant, ratio) == ("svd", 0.6) else 20.0 * (1 + scale * ratio)
            record = fixture_record(variant, ratio, ppl, 1.0 + ratio)
            (directory / "runs" / f"{variant}_r{ratio}.json").write_text(json.dumps(record))
    (directory / "runs" / "config.json").write_text("{}")  # not a results file: ignored


def test_load_runs_and_table_from_fixtures(tmp_path):
    write_fixtures(tmp_path)
    rows = plot_results.load_runs([str(tmp_path)])
    assert [(r["variant"], r["ratio"]) for r in rows] == [("original", 0.0)] + [
        (v, r) for v in ("svd", "whiten_svd") for r in (0.2, 0.4, 0.6)]
    row = rows[5]  # whiten_svd at 0.4
    assert row["params_retained"] == pytest.approx(0.6) and row["ppl"]["wiki"] == pytest.approx(28.0)
    assert row["profile_s"] == 3.0 and row["prefill_ratio"] == pytest.approx(1.4)
    table = plot_results.markdown_table(rows)
    assert "| whiten_svd | 0.40 | 0.600 | 28.00 (1.40x) | 3.0 | 2.0 | 1.400 | 0.700 |" in table
    assert "| svd | 0.60 | 0.400 | not finite |" in table
    assert len(table.strip().splitlines()) == 2 + 7


def test_plots_from_fixtures(tmp_path):
    write_fixtures(tmp_path)
    out = tmp_path / "plots"
    assert plot_results.main([str(tmp_path), "--out", str(out)]) == 0
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert plot_results.main([str(tmp_path / "runs" / "config.json")]) == 2  # no results in it


def test_variant_derived_without_sweep_block():
    record = fixture_record("whiten_svd", 0.2, 10.0, None)
    del record["sweep"]
    assert plot_results.variant_of(record) == "whiten_svd"
    record["compression"].update(decomposition="rsvd", update="closed_form")
    assert plot_results.variant_of(record) == "whiten_rsvd_update"
    assert plot_results.variant_of({"compression": None}) == "original"


def test_quick_sweep_writes_runs_table_and_plots(tmp_path):
    out = tmp_path / "sweep"
    assert sweep.main(["--quick", "--out", str(out), "--ratios", "0.3,0.6", "--variants", "svd,whiten_svd",
                       "--device", "cpu"]) == 0
    runs = sorted(os.listdir(out / "runs"))
    assert runs == ["svd_r0.3.json", "svd_r0.6.json", "whiten_svd_r0.3.json", "whiten_svd_r0.6.json"]
    record = json.loads((out / "runs" / "whiten_svd_r0.6.json").read_text())
    assert record["sweep"]["variant"] == "whiten_svd" and record["sweep"]["profile_s"] > 0
    assert record["compression"]["ratio"] == 0.6 and record["compression"]["whitening"] == "cholesky"
    assert record["perplexity"]["pydoc"]["windows"] == 4 and record["perplexity"]["pydoc"]["ppl"] > 1
    assert not (out / "models" / "whiten_svd_r0.6").exists()  # deleted without --keep_models
    assert not (out / "stats").exists()
    table = (out / "table.md").read_text()
    assert table.count("\n| svd |") == 2 and table.count("\n| whiten_svd |") == 2 and "\n| original |" in table
    assert plot_results.main([str(out), "--out", str(out / "plots")]) == 0
    assert (out / "plots" / "perplexity.png").read_bytes().startswith(PNG)
    assert sweep.main(["--quick", "--out", str(out), "--variants", "nope"]) == 2
