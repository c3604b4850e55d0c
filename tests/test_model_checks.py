"""What would otherwise go silently wrong: statistics of another checkpoint, mixture-of-experts
layers the toolkit does not compress, the parameters of a quantized model."""
import copy
import hashlib
import os

import pytest
import torch

import compress
from tests.tiny_models import save_tiny_model, tiny_config, tiny_model
from utils.model import decoder_layers, weights_fingerprint
from pipeline.steps import PipelineError, profile_model

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


# ---------------------------------------------------------------------------------------- one fingerprint

def three_layer_llama() -> torch.nn.Module:
    """The tiny Llama with a middle decoder layer (the statistics' fingerprint hashes only the ends)."""
    from transformers import AutoModelForCausalLM
    config = tiny_config("llama")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_the_statistics_fingerprint_keeps_the_format_earlier_statistics_recorded():
    """sha1 / signs_sha1 as step 1 wrote them before the fingerprints were merged (re-derived here):
    digests of the first and last layers' state dicts by name, every bit, then the sign bits only."""
    model = three_layer_llama()

    def digest(tensors: dict) -> str:
        sha1 = hashlib.sha1()
        for name in sorted(tensors):
            sha1.update(name.encode())
            sha1.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
        return sha1.hexdigest()[:16]

    ends = {f"{i}.{k}": v for i in (0, 2) for k, v in decoder_layers(model)[i].state_dict().items()}
    expected = {"dtype": "float32", "sha1": digest(ends),
                "signs_sha1": digest({k: torch.signbit(v) for k, v in ends.items()})}
    assert weights_fingerprint(model) == expected
    whole = weights_fingerprint(model, every_parameter=True)
    assert {k: whole[k] for k in expected} == expected and len(whole["sampled_sha1"]) == 16


class ByteTokenizer:
    """Enough of a tokenizer for fidelity.reference_responses without a chat template."""
    eos_token_id, pad_token_id, chat_template = 1, 0, None

    def __call__(self, text: str, return_tensors: str = "pt", **kwargs) -> dict:
        return {"input_ids": torch.tensor([[b % 256 for b in text.encode()]])}


@pytest.mark.parametrize("where", ["middle layer", "head"])
def test_the_cache_keys_change_with_weights_the_statistics_fingerprint_does_not_hash(where, tmp_path, monkeypatch):
    """Self-calibration ids and chat references are keyed by every parameter (as self-calibration's own
    fingerprint did before the merge): a middle layer or the head (tied to the embedding) changed
    gives other keys, though the first and last layers, all step 1's fingerprint reads, are equal."""
    import fidelity
    from utils.self_calibration import SelfCalibrationOptions, settings_of
    monkeypatch.setattr(fidelity, "greedy_responses", lambda *args, **kwargs: [{"ids": [2], "text": "x"}])
    model, other = three_layer_llama(), three_layer_llama()
    with torch.no_grad():
        (decoder_layers(other)[1].mlp.up_proj.weight if where == "middle layer" else other.lm_head.weight).mul_(1.01)
    assert weights_fingerprint(other) == weights_fingerprint(model)
    options = SelfCalibrationOptions()

    def cache_keys(m: torch.nn.Module) -> tuple:
        _, info = fidelity.reference_responses(m, ByteTokenizer(), ["hi"], 4, chat_template=False,
                                               cache_dir=str(tmp_path))
        return settings_of(m, 32, 0, options, "bos"), info["key"]

    keys = [cache_keys(m) for m in (model, three_layer_llama(), other)]
    assert keys[0] == keys[1]  # the same weights: the same keys
    assert keys[2][0] != keys[0][0] and keys[2][1] != keys[0][1]


# ---------------------------------------------------------------------------------------- mixture of experts

def tiny_moe(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, num_experts_per_tok=2)
    config = {"mixtral": lambda: MixtralConfig(intermediate_size=96, num_local_experts=4, **common),
              "qwen2_moe": lambda: Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=64, num_experts=4, **common),
              "qwen3_moe": lambda: Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                                  **common)}[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_mixture_of_experts_is_refused_naming_the_experts_and_their_share(kind):
    from utils.model import ModelSpecError, count_parameters
    model = tiny_moe(kind)
    layer = decoder_layers(model)[0]
    share = sum(p.numel() for n, p in layer.named_parameters() if n.startswith(("mlp.experts.", "mlp.gate."))) \
        * len(decoder_layers(model)) / count_parameters(model)
    with pytest.raises(ModelSpecError, match=rf"mlp\.experts\.gate_up_proj.*\({100 * share:.1f}% of the model's "
                                             rf"parameters\).*mixture-of-experts models .* not supported yet"):
        profile_model(model, windows(), "cpu")


class LinearExpertsModel(torch.nn.Module):
    """A mixture of experts built from nn.Linear (router included), more experts than layers:
    the longest uniform ModuleList is a list of experts."""

    def __init__(self, layers: int = 2, experts: int = 8):
        super().__init__()
        from transformers import PretrainedConfig
        self.config = PretrainedConfig(num_hidden_layers=layers, num_local_experts=experts, model_type="toy_moe")

        def block():
            mlp = torch.nn.Module()
            mlp.gate = torch.nn.Linear(16, experts, bias=False)
            mlp.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(experts))
            layer = torch.nn.Module()
            layer.q_proj, layer.mlp = torch.nn.Linear(16, 16), mlp
            return layer
        self.layers = torch.nn.ModuleList(block() for _ in range(layers))


def test_the_decoder_layers_are_never_a_list_of_experts_and_linear_experts_are_refused():
    from utils.model import ModelSpecError, check_supported
    model = LinearExpertsModel()
    assert decoder_layers(model) is model.layers
    with pytest.raises(ModelSpecError, match=r"mlp\.gate\.weight, mlp\.experts\.0\.weight.* and \d+ more .*"
                                             r"num_local_experts 8"):
        check_supported(model)


def test_cli_refuses_a_mixture_of_experts_before_any_work(tmp_path, capsys):
    model_dir, out = str(tmp_path / "mixtral"), str(tmp_path / "out")
    tiny_moe("mixtral").save_pretrained(model_dir)
    capsys.readouterr()
    assert compress.main(["--step", "1,3", "--ratio", "0.2", "--model", model_dir, "--dataset", "random",
                          "--whitening_nsamples", "2", "--model_seq_len", "16", "--save_path", out,
                          "--device", "cpu"]) == 2
    err = messages(capsys)
    assert len(err) == 1 and err[0].startswith("error: mixtral:") and "mlp.experts.gate_up_proj" in err[0] \
        and "mixture-of-experts" in err[0], err
    assert not os.path.exists(out)


def test_dense_families_are_accepted():
    from tests.tiny_models import FAMILIES
    from utils.model import check_supported, unhandled_weights
    for family in FAMILIES:
        model = tiny_model(family)
        assert unhandled_weights(model) == {}
        check_supported(model)


def test_a_mixture_of_experts_is_refused_before_its_weights_are_read(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    from utils.model import ModelSpecError, load_model
    model_dir = str(tmp_path / "qwen3_moe")
    tiny_moe("qwen3_moe").save_pretrained(model_dir)

    def never(*args, **kwargs):
        raise AssertionError("the weights were read")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ModelSpecError, match=r"qwen3_moe: .*mlp\.experts\.gate_up_proj.*% of the model's parameters"):
        load_model(model_dir)


# ---------------------------------------------------------------------------------------- quantized parameters

def test_a_quantized_model_counts_the_weights_its_codes_stand_for():
    import evaluater
    from component import QuantLinear
    from methods.quantize import QuantizeOptions
    from utils.model import count_parameters
    from pipeline.steps import quantize_model
    original = tiny_model("qwen2")  # q/k/v biases: a QuantLinear's bias is a parameter, counted once
    model = copy.deepcopy(original)
    quantize_model(model, QuantizeOptions("rtn", 4, 32), "cpu")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert count_parameters(model) == count_parameters(original)
    prompts = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    figures = evaluater.measure_efficiency({"model": model, "original": original}, prompts, gen_len=2, repeats=1,
                                           device="cpu")
    assert figures["model"]["parameters"] == figures["original"]["parameters"]
    assert figures["model"]["weight_bytes"] == evaluater.weight_bytes(model) < figures["original"]["weight_bytes"]
    ratios = evaluater.efficiency_ratios(figures["model"], figures["original"])
    assert ratios["parameters"] == 1.0 and ratios["weight_bytes"] < 1.0
