"""Weights streamed from disk, step 3's output written layer by layer, and resuming a killed run.

An 8-layer tiny Llama saved as a sharded safetensors checkpoint: steps 1 and 3 must never hold
more than two of its decoder layers in memory, the sharded output must load to the logits of
the in-memory path, and a run killed after some layers, rerun, must give the bit-identical model.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import compress
from tests.tiny_models import count_real_layers_at_load, save_deep_llama
from utils.io import load_compressed
from utils.model import decoder_layers, layer_stream, load_all_layers, load_model

LAYERS = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """An 8-layer tiny Llama (tied embeddings), saved in shards of about one layer."""
    path = save_deep_llama(str(tmp_path_factory.mktemp("deep") / "llama8"), LAYERS)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    return path


def common(model: str, out: str, *extra: str) -> list[str]:
    return ["--model", model, "--dataset", "random", "--whitening_nsamples", "4", "--model_seq_len", "16",
            "--ratio", "0.4", "--device", "cpu", "--save_path", out, *extra]


def all_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    if "lm_head.weight" in tensors and "model.embed_tokens.weight" not in tensors:
        # the tied pair is stored once: safetensors' save_model keeps the head's name, the shards the embedding's
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    return tensors


def assert_same_tensors(a: str, b: str) -> None:
    first, second = all_tensors(a), all_tensors(b)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_streamed_model_is_the_loaded_model(deep_dir, dtype):
    whole, _ = load_model(deep_dir, dtype)
    streamed, _ = load_model(deep_dir, dtype, stream=True)
    assert layer_stream(streamed) is not None
    assert all(p.is_meta for p in decoder_layers(streamed).parameters())  # nothing of the layers read yet
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    load_all_layers(streamed)
    assert_same_model_tensors(streamed, whole)


def assert_same_model_tensors(mine_model, their_model) -> None:
    """The same parameters and buffers, by name, dtype and value."""
    mine = {**dict(mine_model.named_parameters()), **dict(mine_model.named_buffers())}
    theirs = {**dict(their_model.named_parameters()), **dict(their_model.named_buffers())}
    assert sorted(mine) == sorted(theirs)
    for name, tensor in theirs.items():
        assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), name


def test_steps_1_and_3_hold_at_most_two_layers(deep_dir, tmp_path, monkeypatch):
    real_at_load = count_real_layers_at_load(monkeypatch)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "1,3", *common(deep_dir, out)]) == 0
    # every layer read from disk once by each step, and layer 0 once more by step 1's cost estimate (its timed window)
    assert len(real_at_load) == 2 * LAYERS + 1
    assert max(real_at_load) <= 2
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) == LAYERS + 1
    assert not os.path.exists(os.path.join(out, "progress.json"))


@pytest.mark.parametrize("extra, released", [([], True), (["--update", "closed_form", "--updating_nsamples", "4"], False)])
def test_step3_lets_the_embeddings_go_while_nothing_runs_through_them(deep_dir, tmp_path, monkeypatch, extra, released):
    """A walk with no activations (whitening alone) holds no embedding or head while it decomposes
    (the writer reads them again, and its output has them: test_sharded_output_is_the_in_memory_result);
    an update that runs windows through the model keeps them."""
    from utils.model import LayerStream
    embedding_at_load: list[bool] = []
    original_load = LayerStream.load

    def probing_load(self, model, index, *args, **kwargs):
        original_load(self, model, index, *args, **kwargs)
        embedding_at_load.append(model.get_input_embeddings().weight.is_meta)

    monkeypatch.setattr(LayerStream, "load", probing_load)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "1", *common(deep_dir, out)]) == 0
    assert embedding_at_load and not any(embedding_at_load)  # step 1 runs the windows through them
    embedding_at_load.clear()
    assert compress.main(["--step", "3", *common(deep_dir, out, *extra)]) == 0
    assert len(embedding_at_load) >= LAYERS and set(embedding_at_load) == {released}
    tensors = all_tensors(out)
    reference = all_tensors(deep_dir)
    assert torch.equal(tensors["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])


def test_sharded_output_is_the_in_memory_result(deep_dir, tmp_path):
    """Streamed steps 1,3 (sharded output) against the same steps on the whole model in memory
    (api calls, unsharded model.safetensors): the same tensors bit for bit, the same logits."""
    from utils.io import save_compressed
    from pipeline.steps import CompressOptions, compress_model, compression_block, profile_model
    from utils.plan import Plan
    from utils.data import calibration_windows
    from utils.model import target_shapes
    from methods import DecomposeOptions
    out = str(tmp_path / "streamed")
    assert compress.main(["--step", "1,3", *common(deep_dir, out)]) == 0
    model, tokenizer = load_model(deep_dir)
    windows = calibration_windows("random", None, 4, 16, 0, vocab_size=model.config.vocab_size)
    stats = profile_model(model, windows, "cpu")
    record = compress_model(model, Plan.uniform(target_shapes(model), 0.4), CompressOptions(DecomposeOptions()), "cpu", stats)
    whole = str(tmp_path / "whole")
    save_compressed(model, tokenizer, whole, compression_block(record, deep_dir, model, stats))
    assert os.path.isfile(os.path.join(whole, "model.safetensors"))
    assert_same_tensors(out, whole)
    loaded, _, _ = load_compressed(out)
    reference, _, _ = load_compressed(whole)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


KILLER = """
import os, sys
sys.path.insert(0, {repo!r})
import compress
from utils.io import ShardedModelWriter
write = ShardedModelWriter.write_layer
def write_then_die(self, index, *args, **kwargs):
    write(self, index, *args, **kwargs)
    if index == {kill_after}:
        os._exit(9)  # a kill: no cleanup runs
ShardedModelWriter.write_layer = write_then_die
sys.exit(compress.main({argv!r}))
"""


@pytest.fixture(autouse=True)
def one_thread():
    """The killed runs use one thread (OMP_NUM_THREADS=1): the in-process runs they are compared with
    bit for bit must too, since a sum split over other threads rounds differently."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def killed_run(argv: list[str], kill_after: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER.format(repo=REPO, kill_after=kill_after, argv=argv)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 9, done.stderr[-2000:]


@pytest.mark.parametrize("variant", [
    ["--decomposition", "rsvd", "--rsvd_oversamples", "4"],  # its random stream goes on from where the killed run left it
    ["--update", "closed_form", "--updating_nsamples", "4"],  # activations recomputed from the written layers
])
def test_killed_step3_resumes_bit_identically(deep_dir, tmp_path, capsys, variant):
    stats = str(tmp_path / "stats")
    assert compress.main(["--step", "1", *common(deep_dir, str(tmp_path / "unused"), "--stats_path", stats)]) == 0
    step3 = ["--step", "3", *common(deep_dir, str(tmp_path / "out"), "--stats_path", stats, *variant)]
    killed_run(step3, kill_after=2)
    partials = [n for n in os.listdir(tmp_path) if n.startswith("out.partial-")]
    assert len(partials) == 1 and not os.path.exists(tmp_path / "out")
    progress = json.load(open(tmp_path / partials[0] / "progress.json"))
    assert progress["layers_done"] == 3
    capsys.readouterr()
    assert compress.main(step3) == 0
    assert "resuming: 3 of 8 layers" in capsys.readouterr().out
    uninterrupted = ["--step", "3", *common(deep_dir, str(tmp_path / "ref"), "--stats_path", stats, *variant)]
    assert compress.main(uninterrupted) == 0
    assert_same_tensors(str(tmp_path / "out"), str(tmp_path / "ref"))
    blocks = [json.load(open(tmp_path / d / "config.json"))["compression"] for d in ("out", "ref")]
    for block in blocks:
        block.pop("seconds", None)
    assert blocks[0]["modules"] == blocks[1]["modules"]
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_resume_with_other_arguments_is_refused_or_overwritten(deep_dir, tmp_path, capsys):
    stats = str(tmp_path / "stats")
    assert compress.main(["--step", "1", *common(deep_dir, str(tmp_path / "unused"), "--stats_path", stats)]) == 0
    out = str(tmp_path / "out")
    killed_run(["--step", "3", *common(deep_dir, out, "--stats_path", stats)], kill_after=1)
    other = ["--step", "3", *common(deep_dir, out, "--stats_path", stats, "--whitening", "eigen")]
    capsys.readouterr()
    assert compress.main(other) == 2
    error = capsys.readouterr().err
    assert "options" in error and "--overwrite" in error and len(error.strip().splitlines()) == 1
    assert len([n for n in os.listdir(tmp_path) if n.startswith("out.partial-")]) == 1  # kept
    assert compress.main(other + ["--overwrite"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_killed_step1_resumes_bit_identically(deep_dir, tmp_path, capsys):
    """Step 1 killed after its fourth layer's statistics were written: the rerun profiles the rest
    (running the done layers only for their outputs) to the same files, byte for byte."""
    killer = KILLER.replace("from utils.io import ShardedModelWriter", "import pipeline.steps as pipeline").replace(
        """write = ShardedModelWriter.write_layer
def write_then_die(self, index, *args, **kwargs):
    write(self, index, *args, **kwargs)
    if index == {kill_after}:
        os._exit(9)  # a kill: no cleanup runs
ShardedModelWriter.write_layer = write_then_die""", """progress = pipeline.write_progress
def progress_then_die(directory, kind, identity, layers_done, state):
    progress(directory, kind, identity, layers_done, state)
    if layers_done == {kill_after} + 1:
        os._exit(9)
pipeline.write_progress = progress_then_die""")
    stats = str(tmp_path / "stats")
    argv = ["--step", "1", *common(deep_dir, str(tmp_path / "unused"), "--stats_path", stats)]
    done = subprocess.run([sys.executable, "-c", killer.format(repo=REPO, kill_after=3, argv=argv)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 9, done.stderr[-2000:]
    partial = [n for n in os.listdir(tmp_path) if n.startswith("stats.partial-")]
    assert len(partial) == 1 and json.load(open(tmp_path / partial[0] / "progress.json"))["layers_done"] == 4
    capsys.readouterr()
    assert compress.main(argv) == 0
    assert "resuming: 4 of 8 layers" in capsys.readouterr().out
    reference = str(tmp_path / "reference")
    assert compress.main(["--step", "1", *common(deep_dir, str(tmp_path / "unused"), "--stats_path", reference)]) == 0
    names = sorted(os.listdir(stats))
    assert names == sorted(os.listdir(reference)) and "progress.json" not in names
    for name in names:
        if name.endswith(".safetensors"):
            assert open(os.path.join(stats, name), "rb").read() == open(os.path.join(reference, name), "rb").read(), name
    assert json.load(open(os.path.join(stats, "meta.json")))["streams"] == json.load(open(os.path.join(reference, "meta.json")))["streams"]


def test_sharded_output_loads_with_remote_code(deep_dir, tmp_path):
    """transformers itself reads the sharded directory through modeling_svd_compress.py."""
    from transformers import AutoModelForCausalLM
    out = str(tmp_path / "out")
    assert compress.main(["--step", "1,3", *common(deep_dir, out)]) == 0
    ours, _, _ = load_compressed(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_sharded_writer_follows_save_compresseds_rules(tmp_path):
    """ShardedModelWriter writes what save_compressed writes: the save dtype in every shard and in
    the compression block (dtype / compressed_dtype), the tied head once, no GGUF
    quantization_config, the remote-code config; it refuses an earlier output without overwrite
    before anything is written, and the input model as its output."""
    from tests.test_remote_code import make_low_rank
    from utils.io import ShardedModelWriter, save_compressed
    from utils.model import layer_prefix
    from utils.outputs import OutputError

    def write(path, dtype, overwrite=False, protected=()):
        model, compression = make_low_rank("llama")
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.Q4_1.gguf"}
        compression["dtype"] = "float32"
        prefix, layers = layer_prefix(model), decoder_layers(model)
        with ShardedModelWriter(path, len(layers), {"run": 1}, overwrite, dtype=dtype, protected=protected) as writer:
            for index, layer in enumerate(layers):
                writer.write_layer(index, layer.state_dict(prefix=f"{prefix}.{index}."), {})
            writer.finish(model, None, compression)
        return model, compression

    out = str(tmp_path / "out")
    model, compression = write(out, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index  # the tied head once
    dtypes = {t.dtype for name in set(index.values()) for t in load_file(os.path.join(out, name)).values()}
    assert dtypes == {torch.bfloat16}
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config
    assert (config["compression"]["dtype"], config["compression"]["compressed_dtype"]) == ("bfloat16", "float32")
    assert config["model_type"].startswith("svd_compress_") and os.path.isfile(os.path.join(out, "modeling_svd_compress.py"))
    loaded, _, block = load_compressed(out)
    assert block["dtype"] == "bfloat16"
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in loaded.named_parameters())
    # the same model through save_compressed: the same tensors
    single = str(tmp_path / "single")
    again, compression = make_low_rank("llama")
    compression["dtype"] = "float32"
    save_compressed(again, None, single, compression, torch.bfloat16)
    reference = load_compressed(single)[0].state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in loaded.state_dict().items())
    before = sorted(os.listdir(out))
    with pytest.raises(OutputError, match="--overwrite"):
        write(out, torch.bfloat16)
    assert sorted(os.listdir(out)) == before and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    write(out, None, overwrite=True)
    assert load_compressed(out)[2]["dtype"] == "float32"
    with pytest.raises(OutputError, match="input model"):
        write(os.path.join(out, "inner"), None, protected=(out,))


def test_killed_step3_with_a_save_dtype_resumes(deep_dir, tmp_path, capsys):
    """--save_dtype float16 with the closed-form update (activations flow through the done layers):
    the written half-precision shards are replayed in the model's float32, the rerun finishes, every
    tensor written is float16 and the block records it; another save dtype is another run."""
    stats = str(tmp_path / "stats")
    assert compress.main(["--step", "1", *common(deep_dir, str(tmp_path / "unused"), "--stats_path", stats)]) == 0
    step3 = ["--step", "3", *common(deep_dir, str(tmp_path / "out"), "--stats_path", stats, "--update", "closed_form",
                                    "--save_dtype", "float16")]
    killed_run(step3, kill_after=2)
    capsys.readouterr()
    assert compress.main(step3[:-2] + ["--save_dtype", "bfloat16"]) == 2
    assert "save dtype" in capsys.readouterr().err
    assert compress.main(step3) == 0
    assert "resuming: 3 of 8 layers" in capsys.readouterr().out
    out = str(tmp_path / "out")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert {t.dtype for name in set(index.values()) for t in load_file(os.path.join(out, name)).values()} == {torch.float16}
    block = json.load(open(os.path.join(out, "config.json")))["compression"]
    assert (block["dtype"], block["compressed_dtype"]) == ("float16", "float32")
    assert next(load_compressed(out)[0].parameters()).dtype == torch.float16
