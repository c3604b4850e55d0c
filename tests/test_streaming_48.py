"""Steps 4 and 8 on a streamed model (issue 33): a compressed directory's decoder layers read one at
a time (utils.io.load_compressed(stream=True)), perplexity by a layer walk, step 8 written layer by
layer. On an 8-layer tiny Llama saved sharded: never more than two real decoder layers in memory,
and the same figures and tensors as the whole-model path, bit for bit.
"""
import json
import os

import pytest
import torch

import compress
import evaluater
import pipeline.session
from tests.test_streaming import assert_same_model_tensors, assert_same_tensors, common, killed_run
from tests.tiny_models import count_real_layers_at_load, save_deep_llama
from utils.data import load_text, tokenize
from utils.io import CompressedModelError, load_compressed
from utils.model import decoder_layers, layer_stream, load_all_layers, load_model

LAYERS = 8
EVAL = ["--eval_datasets", "pydoc", "--model_seq_len", "32", "--eval_limit", "3", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py's


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """An 8-layer tiny Llama (tied embeddings) with a byte-level tokenizer, saved in shards of about one layer."""
    path = save_deep_llama(str(tmp_path_factory.mktemp("deep48") / "llama8"), LAYERS, tokenizer=True)
    return path


@pytest.fixture(scope="module")
def compressed_dir(deep_dir, tmp_path_factory):
    """Steps 1 and 3 on it (streamed): a sharded compressed directory."""
    out = str(tmp_path_factory.mktemp("c48") / "out3")
    assert compress.main(["--step", "1,3", *common(deep_dir, out)]) == 0
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    return out


@pytest.fixture
def counted(monkeypatch):
    """The number of real (not meta) decoder layers each time LayerStream.load reads one."""
    return count_real_layers_at_load(monkeypatch)


def whole_model_path(monkeypatch):
    """Steps run from here on load their model whole (today's path)."""
    monkeypatch.setattr(pipeline.session, "streams_layers", lambda *args, **kwargs: False)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_streamed_compressed_load_is_the_whole_load(compressed_dir, dtype):
    whole, _, _ = load_compressed(compressed_dir, dtype, fuse=True)
    streamed, tokenizer, compression = load_compressed(compressed_dir, dtype, fuse=True, stream=True)
    assert tokenizer is not None and compression["ranks"]
    assert layer_stream(streamed) is not None
    assert all(t.is_meta for t in decoder_layers(streamed).parameters())
    assert not any(t.is_meta for name, t in streamed.named_parameters() if ".layers." not in name)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    load_all_layers(streamed)
    assert_same_model_tensors(streamed, whole)
    # fused when read, as the whole load fuses (q/k/v and gate/up of every layer): the same logits bit for bit
    fused = {name for name, m in whole.named_modules() if getattr(m, "shared_input", None) is not None}
    assert len(fused) == 5 * LAYERS
    assert fused == {name for name, m in streamed.named_modules() if getattr(m, "shared_input", None) is not None}
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, whole(ids).logits)


def test_a_damaged_layer_is_refused_when_read(deep_dir, tmp_path):
    """The whole load's checks run on each streamed layer as it is read: column indices that do not
    cover the input channels (a damaged file) are refused naming the module."""
    from safetensors.torch import load_file, save_file
    out = str(tmp_path / "columns")
    assert compress.main(["--step", "1,3", *common(deep_dir, out, "--column_preserve")]) == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    name = next(n for n in index if n.startswith("model.layers.5.") and n.endswith(".col_idx"))
    shard = os.path.join(out, index[name])
    tensors = load_file(shard)
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    model, _, _ = load_compressed(out, stream=True)
    stream = layer_stream(model)
    stream.load(model, 4)  # an intact layer reads
    with pytest.raises(CompressedModelError, match=r"model\.layers\.5\..*svd_idx and col_idx"):
        stream.load(model, 5)
    with pytest.raises(CompressedModelError, match="svd_idx and col_idx"):
        load_compressed(out)


def test_layerwise_perplexity_is_perplexity(deep_dir):
    """The layer walk's perplexity against the whole model's on the same model in memory: the same
    figures bit for bit at batch 1; at batch 2 (the whole model batches its windows) within 1e-6."""
    model, tokenizer = load_model(deep_dir)
    ids = tokenize(tokenizer, load_text("pydoc", "test"))
    whole = evaluater.perplexity(model, ids, 32, 1, "cpu", 5)
    walked = evaluater.layerwise_perplexity(model, ids, 32, 1, "cpu", 5)
    assert walked == whole
    batched = evaluater.perplexity(model, ids, 32, 2, "cpu", 5)
    walked = evaluater.layerwise_perplexity(model, ids, 32, 2, "cpu", 5)
    assert walked["mean_nll"] == pytest.approx(batched["mean_nll"], rel=1e-6)
    assert walked["tokens"] == batched["tokens"] == 5 * 31 and walked["batch_size"] == 2


def test_streamed_perplexity_keeps_no_fused_copy(deep_dir, compressed_dir):
    """A fused layer run in the walk concatenates its v factors from the walk's tensors; that copy
    must go with the layer (it held a layer's v factors per layer: host memory grew with the depth,
    and on a GPU it would stay on the device), and the figures are the whole fused model's."""
    model, tokenizer, _ = load_compressed(compressed_dir, fuse=True, stream=True)
    ids = tokenize(tokenizer, load_text("pydoc", "test"))
    walked = evaluater.layerwise_perplexity(model, ids, 32, 1, "cpu", 3)
    groups = [m.shared_input for m in model.modules() if getattr(m, "shared_input", None) is not None]
    assert len(groups) == 5 * LAYERS and all(group.fused is None for group in groups)
    whole, _, _ = load_compressed(compressed_dir, fuse=True)
    assert walked == evaluater.perplexity(whole, ids, 32, 1, "cpu", 3)


@pytest.mark.parametrize("original", [False, True])
def test_step4_streamed_holds_at_most_two_layers(deep_dir, compressed_dir, tmp_path, counted, monkeypatch, original):
    """Step 4 on the compressed directory (--model_path) or the original checkpoint (--model) reads
    every layer once, never two at a time beyond the one being read, and writes the figures the
    whole-model path writes."""
    target = ["--model", deep_dir] if original else ["--model", deep_dir, "--model_path", compressed_dir]
    streamed = str(tmp_path / "streamed.json")
    assert compress.main(["--step", "4", *target, *EVAL, "--results", streamed]) == 0
    assert len(counted) == LAYERS and max(counted) <= 2
    whole_model_path(monkeypatch)
    whole = str(tmp_path / "whole.json")
    assert compress.main(["--step", "4", *target, *EVAL, "--results", whole]) == 0
    assert len(counted) == LAYERS  # the whole path reads no layer through the stream
    mine, theirs = (json.load(open(p))["perplexity"]["pydoc"] for p in (streamed, whole))
    assert mine["ppl"] is not None and mine["windows"] == 3
    for key in ("ppl", "mean_nll", "tokens", "windows", "non_finite_tokens"):
        assert mine[key] == theirs[key], key


def test_step4_with_eval_chat_or_device_map_loads_whole():
    assert pipeline.session.streams_layers([4], None, "random")
    assert pipeline.session.streams_layers([1, 8], "out", "random")
    assert not pipeline.session.streams_layers([4], None, "random", whole_model=True)
    assert not pipeline.session.streams_layers([3, 4], "out", "random")  # step 3's model in memory
    assert not pipeline.session.streams_layers([8], "out.pt", "random")
    assert not pipeline.session.streams_layers([5], None, "random")


@pytest.mark.parametrize("quant", [["--nsamples", "4", "--wbits", "4", "--groupsize", "32"],
                                   ["--quant", "rtn", "--wbits", "8", "--groupsize", "-1", "--save_dtype", "float16"]],
                         ids=["gptq", "rtn_float16"])
def test_step8_streamed_writes_the_whole_path_model(deep_dir, compressed_dir, tmp_path, counted, monkeypatch, quant):
    """Step 8 on the streamed compressed directory: each layer read once and written when done,
    never more than two real layers, and the same tensors bit for bit and the same quantization
    records as the whole-model step 8 (one model.safetensors); the output loads and runs."""
    argv = ["--step", "8", "--model", deep_dir, "--model_path", compressed_dir, "--dataset", "random",
            "--model_seq_len", "16", "--device", "cpu", *quant]
    streamed = str(tmp_path / "streamed")
    assert compress.main([*argv, "--save_path", streamed]) == 0
    assert max(counted) <= 2 and len(counted) >= LAYERS  # (+ the fingerprint's reads, which are not loads)
    index = json.load(open(os.path.join(streamed, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) == LAYERS + 1
    whole_model_path(monkeypatch)
    whole = str(tmp_path / "whole")
    assert compress.main([*argv, "--save_path", whole]) == 0
    assert os.path.isfile(os.path.join(whole, "model.safetensors"))
    assert_same_tensors(streamed, whole)
    mine, theirs = (json.load(open(os.path.join(p, "config.json")))["compression"] for p in (streamed, whole))
    assert mine["quantization"]["modules"] == theirs["quantization"]["modules"]
    drop = lambda block: {k: v for k, v in block.items() if k != "quantization"}  # noqa: E731
    assert drop(mine) == drop(theirs)
    assert {k: v for k, v in mine["quantization"].items() if k != "modules"} == \
        {k: v for k, v in theirs["quantization"].items() if k != "modules"}
    loaded, _, _ = load_compressed(streamed)
    reference, _, _ = load_compressed(whole)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("quant", [["--nsamples", "4", "--wbits", "4", "--groupsize", "32"],
                                   ["--quant", "rtn", "--wbits", "4", "--groupsize", "32"]], ids=["gptq", "rtn"])
def test_killed_step8_resumes_bit_identically(deep_dir, compressed_dir, tmp_path, capsys, quant):
    """A streamed step 8 killed after 3 layers, run again: the done layers are taken from its shards
    (with GPTQ the activations run through them) and the model is the uninterrupted one bit for bit."""
    argv = ["--step", "8", "--model", deep_dir, "--model_path", compressed_dir, "--dataset", "random",
            "--model_seq_len", "16", "--device", "cpu", *quant]
    out = str(tmp_path / "out")
    killed_run([*argv, "--save_path", out], kill_after=2)
    assert [n for n in os.listdir(tmp_path) if n.startswith("out.partial-")] and not os.path.exists(out)
    capsys.readouterr()
    assert compress.main([*argv, "--save_path", out]) == 0
    assert "resuming: 3 of 8 layers" in capsys.readouterr().out
    reference = str(tmp_path / "ref")
    assert compress.main([*argv, "--save_path", reference]) == 0
    assert_same_tensors(out, reference)
    blocks = [json.load(open(os.path.join(p, "config.json")))["compression"]["quantization"] for p in (out, reference)]
    assert blocks[0]["modules"] == blocks[1]["modules"] and len(blocks[0]["modules"]) == 14 * LAYERS
