"""Issue 33: step 1's Fisher backward on a model streamed from disk (utils.model.LayerStream).

The 8-layer sharded tiny Llama of tests/test_streaming.py: the streamed backward must give the
whole-model pass's fisher vectors bit for bit, and `--step 1 --fisher` must stream the model and
never hold more than two of its decoder layers on the host.
"""
import torch

import compress
from tests.test_streaming import LAYERS, common, deep_dir  # noqa: F401  (deep_dir: the fixture)
from utils.data import calibration_windows
from utils.fisher import fisher_information
from utils.model import LayerStream, decoder_layers, layer_stream, load_model


def real_layers(model) -> int:
    return sum(not any(p.is_meta for p in layer.parameters()) for layer in decoder_layers(model))


def test_streamed_fisher_is_the_whole_model_fisher(deep_dir, one_thread):  # noqa: F811
    whole, _ = load_model(deep_dir)
    streamed, _ = load_model(deep_dir, stream=True)
    assert layer_stream(streamed) is not None
    windows = calibration_windows("random", None, 3, 16, 0, vocab_size=whole.config.vocab_size)
    expected, expected_summary = fisher_information(whole, windows, "cpu")
    fisher, summary = fisher_information(streamed, windows, "cpu")
    assert list(fisher) == list(expected) and len(fisher) == 7 * LAYERS
    for name, value in expected.items():
        assert fisher[name].dtype == value.dtype and torch.equal(fisher[name], value), name
    assert summary == expected_summary
    assert real_layers(streamed) == 0  # every layer back on the meta device


def test_step1_fisher_streams_and_holds_at_most_two_layers(deep_dir, tmp_path, monkeypatch):  # noqa: F811
    real_at_load: list[int] = []
    original_load = LayerStream.load

    def counting_load(self, model, index):
        original_load(self, model, index)
        real_at_load.append(real_layers(model))

    monkeypatch.setattr(LayerStream, "load", counting_load)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "1", "--fisher", *common(deep_dir, out)]) == 0
    # every layer read by the profile walk, the fisher forward walk and the fisher backward, and
    # layer 0 once more by the cost estimate (its timed window)
    assert len(real_at_load) == 3 * LAYERS + 1
    assert max(real_at_load) <= 2
