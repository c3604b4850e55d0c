"""What would otherwise go silently wrong: statistics of another checkpoint, mixture-of-experts
layers the toolkit does not compress, the parameters of a quantized model."""
import copy
import os

import pytest
import torch

import compress
from tests.tiny_models import save_tiny_model, tiny_model
from utils.model import decoder_layers, weights_fingerprint
from utils.pipeline import PipelineError, profile_model

pytestmark = pytest.mark.usefixtures("one_thread")


def windows() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def messages(capsys) -> list[str]:
    """The lines of stderr but transformers' loading progress bar."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]


def nudge_last_layer(model: torch.nn.Module, delta: float = 1e-3) -> None:
    """Another checkpoint of the same architecture: one weight of the last decoder layer moved."""
    with torch.no_grad():
        decoder_layers(model)[-1].mlp.down_proj.weight[0, 0] += delta


# ---------------------------------------------------------------------------------------- statistics

@pytest.fixture(scope="module")
def llama_and_stats():
    model = tiny_model("llama")
    return model, profile_model(model, windows(), "cpu")


def test_statistics_of_other_weights_are_refused_unless_forced(llama_and_stats, capsys):
    model, stats = llama_and_stats
    assert stats.meta["weights_fingerprint"] == weights_fingerprint(model)
    stats.check_model(model)
    other = copy.deepcopy(model)
    nudge_last_layer(other)
    with pytest.raises(PipelineError, match="other weights.*rerun step 1.*--force_stats"):
        stats.check_model(other)
    capsys.readouterr()
    stats.check_model(other, force=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "--force_stats" in err[0], err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_same_weights_in_another_dtype_match_and_other_ones_do_not(llama_and_stats, dtype):
    model, stats = llama_and_stats
    stats.check_model(copy.deepcopy(model).to(dtype))
    other = copy.deepcopy(model)
    with torch.no_grad():  # a sign changes: the only thing a dtype cast never does
        decoder_layers(other)[0].self_attn.q_proj.weight[3, 5] *= -1
    with pytest.raises(PipelineError, match="signs_sha1"):
        stats.check_model(other.to(dtype))


def test_statistics_without_a_fingerprint_are_accepted_with_a_warning(llama_and_stats, capsys):
    model, stats = llama_and_stats
    old = copy.copy(stats)
    old.meta = {k: v for k, v in stats.meta.items() if k != "weights_fingerprint"}
    other = copy.deepcopy(model)
    nudge_last_layer(other)
    capsys.readouterr()
    old.check_model(other)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no weight fingerprint" in err[0], err


def test_cli_refuses_statistics_of_another_checkpoint(tmp_path, capsys):
    base = save_tiny_model("llama", str(tmp_path))
    other = str(tmp_path / "other")
    model = tiny_model("llama")
    nudge_last_layer(model)
    model.save_pretrained(other)
    stats = str(tmp_path / "stats")
    common = ["--dataset", "random", "--whitening_nsamples", "2", "--model_seq_len", "16", "--device", "cpu",
              "--stats_path", stats]
    assert compress.main(["--step", "1", "--model", base, *common]) == 0
    capsys.readouterr()
    out = str(tmp_path / "out")
    assert compress.main(["--step", "3", "--model", other, "--save_path", out, *common]) == 2
    err = messages(capsys)
    assert len(err) == 1 and err[0].startswith("error:") and base in err[0] and other in err[0] \
        and "--force_stats" in err[0], err
    assert not os.path.exists(out)
    assert compress.main(["--step", "3", "--model", other, "--save_path", out, "--force_stats", *common]) == 0
    warnings = [line for line in messages(capsys) if line.startswith(("warning:", "error:"))]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and other in warnings[0], warnings
    assert os.path.isfile(os.path.join(out, "config.json"))
