"""Step 2 on a model streamed from disk: v2's spectra, duo's KL sensitivities, asvd's perplexity
sensitivities and --ppl_target search (and its stable ranks) read each decoder layer when their walk
reaches it.

The 8-layer sharded tiny Llama of tests/test_streaming.py: step 2 must never hold more than two of
its decoder layers in memory (counted at every read of a layer, of the checkpoint or of duo's
spilled base state), and its plan (and sensitivity table) must be the whole-model run's.
"""
import json
import os

import pytest
import torch

import compress
import methods.sensitivity as sensitivity
import pipeline.session
from tests.test_streaming import LAYERS, common, deep_dir  # noqa: F401  (the fixture)
from utils.model import LayerStream, decoder_layers

ALLOCATIONS = {
    "v2": ["--allocation", "v2"],
    "duo": ["--allocation", "duo", "--sensitivity_nsamples", "2", "--sensitivity_ratios", "0.4,0.8"],
    "asvd_ppl": ["--allocation", "asvd", "--ppl_target", "1e9", "--sensitivity_nsamples", "2",
                 "--sensitivity_ratios", "0.4,0.8"],
    "asvd_stable_rank": ["--allocation", "asvd", "--sensitivity_metric", "stable_rank"],
}


def real_layers(layers) -> int:
    return sum(not any(p.is_meta for p in layer.parameters()) for layer in layers)


def count_real_layers_at_read(monkeypatch) -> tuple[list[int], dict[int, object]]:
    """(a list that gets, at every LayerStream.load, how many decoder layers read so far hold real
    tensors; those layers by id). Every layer read is tracked, not only the model's list: the
    sensitivity walks swap layers in and out of it."""
    real_at_read: list[int] = []
    layers: dict[int, object] = {}
    original_load = LayerStream.load

    def counting_load(self, model, index, layer=None):
        original_load(self, model, index, layer)
        layers.update({id(x): x for x in decoder_layers(model) if any(True for _ in x.parameters())})
        if layer is not None:
            layers[id(layer)] = layer
        real_at_read.append(real_layers(layers.values()))

    monkeypatch.setattr(LayerStream, "load", counting_load)
    return real_at_read, layers


@pytest.fixture(scope="module")
def statistics(deep_dir, tmp_path_factory):  # noqa: F811
    """Step 1 once for every allocation: the save path whose .stats folder holds them."""
    out = str(tmp_path_factory.mktemp("stats") / "out")
    assert compress.main(["--step", "1", *common(deep_dir, out)]) == 0
    return out


@pytest.mark.parametrize("allocation", sorted(ALLOCATIONS))
def test_step2_streams_at_most_two_layers_and_plans_as_the_whole_model(deep_dir, statistics, tmp_path,  # noqa: F811
                                                                      monkeypatch, allocation):
    real_at_read, layers = count_real_layers_at_read(monkeypatch)
    spilled_to: set[str] = set()  # where duo's base state waited
    original_spill_load = sensitivity._BaseStateSpill.load

    def counting_spill_load(self, layer, index):
        spilled_to.add(os.path.dirname(self.directory))
        undo = original_spill_load(self, layer, index)
        real_at_read.append(real_layers(layers.values()))
        return undo

    monkeypatch.setattr(sensitivity._BaseStateSpill, "load", counting_spill_load)

    def step2(name: str) -> dict:
        plan = str(tmp_path / f"plan_{name}.json")
        args = ["--step", "2", *common(deep_dir, statistics), "--plan", plan, *ALLOCATIONS[allocation]]
        if allocation != "v2":
            args += ["--sensitivity_path", str(tmp_path / f"table_{name}.json")]
        assert compress.main(args) == 0
        return json.load(open(plan))

    streamed = step2("streamed")
    # duo's base state waited beside its table (not in memory), and is removed
    assert spilled_to == ({str(tmp_path)} if allocation == "duo" else set())
    assert not any(p.name.startswith("sensitivity-base-state-") for p in tmp_path.iterdir())
    # every layer read at least once (the sensitivity walks read the later layers again), never three at once
    assert len(real_at_read) >= LAYERS
    assert max(real_at_read) <= 2
    monkeypatch.setattr(pipeline.session, "streams_layers", lambda *a, **k: False)
    real_at_read.clear()
    whole = step2("whole")
    assert real_at_read == []  # the whole model: nothing read from the stream
    assert streamed["modules"] == whole["modules"]
    assert streamed["detail"]["groups"] == whole["detail"]["groups"]
    if allocation != "v2":
        tables = [json.load(open(tmp_path / f"table_{name}.json")) for name in ("streamed", "whole")]
        assert tables[0]["values"] == tables[1]["values"] and tables[0]["sigmas"] == tables[1]["sigmas"]
        assert tables[0]["base_value"] == tables[1]["base_value"]
    if allocation == "asvd_ppl":
        assert streamed["detail"]["evaluations"] == whole["detail"]["evaluations"]


def test_streams_layers_for_step2():
    from utils.data import SELF_DATASET
    streams = pipeline.session.streams_layers
    assert streams([1, 2], "out", "wikitext2", allocation="v2") and streams([2], None, "wikitext2", allocation="duo")
    assert streams([2], "out", "wikitext2", allocation="asvd") and streams([2], "out", "wikitext2", allocation="uniform")
    assert streams([1, 3], "out", "wikitext2", allocation="v2")
    assert not streams([2], "out", "wikitext2", allocation=None)
    assert not streams([2], "out", "wikitext2", allocation="mine")  # a registered one may read the whole model
    assert streams([1, 2, 3], "out", "wikitext2", allocation="v2")  # step 3's output is read back streamed
    assert not streams([1, 2, 3, 4], "out", "wikitext2", allocation="v2")  # step 4 measures the model in memory
    assert not streams([2, 3], None, "wikitext2", allocation="v2") and not streams([2, 3], "o.pt", "wikitext2", allocation="v2")
    assert not streams([1, 2], "out", SELF_DATASET, allocation="v2")  # generation needs the whole model


def test_step2_and_3_chained_stream_and_write_what_the_whole_chain_writes(deep_dir, statistics, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    """--step 2,3 with asvd's --ppl_target search: at most two real layers at any read, the same
    tensors as the whole model's chain, and the search's target measured on the written output
    (recorded in its compression block) with the figure the whole chain measures in memory."""
    from tests.test_streaming import all_tensors
    from utils.io import load_compressed
    real_at_read, _ = count_real_layers_at_read(monkeypatch)
    stats = statistics + ".stats"

    def chain(name: str) -> dict:
        out = str(tmp_path / name)
        args = ["--step", "2,3", *common(deep_dir, out), "--stats_path", stats, "--plan", str(tmp_path / f"plan_{name}.json"),
                "--sensitivity_path", str(tmp_path / f"table_{name}.json"), *ALLOCATIONS["asvd_ppl"]]
        assert compress.main(args) == 0
        return load_compressed(out)[2]

    streamed = chain("streamed")
    assert len(real_at_read) >= 2 * LAYERS and max(real_at_read) <= 2  # step 2's walks, step 3's, the check's
    monkeypatch.setattr(pipeline.session, "streams_layers", lambda *a, **k: False)
    real_at_read.clear()
    whole = chain("whole")
    assert real_at_read == []
    a, b = all_tensors(str(tmp_path / "streamed")), all_tensors(str(tmp_path / "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    measured = streamed["ppl_target"]["final_calibration_ppl"]
    assert measured is not None and "not_measured" not in streamed["ppl_target"]
    assert measured == pytest.approx(whole["ppl_target"]["final_calibration_ppl"], rel=1e-5)
