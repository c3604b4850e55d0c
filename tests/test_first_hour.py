"""What a new user's first command leaves on disk: a model no larger than it needs to be (half
precision when the source has no dtype of its own), and statistics beside it, not inside it."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import compress
from tests.tiny_models import save_tiny_model
from utils.io import load_compressed, save_compressed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("tiny")))


def cli(*argv: str) -> int:
    return compress.main(list(argv) + ["--dataset", "random", "--whitening_nsamples", "4", "--model_seq_len", "16",
                                       "--device", "cpu"])


def saved_dtypes(path: str) -> set:
    """The dtypes of every tensor written: model.safetensors, or step 3's shards."""
    dtypes = set()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as handle:
                dtypes |= {handle.get_tensor(key).dtype for key in handle.keys()}
    assert dtypes, f"no tensors in {path}"
    return dtypes


def test_statistics_are_written_beside_the_model(tiny_dir, tmp_path):
    out = str(tmp_path / "out")
    assert cli("--step", "1-3", "--model", tiny_dir, "--save_path", out) == 0
    assert os.path.isfile(os.path.join(out + ".stats", "meta.json"))
    assert "stats" not in os.listdir(out)  # the directory to upload holds the model only
    assert {"config.json", "model.safetensors.index.json", "modeling_svd_compress.py"} <= set(os.listdir(out))


def test_statistics_inside_the_model_of_earlier_versions_are_still_read(tiny_dir, tmp_path):
    out = str(tmp_path / "out")
    assert cli("--step", "1-3", "--model", tiny_dir, "--save_path", out) == 0
    os.replace(out + ".stats", os.path.join(out, "stats"))  # the old layout
    ranks = load_compressed(out)[2]["ranks"]
    assert cli("--step", "3", "--model", tiny_dir, "--save_path", out, "--overwrite", "--ratio", "0.6") == 0
    assert not os.path.exists(out + ".stats")
    assert os.path.isfile(os.path.join(out, "stats", "meta.json"))  # kept where it was
    assert all(r < ranks[name] for name, r in load_compressed(out)[2]["ranks"].items())


def test_save_dtype_casts_the_written_model_and_records_it(tiny_dir, tmp_path):
    out = str(tmp_path / "out")
    assert cli("--step", "1-3", "--model", tiny_dir, "--save_path", out, "--save_dtype", "float16") == 0
    assert saved_dtypes(out) == {torch.float16}
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["dtype"] == "float16"
    assert (config["compression"]["dtype"], config["compression"]["compressed_dtype"]) == ("float16", "float32")
    model, _, _ = load_compressed(out)
    assert next(model.parameters()).dtype == torch.float16


def test_a_float_source_keeps_its_dtype_and_a_dequantized_one_is_halved(tiny_dir, tmp_path):
    out = str(tmp_path / "out")
    assert cli("--step", "1-3", "--model", tiny_dir, "--save_path", out) == 0
    assert saved_dtypes(out) == {torch.float32}  # a float32 checkpoint: its own dtype
    args = compress.build_parser().parse_args(["--step", "3"])
    assert compress.save_dtype_of(args, compress.Session(dequantized=True)) == torch.bfloat16
    assert compress.save_dtype_of(args, compress.Session(dequantized=False)) is None
    args = compress.build_parser().parse_args(["--step", "3", "--save_dtype", "float32"])
    assert compress.save_dtype_of(args, compress.Session(dequantized=True)) == torch.float32


def test_cast_at_save_keeps_ties_and_rounds_each_weight_once(tmp_path):
    from tests.test_remote_code import make_low_rank
    model, compression = make_low_rank("llama")
    expected = {name: p.detach().to(torch.bfloat16) for name, p in model.named_parameters()}
    compression["dtype"] = "float32"
    path = str(tmp_path / "bf16")
    save_compressed(model, None, path, compression, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, cast once
    assert all(torch.equal(p, expected[name]) for name, p in model.named_parameters())  # in memory = written
    assert saved_dtypes(path) == {torch.bfloat16}
    loaded, _, block = load_compressed(path)
    assert block["dtype"] == "bfloat16"
    assert all(torch.equal(p, expected[name]) for name, p in loaded.named_parameters())


@pytest.mark.integration("smollm2")
def test_the_bundled_model_is_named_for_what_it_is():
    # the alias says neither that it is the Instruct model nor that it comes de-quantized from 4 bits
    import gguf
    from utils.model import resolve_model, source_description
    source = resolve_model("smollm2-135m")
    reader = gguf.GGUFReader(os.path.join(source.path, source.gguf_file))
    field = reader.fields["general.file_type"]
    assert gguf.LlamaFileType(int(field.parts[field.data[0]][0])) == gguf.LlamaFileType.MOSTLY_Q4_1
    assert source_description("smollm2-135m") == ("SmolLM2-135M-Instruct, from the GGUF file "
                                                  "SmolLM2-135M-Instruct.Q4_1.gguf, de-quantized")


def test_a_compression_block_names_no_source_for_a_plain_checkpoint(tiny_dir, tmp_path):
    out = str(tmp_path / "out")
    assert cli("--step", "1-3", "--model", tiny_dir, "--save_path", out) == 0
    assert load_compressed(out)[2]["base_model_source"] is None


def test_a_dequantized_gguf_model_is_not_saved_as_gguf(tmp_path):
    # transformers records quant_method gguf in the config of a model it de-quantised from a GGUF file;
    # written into config.json it made every bfloat16 load warn that "a GGUF checkpoint with its
    # weights packed is fastest in float32", about weights that are plain tensors
    from tests.test_remote_code import _run_quiet, make_low_rank
    model, compression = make_low_rank("llama")
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.Q4_1.gguf", "dequantize": False}
    compression["dtype"] = "float32"
    path = str(tmp_path / "from-gguf")
    save_compressed(model, None, path, compression, torch.bfloat16)
    assert "quantization_config" not in json.loads(open(os.path.join(path, "config.json")).read())
    out, err = _run_quiet(f"from transformers import AutoModelForCausalLM\n"
                          f"m = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True)\n"
                          f"print(next(m.parameters()).dtype)", tmp_path)
    assert out.strip() == "torch.bfloat16" and "GGUF" not in err


def test_fisher_pass_is_estimated_before_it_starts_and_recorded(tiny_dir, tmp_path, capsys):
    # issue 29: every long pass (sensitivity, fisher, refinement, LoRA) prints its estimate first and
    # records it with the actual time (the others: tests/test_cli.py, tests/test_lora.py)
    out = str(tmp_path / "out")
    assert cli("--step", "1", "--model", tiny_dir, "--fisher", "--save_path", out) == 0
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("fisher (step 1, --fisher): about"))
    assert "4 windows" in line and "one window of 16 tokens" in line, line
    assert printed.index("profile (step 1): about") < printed.index(line)
    with open(os.path.join(out + ".stats", "meta.json")) as handle:
        cost = json.load(handle)["cost"]
    assert cost["fisher"]["counts"] == {"windows": 4}
    assert cost["fisher"]["estimated_s"] > 0 and cost["fisher"]["actual_s"] > 0


def test_the_api_and_the_cli_work_from_another_directory(tmp_path):
    # README: nothing is installed as a package; `import api` works anywhere with the clone on
    # PYTHONPATH, and `python path/to/compress.py` from any directory without it
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "import api; print(api.__file__)"], cwd=tmp_path,
                          env={**env, "PYTHONPATH": root}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.path.dirname(done.stdout.strip()) == root
    without = subprocess.run([sys.executable, "-c", "import api"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert without.returncode != 0 and "No module named 'api'" in without.stderr
    done = subprocess.run([sys.executable, os.path.join(root, "compress.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--step" in done.stdout, done.stderr


@pytest.mark.integration("smollm2")
def test_the_gguf_source_loads_in_a_half_dtype_silently_and_as_its_float32_weights_cast(capfd):
    """--ask (and every comparison with the original) loads the GGUF source in the compressed model's
    dtype: transformers warned on every such load ("... fastest in float32 ..."), a line the user cannot
    act on. Loaded in float32 and cast instead: nothing printed, the same bits as the float32 load cast."""
    import logging
    import torch
    from utils.model import load_model
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        half, _ = load_model("smollm2-135m", torch.bfloat16)
    finally:
        logger.removeHandler(handler)
    printed = capfd.readouterr()
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
    assert "float32" not in printed.err + printed.out
    full, _ = load_model("smollm2-135m", torch.float32)
    for (name, a), (_, b) in zip(half.state_dict().items(), full.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), name
