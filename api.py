"""The toolkit as Python functions: what compress.py's steps call, without the CLI.

    import api
    model, tokenizer = api.load_model("smollm2-135m")
    windows = api.calibration_windows("pydoc[0:0.9]", tokenizer, 32, 512, seed=0)
    # chat data (Alpaca / messages rows through the chat template) or the model's own text:
    # windows, info = api.calibration_data("alpaca_en_demo.jsonl[0:0.9]", tokenizer, 32, 512, seed=0)
    # windows, info = api.self_calibration_data(model, tokenizer, 32, 512, 0, api.SelfCalibrationOptions(), "cpu")
    stats = api.profile_model(model, windows, "cpu")                        # step 1
    plan = api.uniform_plan(model, 0.2)                                      # step 2
    record = api.compress_model(model, plan, api.CompressOptions(), "cpu", stats)   # step 3
    # or: anchored fit + AA-SVD block refinement on 32 calibration windows (docs/refinement.md), the
    # windows they only measure on drawn apart from step 1's 32 (README, Data)
    # options = api.CompressOptions(update=api.AnchoredOptions(nsamples=16, alpha=1.0),
    #                               refine=api.RefineOptions("block", nsamples=32))
    # carried, _ = api.calibration_windows_with_heldout("pydoc[0:0.9]", tokenizer, options.nsamples, 512, 0,
    #                                                   options.heldout_positions(), exclude=[(32, 512, 0)])
    # api.compress_model(model, plan, options, "cpu", stats, carried)
    # a pass of your own after these: options=api.CompressOptions(extra=(MyOptions(...),)), MyOptions a
    # methods.registry.MethodOptions dataclass whose make_pass returns the pass (tests/test_registry.py)
    api.save_compressed(model, tokenizer, "out/smol-20", record)
    model, tokenizer, record = api.load_compressed("out/smol-20")
    print(api.perplexity(model, tokenizer, api.load_text("pydoc[0.9:1]", "test"), 512)["ppl"])
    # step 8: quantize the low-rank model (GPTQ 4-bit, group 128) and add the section to its block
    section = api.quantize_model(model, api.QuantizeOptions("gptq", 4, 128), "cpu", windows[:16])
    api.save_compressed(model, tokenizer, "out/smol-20-gptq4", {**record, "quantization": section})
"""
from __future__ import annotations

import torch
from torch import nn

from methods import AnchoredOptions, DecomposeOptions, QuantizeOptions, RefineOptions, UpdateOptions
from utils.data import calibration_data, calibration_windows, calibration_windows_with_heldout, load_text, tokenize
from utils.self_calibration import SelfCalibrationOptions, self_calibration_data
from utils.io import load_compressed, save_compressed
from utils.model import count_parameters, load_model, target_shapes
from pipeline.steps import (CompressOptions, Statistics, compress_model, linear_storage, profile_model, quantize_model,
                            uncompressed_block)
from utils.plan import Plan
from generate import GenerationOptions, generate  # step 9
from tasks_eval import evaluate_tasks  # step 6 (lm-eval)
from utils.model import place_model  # --device_map: accelerate dispatch for evaluation
from methods.allocation import asvd_plan, asvd_ppl_plan, duo_plan, v2_plan, whitened_spectra  # step 2
from methods.sensitivity import SensitivityOptions, plan_calibration_ppl, sensitivity_table  # step 2

__all__ = ["AnchoredOptions", "CompressOptions", "DecomposeOptions", "Plan", "QuantizeOptions", "RefineOptions",
           "Statistics", "UpdateOptions",
           "calibration_windows", "calibration_windows_with_heldout", "compress_model", "count_parameters", "linear_storage", "load_compressed",
           "load_model", "load_text", "perplexity", "profile_model", "quantize_model", "save_compressed",
           "uncompressed_block", "uniform_plan"]
__all__ += ["GenerationOptions", "evaluate_tasks", "generate", "place_model"]
__all__ += ["SelfCalibrationOptions", "calibration_data", "self_calibration_data"]
__all__ += ["SensitivityOptions", "asvd_plan", "asvd_ppl_plan", "duo_plan", "plan_calibration_ppl", "sensitivity_table",
            "v2_plan", "whitened_spectra"]


def uniform_plan(model: nn.Module, ratio: float) -> Plan:
    """Every target linear at the rank that removes `ratio` of its parameters (SVD-LLM's rule)."""
    return Plan.uniform(target_shapes(model), ratio)


def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int, device: torch.device | str = "cpu",
               limit: int | None = None, batch_size: int = 1) -> dict:
    """Perplexity of `model` on `text` by step 4's protocol (evaluater.py): non-overlapping windows
    of seq_len tokens, every token but each window's first scored. The model is moved to `device`."""
    from evaluater import perplexity as windows_perplexity
    model = model.to(device).eval()
    return windows_perplexity(model, tokenize(tokenizer, text), seq_len, batch_size, device, limit)
