"""Tiny random models from configs (2 layers, hidden 64) for fast tests, one per family."""
from __future__ import annotations

import os

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gemma3", "opt")


def tiny_config(family: str):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512)
    if family == "llama":  # grouped KV heads: k/v narrower than q
        return LlamaConfig(intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "mistral":
        return MistralConfig(intermediate_size=160, num_key_value_heads=2, sliding_window=16, **common)
    if family == "qwen2":  # q/k/v carry biases
        return Qwen2Config(intermediate_size=160, num_key_value_heads=2, **common)
    if family == "gemma3":  # sliding + global attention layers, q/k norms
        return Gemma3TextConfig(intermediate_size=160, num_key_value_heads=1, head_dim=16,
                                sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                **common)
    if family == "opt":
        return OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         ffn_dim=160, word_embed_proj_dim=64, max_position_embeddings=512)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def save_tiny_model(family: str, directory: str, seed: int = 0) -> str:
    path = os.path.join(directory, f"tiny-{family}")
    tiny_model(family, seed).save_pretrained(path)
    return path


def save_deep_llama(path: str, layers: int = 8, tokenizer: bool = False) -> str:
    """A `layers`-deep tiny Llama (tied embeddings, seed 0) saved in shards of about one layer, with a
    byte-level BPE tokenizer when asked (for the steps that read text): the streaming tests' model."""
    from transformers import AutoModelForCausalLM
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path, max_shard_size="100KB")
    if tokenizer:
        save_byte_level_tokenizer(path)
    return path


def save_byte_level_tokenizer(path: str) -> None:
    """A byte-level BPE tokenizer with no merges (256 ids, one per byte) saved into `path`: any text
    encodes into a tiny model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(path)


def count_real_layers_at_load(monkeypatch) -> list[int]:
    """A list that gets, each time utils.model.LayerStream.load reads a layer, how many decoder
    layers of the model then hold real (not meta) weights: the streaming tests' probe."""
    from utils.model import LayerStream, decoder_layers
    real_at_load: list[int] = []
    original_load = LayerStream.load

    def counting_load(self, model, index, *args, **kwargs):
        original_load(self, model, index, *args, **kwargs)
        real_at_load.append(sum(not any(p.is_meta for p in layer.parameters()) for layer in decoder_layers(model)))

    monkeypatch.setattr(LayerStream, "load", counting_load)
    return real_at_load
