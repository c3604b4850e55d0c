"""What chained steps hand each other in memory, and the one place a step's model is loaded.

Plain parameters only: compress.py and the evaluation steps (evaluater.py) map their flags onto
these. Importing this module loads neither torch nor transformers (compress.py's --help stays fast).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Session:
    """What chained steps hand each other in memory."""

    model: object = None
    tokenizer: object = None
    compression: dict | None = None  # None: the model is the original
    timings: dict = field(default_factory=dict)
    placement: object = None  # where evaluation put the model (evaluater.place_for_evaluation)
    dequantized: bool = False  # the model is a GGUF file de-quantised to float32 (dtype "auto")
    self_calibration: tuple | None = None  # (ids, what they are) the original model wrote (--dataset self)


# --allocation methods whose step 2 reads the decoder layers one at a time (methods.allocation,
# methods.sensitivity: a streamed model's layers are read from disk when their walk reaches them)
STREAMED_ALLOCATIONS = ("uniform", "v2", "asvd", "duo")


def streams_layers(steps: list[int] | set[int], save_path: str | None, dataset: str | None,
                   whole_model: bool = False, allocation: str | None = None) -> bool:
    """Whether the model's decoder layers are read from disk one at a time (utils.model.LayerStream):
    when every step of the command goes layer by layer and writes, if it writes, layer by layer:
    steps 1 (its Fisher backward included), 2 with an allocation in STREAMED_ALLOCATIONS and 3 (step 3's
    output a directory; a streamed step 3 leaves the session its output, streamed, and measures a
    --ppl_target plan on it); or steps 4 and 8 (perplexity by a layer walk; step 8's output a
    directory) after step 1 or alone. Step 3 followed by 4 or 8 hands them its model in memory, whole
    (they measure the model as computed, before the save's cast). Other steps, self-calibration's
    generation and `whole_model` (a flag that runs the whole model: --ask, --device_map, --eval_chat)
    need the whole model in memory."""
    from utils.data import SELF_DATASET
    steps = set(steps)
    pt_output = (save_path or "").endswith(".pt")
    if whole_model or dataset == SELF_DATASET or (steps & {3, 8} and (pt_output or not save_path)):
        return False
    if 2 in steps and allocation not in STREAMED_ALLOCATIONS:
        return False
    return steps <= {1, 2, 3} or steps <= {1, 4, 8}


def ensure_model(session: Session, model: str, dtype: str, seed: int = 0, num_layers: int | None = None,
                 model_path: str | None = None, stream: bool = False, fuse: bool = True) -> Session:
    """Load the model the step needs into `session` unless the previous step left one there.
    model_path: a compressed model (utils.io.load_compressed) loaded instead of `model` (a model
    spec for utils.model.load_model: alias, directory, .gguf file, hub id or random preset);
    dtype: a utils.model.DTYPES name or "auto" (as saved); stream: the decoder layers (of
    `model_path`'s directory or `model`'s) stay on disk until used (streams_layers); fuse: a compressed
    model's q/k/v and gate/up v factors run as one matmul (off for step 7 with its layers on disk,
    where accelerate reads each layer's tensors from the files as they were saved)."""
    if session.model is not None:
        return session
    from utils.io import load_compressed
    from utils.model import DTYPES, load_model, load_tokenizer, resolve_model
    start = time.perf_counter()
    if model_path:
        loaded_dtype = None if dtype == "auto" else DTYPES[dtype]  # None: as it was saved
        # fused: the v factors of q/k/v and gate/up run as one matmul (float rounding only)
        loaded, tokenizer, compression = load_compressed(model_path, loaded_dtype, fuse=fuse, stream=stream)
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve_model(compression["base_model"]))
        session.model, session.tokenizer, session.compression = loaded, tokenizer, compression
    else:
        session.model, session.tokenizer = load_model(model, dtype, seed, num_layers, stream=stream)
        session.dequantized = dtype == "auto" and bool(resolve_model(model).gguf_file)
    session.timings["load_s"] = round(time.perf_counter() - start, 3)
    return session
