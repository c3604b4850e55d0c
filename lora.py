"""Step 7: SVD-LLM's sequential LoRA fine-tuning of a compressed model, U first, then V (peft).

    python lora.py --prune_model out/smol-20 --data_path ../shared/data/alpaca_demo/alpaca_en_demo.jsonl \
        --output_dir out/smol-20-lora --lora_r 8 --num_epochs 2 --learning_rate 1e-4 --batch_size 64
    python compress.py --step 7 --model_path out/smol-20 --data_path DATA --save_path out/smol-20-lora

SVD-LLM (Wang et al., section 3.2; its utils/LoRA.py run twice with --lora_target_modules naming
first every *_u_proj, then every *_v_proj) updates the two factors of each low-rank matrix W' = u v
one after the other, so the two updates do not interfere:
  stage "u": a LoRA adapter u + (alpha / r) B A on every low-rank module's u, every v frozen; train;
             merge the adapters into u (peft's merge_and_unload);
  stage "v": the same on every v, u (already updated) frozen; train; merge into v.
Everything else (embeddings, norms, lm_head, the linears the plan kept dense) is frozen, as in
SVD-LLM's code, where get_peft_model leaves only the adapters trainable. After merging, every
factor has its old shape: the ranks and the parameter count are exactly those of the input
(asserted), and the output is a compressed model in the same safe format, its compression block
carrying a "lora" record (data, steps, lr, r, alpha, dropout, seed, losses of each stage).

Precision and memory: the frozen weights stay in the model's own dtype on the device and the
adapters are float32 (peft's autocast_adapter_dtype); a float16 model trains with dynamic loss
scaling (torch.amp.GradScaler: float16 gradients through the frozen layers would underflow, and a
step whose gradients overflow is skipped). Each adapted factor is merged in float32 and rounded once
to its dtype. --lora_frozen_dtype float32 casts the whole model to float32 for the stage instead
(exact from float16 / bfloat16; 4 bytes per weight) and casts it back afterwards; for a float32
model the two are the same. --gradient_checkpointing keeps only each decoder layer's input for the
backward pass and recomputes the layer (same gradients; dropout's random state is replayed).
--device_map auto | balanced | sequential (with --max_memory, --offload_folder) dispatches the model
with accelerate for each stage, as evaluation does (utils.model.place_model): decoder layers whole on
the GPUs in turn, then the CPU, then disk; an offloaded layer's frozen weights come to its execution
device when it runs. The adapters stay out of the offloading, on the execution device of their layer;
the hooks are removed and every tensor put back before merging. Same training as without it (tested
with a layer offloaded to disk). Give --gradient_checkpointing with it: otherwise autograd keeps the
weights each offloaded layer brought to the device until the backward pass (dispatched, the recomputation
runs each layer to its end, so the hooks put back every weight they brought in).
With --offload_folder too (and a compressed model directory, --lora_frozen_dtype model, step 7 the last
model step) the model is never whole in host memory: it is built on the meta device with only the
embeddings, final norm and head read (utils.io.load_compressed stream=True); the layers the device map
sends to disk are read from the checkpoint's safetensors files where they run (accelerate's offload
index: nothing is copied), the others just before the dispatch; each stage's adapters are merged layer
by layer (a layer read, merged in float32, written to a folder inside --offload_folder, put back on
meta), and the output is written layer by layer from those files (utils.io.ShardedModelWriter). Same
losses and factors as the model held whole (tested); host memory holds the embeddings, the layers the CPU
budget keeps and the layer running. --lora_offload_layers keeps the decoder layers on the host: each comes to the device when it runs
(utils.layerwise.layer_on_device: one at a time) and its forward is checkpointed around that move,
so the backward pass brings it in again to recompute it; only the adapters, the embeddings, final
norm and lm_head, and each layer's input (per micro-batch) stay on the device. Same training as
without it (tested); for a model whose frozen weights do not fit the device.

Training, as SVD-LLM's (transformers Trainer) defaults: AdamW (no weight decay), linear warm-up
then linear decay to 0, gradient clipping at norm 1, micro-batches with gradient accumulation to
--batch_size; the loss is the mean token cross-entropy over the whole batch. Differences, on
purpose: the warm-up is at most a tenth of a stage's steps (SVD-LLM's 100 steps would never end in
a short run), and the final adapters are merged (no best-checkpoint reload). --lora_guard (off by
default, as SVD-LLM) merges a stage only if its validation loss fell, else drops its adapters and keeps
the factors it started from (the record says "merged": false): a diverged stage costs its time only.
--lora_distill_top_k K (ours) trains on the original model's next-token distributions at the scored
tokens instead of the data's tokens: the original runs once over the examples (teacher_targets: its K
most likely tokens' log-probabilities) and the loss is the KL from it (distillation_loss).

Data (--data_path):
  * chat data (utils.data: Alpaca rows, or rows with a "messages" list) and a tokenizer with a chat
    template: each row rendered as calibration renders it (utils.data.render_conversation), the
    loss on the assistant's turns only (utils.data.assistant_token_mask) unless --train_on_inputs;
    messages rows without a chat template: the "### Instruction:" / "### Response:" blocks, likewise;
  * a .json/.jsonl file of Alpaca rows (instruction, input, output) and a tokenizer without a chat
    template: the Alpaca-LoRA template (the
    one SVD-LLM's Prompter uses), the loss on the response tokens only unless --train_on_inputs,
    an EOS token appended when it fits; the prompt and the response are tokenized separately and
    joined, so the masked tokens are exactly the prompt's (SVD-LLM masks the length of the
    separately tokenized prompt inside the tokenized whole, which is the same unless the tokenizer
    merges across the boundary);
  * anything else utils.data reads (a plain text file, a .json/.jsonl with "text", pydoc; slices such
    as FILE[0:0.8]): language-model loss on non-overlapping windows of --cutoff_len tokens.
--val_set_size examples (Alpaca rows or windows), drawn with --seed, are held out for the validation
loss, logged before and after each stage (and every --eval_steps).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from component import ColumnPreservedLinear, LowRankLinear
from utils.data import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT
from utils.model import layer_stream, linear_units

IGNORE_INDEX = -100  # label of a token that is not scored (the prompt of an Alpaca row, padding)
FACTORS = ("u", "v")
# a stage that trains the factors u and v themselves (every low-rank module's, no adapters): the whole
# parameter budget of the compressed matrices learns, where a LoRA stage adds rank r to one factor
FULL_FACTORS = "factors"
STAGES = (*FACTORS, FULL_FACTORS)
FROZEN_DTYPES = ("model", "float32")
DEFAULT_VAL_SET_SIZE = 2000  # SVD-LLM's; capped at a tenth of the examples
GUARD_NEEDS_VALIDATION = ("--lora_guard compares the validation loss before and after each stage: give "
                          "--val_set_size > 0 (or leave it at its default)")


class LoraError(ValueError):
    """Input that step 7 cannot use (the message names the problem and the fix)."""


@dataclass
class LoraOptions:
    """SVD-LLM's LoRA.py settings (defaults: the issue's command line; r, alpha, dropout, cutoff as theirs)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    learning_rate: float = 1e-4
    num_epochs: float = 2
    batch_size: int = 64
    micro_batch_size: int = 4
    max_steps: int | None = None  # per stage; None: num_epochs over the training examples
    warmup_steps: int = 100  # at most a tenth of a stage's steps
    max_grad_norm: float = 1.0
    eval_steps: int | None = None  # validation loss every N steps too (None: before and after only)
    logging_steps: int = 10  # the recorded training-loss curve: means over this many steps
    seed: int = 0
    stages: tuple[str, ...] = FACTORS
    frozen_dtype: str = "model"  # model: frozen weights in the model's dtype, float32 adapters | float32: all float32
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward pass instead of keeping it
    offload_layers: bool = False  # decoder layers on the host, one at a time on the device (and recomputed there)
    device_map: str | None = None  # auto | balanced | sequential: accelerate dispatch over GPUs, CPU and disk
    max_memory: dict[int | str, int] | None = None  # budget per device for device_map (None: what each has free)
    offload_folder: str | None = None  # where device_map's disk-offloaded weights go (a fresh folder inside it)
    guard: bool = False  # merge a stage only where it lowered the validation loss (else drop its adapters)
    distill_top_k: int = 0  # > 0: fit the original model's next-token distributions (its top k tokens), not the data's

    def check(self) -> None:
        from utils.model import DEVICE_MAPS

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise LoraError(message)
        need(self.r >= 1, f"--lora_r {self.r}: the adapter rank must be at least 1 (SVD-LLM: 8)")
        need(self.alpha > 0, f"--lora_alpha {self.alpha}: must be > 0 (default 16; the update is scaled by alpha / r)")
        need(0 <= self.dropout < 1, f"--lora_dropout {self.dropout}: must be in [0, 1) (default 0.05)")
        need(self.learning_rate > 0, f"--learning_rate {self.learning_rate}: must be > 0 (SVD-LLM: 1e-4)")
        need(self.num_epochs > 0, f"--num_epochs {self.num_epochs}: must be > 0")
        need(self.micro_batch_size >= 1, f"--micro_batch_size {self.micro_batch_size}: must be at least 1")
        need(self.batch_size >= self.micro_batch_size and self.batch_size % self.micro_batch_size == 0,
             f"--batch_size {self.batch_size} must be a multiple of --micro_batch_size {self.micro_batch_size} "
             f"(gradient accumulation of batch_size / micro_batch_size micro-batches)")
        need(self.max_steps is None or self.max_steps >= 0, f"--max_steps {self.max_steps}: must be 0 or more")
        need(self.warmup_steps >= 0, f"--warmup_steps {self.warmup_steps}: must be 0 or more")
        need(self.max_grad_norm > 0, f"--max_grad_norm {self.max_grad_norm}: must be > 0")
        need(self.eval_steps is None or self.eval_steps >= 1, f"--eval_steps {self.eval_steps}: must be at least 1")
        need(self.logging_steps >= 1, f"--logging_steps {self.logging_steps}: must be at least 1")
        need(len(self.stages) >= 1 and all(s in STAGES for s in self.stages),
             f"--lora_stages {','.join(self.stages)}: a comma list of u, v (SVD-LLM: u,v) and {FULL_FACTORS} "
             f"(u and v themselves trained, no adapters)")
        need(FULL_FACTORS not in self.stages or not (self.offload_layers or self.device_map),
             f"--lora_stages {FULL_FACTORS} trains every factor with its optimizer state on the device: it "
             f"cannot stream layers (--lora_offload_layers, --device_map); use u,v there")
        need(self.frozen_dtype in FROZEN_DTYPES,
             f"--lora_frozen_dtype {self.frozen_dtype}: choose one of {', '.join(FROZEN_DTYPES)}")
        need(self.device_map in (None, *DEVICE_MAPS),
             f"--device_map {self.device_map}: choose one of {', '.join(DEVICE_MAPS)}")
        need(self.distill_top_k >= 0, f"--lora_distill_top_k {self.distill_top_k}: 0 (off) or the number of the "
             f"original's most likely tokens kept per position, e.g. 32")
        need(self.device_map is not None or (self.max_memory is None and self.offload_folder is None),
             "--max_memory and --offload_folder need --device_map auto, balanced or sequential")
        need(not (self.device_map and self.offload_layers),
             "--device_map and --lora_offload_layers both place the decoder layers: choose one (--device_map "
             "spreads them over GPUs, CPU and disk; --lora_offload_layers brings one at a time to --device)")

    def check_examples(self, examples: "Examples") -> None:
        if self.guard and not examples.val:
            raise LoraError(GUARD_NEEDS_VALIDATION)

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


# ---------------------------------------------------------------------------------------- data

@dataclass
class Examples:
    """Tokenized training and validation examples: (input_ids, labels) of equal lengths, or with
    distillation (input_ids, labels, targets): a teacher's top-k next-token log-probabilities at each
    scored position (teacher_targets)."""

    train: list[tuple]
    val: list[tuple]
    info: dict


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    """The Alpaca-LoRA template (SVD-LLM's Prompter 'alpaca'): the text before the response."""
    if input_text:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_alpaca(tokenizer, row: dict, cutoff_len: int, train_on_inputs: bool = False,
                    add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one Alpaca row, at most cutoff_len tokens; labels are IGNORE_INDEX on
    exactly the prompt's tokens (unless train_on_inputs), the ids elsewhere."""
    prompt_ids = list(tokenizer(alpaca_prompt(row["instruction"], row.get("input")))["input_ids"])
    response_ids = list(tokenizer(row["output"], add_special_tokens=False)["input_ids"])
    ids = (prompt_ids + response_ids)[:cutoff_len]
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids.append(eos)
    labels = list(ids)
    if not train_on_inputs:
        masked = min(len(prompt_ids), len(ids))
        labels[:masked] = [IGNORE_INDEX] * masked
    return ids, labels


def _split_path(spec: str) -> tuple[str, float, float]:
    from utils.data import DatasetError, parse_dataset
    try:
        return parse_dataset(spec)
    except DatasetError as error:
        raise LoraError(f"--data_path {spec}: {error}") from None


def _chat_rows(path: str) -> tuple[list, str] | None:
    """(rows, 'alpaca' or 'messages') of a chat-data .json/.jsonl file (utils.data's reading and
    checks), or None when the file is not chat data."""
    from utils.data import DatasetError, check_chat_rows, chat_format, read_json_rows
    if not path.endswith((".json", ".jsonl")):
        return None
    try:
        rows = read_json_rows(path)
        form = chat_format(rows)
        if form is not None:
            check_chat_rows(path, rows, form)
    except (OSError, DatasetError) as error:
        raise LoraError(f"--data_path {error}") from None
    return None if form is None else (rows, form)


def read_alpaca_rows(path: str) -> list[dict] | None:
    """The rows of an Alpaca-form .json/.jsonl file, or None when the file is not in that form."""
    found = _chat_rows(path)
    return found[0] if found is not None and found[1] == "alpaca" else None


def check_data_path(spec: str) -> str:
    """Cheap checks before any model loads; returns the format: 'alpaca' (or 'chat' once the
    tokenizer turns out to have a chat template), 'chat' (messages rows) or 'text'."""
    from utils.data import BUILTIN_DATASETS, HUB_DATASETS
    name, _, _ = _split_path(spec)
    if name == "random":
        raise LoraError("--data_path random has no text: give an Alpaca JSON/JSONL file or a text file")
    if name in HUB_DATASETS:
        from utils.data import DatasetError, check_hub_datasets
        try:
            check_hub_datasets({"--data_path": spec})
        except DatasetError as error:
            raise LoraError(str(error)) from None
        return "text"
    if name in BUILTIN_DATASETS:
        return "text"
    if not os.path.isfile(name):
        raise LoraError(f"--data_path {name}: no such file (an Alpaca .json/.jsonl, or a plain text file)")
    found = _chat_rows(name)
    return "text" if found is None else "alpaca" if found[1] == "alpaca" else "chat"


def tokenize_conversation(tokenizer, messages: list[dict], cutoff_len: int,
                          train_on_inputs: bool = False) -> tuple[tuple[list[int], list[int]], bool]:
    """((input_ids, labels), masked) of one conversation rendered as calibration renders it
    (utils.data.render_conversation: the chat template), at most cutoff_len tokens; labels are
    IGNORE_INDEX outside the assistant's turns unless train_on_inputs. masked is False when the
    template did not let the turns be found (then every token is scored)."""
    from utils.data import assistant_token_mask, render_conversation
    ids = render_conversation(tokenizer, messages)
    mask = None if train_on_inputs else assistant_token_mask(tokenizer, messages, ids)
    ids = ids[:cutoff_len]
    labels = list(ids) if mask is None else [i if keep else IGNORE_INDEX for i, keep in zip(ids, mask)]
    return (ids, labels), mask is not None or train_on_inputs


def _held_out(count: int, val_set_size: int | None, seed: int, what: str) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of `count` examples, drawn with `seed`."""
    if val_set_size is None:
        val_set_size = min(DEFAULT_VAL_SET_SIZE, count // 10)
    if val_set_size < 0 or val_set_size >= count:
        raise LoraError(f"--val_set_size {val_set_size}: the data has {count} {what}; hold out fewer "
                        f"(0 for none) so that some are left to train on")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[val_set_size:]), sorted(order[:val_set_size])


def load_examples(spec: str, tokenizer, cutoff_len: int, val_set_size: int | None = None, seed: int = 0,
                  train_on_inputs: bool = False) -> Examples:
    """The training and validation examples of --data_path (see the module docstring)."""
    from utils.data import DatasetError, load_text, tokenize
    if tokenizer is None:
        raise LoraError("the model has no tokenizer: step 7 needs one to read --data_path")
    data_format = check_data_path(spec)
    name, start, end = _split_path(spec)
    info = {"path": spec, "format": data_format, "cutoff_len": cutoff_len}
    if data_format == "alpaca" and getattr(tokenizer, "chat_template", None):
        data_format = info["format"] = "chat"  # an instruct model learns in the form it is used
    if data_format == "chat":
        from utils.data import conversation, has_chat_template
        rows, form = _chat_rows(name)
        rows = rows[int(start * len(rows)):int(end * len(rows))]
        rendered = [tokenize_conversation(tokenizer, conversation(row, form), cutoff_len, train_on_inputs)
                    for row in rows]
        examples = [example for example, _ in rendered]
        scored = [e for e in examples if any(label != IGNORE_INDEX for label in e[1][1:])]
        info.update(rows=len(rows), rows_without_response_tokens=len(examples) - len(scored),
                    rows_scored_whole=sum(not masked for _, masked in rendered), train_on_inputs=train_on_inputs,
                    template="chat_template" if has_chat_template(tokenizer) else "alpaca blocks (no chat template)")
        examples, what = scored, "conversations with assistant tokens within --cutoff_len"
    elif data_format == "alpaca":
        rows = read_alpaca_rows(name)
        rows = rows[int(start * len(rows)):int(end * len(rows))]
        examples = [tokenize_alpaca(tokenizer, row, cutoff_len, train_on_inputs) for row in rows]
        scored = [e for e in examples if any(label != IGNORE_INDEX for label in e[1][1:])]
        info.update(rows=len(rows), rows_without_response_tokens=len(examples) - len(scored),
                    train_on_inputs=train_on_inputs, template="alpaca")
        examples, what = scored, "Alpaca rows with response tokens within --cutoff_len"
    else:
        try:
            ids = tokenize(tokenizer, load_text(spec, "train"))
        except DatasetError as error:
            raise LoraError(f"--data_path {spec}: {error}") from None
        windows = ids.numel() // cutoff_len
        if windows < 2:
            raise LoraError(f"--data_path {spec}: {ids.numel()} tokens make {windows} window(s) of --cutoff_len "
                            f"{cutoff_len}; give more text or a shorter --cutoff_len")
        examples = [(w.tolist(), w.tolist()) for w in ids[:windows * cutoff_len].view(windows, cutoff_len)]
        info.update(tokens=int(ids.numel()), windows=windows)
        what = f"windows of {cutoff_len} tokens"
    if not examples:
        raise LoraError(f"--data_path {spec}: no usable examples (every response lies beyond --cutoff_len {cutoff_len})")
    train_index, val_index = _held_out(len(examples), val_set_size, seed, what)
    info.update(train_examples=len(train_index), val_examples=len(val_index), split_seed=seed)
    return Examples([examples[i] for i in train_index], [examples[i] for i in val_index], info)


def collate(batch: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on padding); with teacher
    targets also teacher_ids and teacher_logprobs [batch, length - 1, k] (zero where not scored)."""
    length = max(len(example[0]) for example in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, row_labels, *_) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(row_labels)
        mask[row, :len(ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if len(batch[0]) > 2:
        k = batch[0][2][0].shape[1]
        out["teacher_ids"] = torch.zeros((len(batch), length - 1, k), dtype=torch.long)
        out["teacher_logprobs"] = torch.zeros((len(batch), length - 1, k), dtype=torch.float32)
        scored = labels[:, 1:] != IGNORE_INDEX
        for row, (_, _, (top_ids, top_logprobs)) in enumerate(batch):
            out["teacher_ids"][row][scored[row]] = top_ids.long()
            out["teacher_logprobs"][row][scored[row]] = top_logprobs.float()
    return out


def scored_tokens(labels: torch.Tensor) -> int:
    """Tokens whose next-token loss counts (a label's first position has no prediction)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_nll(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """The training objective summed over the scored tokens, float32: -log p(token | tokens before),
    or with teacher targets in the batch the divergence from the teacher (distillation_loss)."""
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False).logits
    labels = batch["labels"].to(logits.device)  # dispatched (--device_map): where the head ran
    if "teacher_ids" in batch:
        scored = labels[:, 1:] != IGNORE_INDEX
        return distillation_loss(logits[:, :-1][scored], batch["teacher_ids"].to(logits.device)[scored],
                                 batch["teacher_logprobs"].to(logits.device)[scored])
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")


def distillation_loss(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Summed over positions: KL(p || q) of the teacher's distribution p from the student's q, both seen
    through the teacher's k most likely tokens and one bucket for the rest of the vocabulary (k + 1
    outcomes: the exact KL when k is the vocabulary, and never more than it otherwise). Its gradient
    is that of the soft cross-entropy of Hinton et al.'s distillation at temperature 1; keeping k
    log-probabilities per position keeps the teacher's targets small."""
    student = torch.log_softmax(logits.float(), dim=-1)
    student_top = student.gather(-1, teacher_ids)
    teacher_top = teacher_logprobs.float()
    kl = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    teacher_rest = (1 - teacher_top.exp().sum(-1)).clamp(min=0)
    student_rest = torch.log1p(-torch.logsumexp(student_top, dim=-1).exp().clamp(max=1 - 1e-6))
    rest = torch.where(teacher_rest > 0, teacher_rest * (teacher_rest.clamp(min=1e-30).log() - student_rest),
                       torch.zeros_like(kl))
    return (kl + rest).sum()


@torch.no_grad()
def teacher_targets(teacher: nn.Module, examples: list[tuple], top_k: int, micro_batch_size: int, pad_id: int,
                    device: torch.device | str) -> list[tuple]:
    """`examples` with the teacher's top_k next-token log-probabilities at each scored position:
    (ids, labels, (top_ids int32 [scored, k], top_logprobs float32 [scored, k])). The teacher runs
    once, in eval mode; k numbers per scored token are kept."""
    was_training = teacher.training
    teacher.eval()
    out = []
    for start in range(0, len(examples), micro_batch_size):
        chunk = examples[start:start + micro_batch_size]
        batch = collate([e[:2] for e in chunk], pad_id)
        logits = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         use_cache=False).logits[:, :-1].float()
        scored = batch["labels"][:, 1:] != IGNORE_INDEX
        for row, example in enumerate(chunk):
            top = torch.log_softmax(logits[row][scored[row].to(logits.device)], dim=-1).topk(top_k, dim=-1)
            out.append((example[0], example[1], (top.indices.to("cpu", torch.int32),
                                                 top.values.to("cpu", torch.float32))))
    teacher.train(was_training)
    return out


def distilled(examples: Examples, teacher: nn.Module, top_k: int, micro_batch_size: int, pad_id: int,
              device: torch.device | str) -> Examples:
    """Training and validation examples with the teacher's targets (teacher_targets): the LoRA stages
    then fit the teacher's next-token distribution on the scored tokens instead of the data's tokens."""
    if top_k < 1:
        raise LoraError(f"--lora_distill_top_k {top_k}: must be at least 1 (the teacher's most likely tokens kept)")
    return Examples(teacher_targets(teacher, examples.train, top_k, micro_batch_size, pad_id, device),
                    teacher_targets(teacher, examples.val, top_k, micro_batch_size, pad_id, device),
                    {**examples.info, "distillation": {"top_k": top_k, "loss": "KL(teacher || student) over the "
                                                         "teacher's top-k tokens and the rest"}})


@torch.no_grad()
def mean_loss(model: nn.Module, examples: list, micro_batch_size: int, pad_id: int,
              device: torch.device | str) -> float | None:
    """Mean token loss over `examples` (eval mode), None without examples."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), micro_batch_size):
        batch = collate(examples[start:start + micro_batch_size], pad_id)
        total += float(summed_nll(model, batch, device))
        tokens += scored_tokens(batch["labels"])
    model.train(was_training)
    return total / max(tokens, 1)


# ---------------------------------------------------------------------------------------- training

def low_rank_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules with factors u and v: LowRankLinear, and ColumnPreservedLinear (Duo-SVD's column
    level, whose kept columns c stay frozen like every dense linear)."""
    return linear_units(model, (LowRankLinear, ColumnPreservedLinear))


def factor_fingerprint(model: nn.Module) -> dict[str, int]:
    """Parameter count and ranks: what step 7 must leave exactly as it was."""
    from utils.model import count_parameters
    return {"parameters": count_parameters(model),
            **{f"rank:{name}": module.rank for name, module in low_rank_modules(model).items()}}


def stage_steps(train_examples: int, options: LoraOptions) -> int:
    """Optimizer steps of one stage: num_epochs passes over the training examples, capped by max_steps."""
    steps = math.ceil(options.num_epochs * train_examples / options.batch_size)
    return steps if options.max_steps is None else min(steps, options.max_steps)


def learning_rate_at(step: int, total: int, options: LoraOptions) -> float:
    """Linear warm-up (at most a tenth of the steps) then linear decay to 0, as Trainer's 'linear'."""
    warmup = min(options.warmup_steps, total // 10)
    if step < warmup:
        return options.learning_rate * (step + 1) / (warmup + 1)
    return options.learning_rate * max(0.0, (total - step) / max(1, total - warmup))


def _batches(count: int, options: LoraOptions, generator: torch.Generator):
    """Endless stream of index lists of batch_size examples: shuffled epoch after epoch (the last
    batch of an epoch may be smaller)."""
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, options.batch_size):
            yield order[start:start + options.batch_size]


def train_stage(model: nn.Module, factor: str, examples: Examples, options: LoraOptions,
                device: torch.device | str, pad_id: int, progress: bool = True) -> dict:
    """One SVD-LLM stage: LoRA adapters on the `factor` ('u' or 'v') of every LowRankLinear, the
    rest frozen; train; merge the adapters into the factors. The model is changed in place; it is on
    `device` during the stage (with options.offload_layers its decoder layers stay where they are and
    come to the device one at a time; with options.device_map accelerate spreads it over the devices for
    the stage) in the dtype sequential_lora gave it. Returns the stage's record."""
    if factor == FULL_FACTORS:
        return train_factors(model, examples, options, device, pad_id, progress)
    from peft import LoraConfig, get_peft_model
    modules = low_rank_modules(model)
    targets = [f"{name}.{factor}" for name in modules]
    _require_float_linears(model, targets)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(options.seed + STAGES.index(factor))  # adapter init (A random, B zero) and dropout
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=targets, bias="none")
    offload = next(model.parameters()).device  # where the layers stay with offload_layers
    stream = layer_stream(model)
    if stream is not None and not options.device_map:
        raise LoraError("the decoder layers are on disk (a streamed model): train with --device_map")
    with warnings.catch_warnings(), _real_stand_ins([model.get_submodule(t) for t in targets]):
        # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)  # float32 adapters also on a float16 / bfloat16 model
    checkpointing = options.gradient_checkpointing and not options.offload_layers  # (offloading checkpoints itself)
    if checkpointing:  # non-reentrant: no input needs requires_grad (the embeddings are frozen)
        # dispatched: the recomputation runs each layer to its end, so that accelerate's hooks put every
        # weight they brought in back on meta (stopping early leaves the last one real in each layer)
        model.activation_checkpointing_enable({"use_reentrant": False, "early_stop": not options.device_map})
    unstream, placed = None, None
    try:
        if options.offload_layers:
            unstream = _stream_layers(model, device, offload)
        if options.device_map:
            unstream, device, placed = _dispatch(model, device, options, stream)
        record = _train_adapters(peft_model, factor, len(targets), examples, options, device, pad_id, progress)
        if placed is not None:
            record["placement"] = {k: v for k, v in placed.items() if k != "offload_dir"}  # (removed after)
        if unstream is not None:
            unstream, undo = None, unstream
            undo()
        record["merged"] = _guard_keeps(record, options)
        if not record["merged"]:  # the guard: the adapters are dropped and the factors stay as they came
            peft_model.unload()
        elif stream is None:
            _merge_in_float32(peft_model, factor)
        else:
            _merge_streamed(model, stream, factor)
    except BaseException:  # an interrupted stage leaves the model as it was: adapters dropped unmerged
        if unstream is not None:
            unstream, undo = None, unstream
            undo()
        peft_model.unload()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        raise
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()
    merged = peft_model.unload()  # the adapters are merged (or dropped) already
    if merged is not model:
        raise AssertionError("peft returned a different model object after merging")
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, p.requires_grad))
    leftover = [name for name, _ in model.named_modules() if "lora_" in name]
    if leftover:
        raise AssertionError(f"adapters left after merging: {leftover[:3]}")
    return record


def _require_float_linears(model: nn.Module, names: list[str]) -> None:
    """The linears a stage trains must be float nn.Linear: a quantized one cannot learn."""
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise LoraError(f"{name} is a {type(module).__name__}, not a float linear: run step 7 before "
                            f"quantization (step 8)")


def _guard_keeps(record: dict, options: LoraOptions) -> bool:
    """--lora_guard: a stage is kept only where it lowered the validation loss (without it, always)."""
    return not (options.guard and record["val_loss_after"] >= record["val_loss_before"])


def train_factors(model: nn.Module, examples: Examples, options: LoraOptions, device: torch.device | str,
                  pad_id: int, progress: bool = True) -> dict:
    """The `factors` stage: u and v of every low-rank module trained themselves (AdamW, the stage
    loop of the LoRA stages), everything else frozen; with options.guard the factors are put back as
    they came unless the validation loss fell. In place; the model is on `device` in float32 (as
    sequential_lora gives it); returns the record."""
    modules = low_rank_modules(model)
    names = [f"{name}.{f}" for name in modules for f in FACTORS]
    _require_float_linears(model, names)
    factors = [model.get_submodule(name) for name in names]
    for name, linear in zip(names, factors):
        if linear.weight.dtype != torch.float32:
            raise LoraError(f"--lora_stages {FULL_FACTORS} trains the factors themselves in float32; "
                            f"{name} is {str(linear.weight.dtype).replace('torch.', '')}: add "
                            f"--lora_frozen_dtype float32")
    if layer_stream(model) is not None:
        raise LoraError(f"the decoder layers are on disk (a streamed model): --lora_stages {FULL_FACTORS} needs "
                        f"the model on the device; use u,v with --device_map")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    trained = [p for linear in factors for p in linear.parameters()]  # (u's bias too, where it has one)
    came = [p.detach().clone() for p in trained]

    def put_back() -> None:
        with torch.no_grad():
            for p, old in zip(trained, came):
                p.copy_(old)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        record = _train_adapters(model, FULL_FACTORS, len(modules), examples, options, device, pad_id, progress)
        record["merged"] = _guard_keeps(record, options)
        if not record["merged"]:  # the guard: the factors as they came
            put_back()
    except BaseException:  # an interrupted stage leaves the factors as they came
        put_back()
        raise
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
    return record


def _stream_layers(model: nn.Module, device: torch.device | str, offload: torch.device | str) -> Callable[[], None]:
    """Train with the decoder layers on `offload`: each comes to the device when it runs, and its forward
    is checkpointed (non-reentrant) around the move, so the backward pass brings it in again to
    recompute it instead of keeping its weights on the device. The trainable adapters (moved, so
    their gradients reach them) and copies of the non-layer modules are on the device meanwhile.
    Returns the function that puts everything back."""
    from torch.utils.checkpoint import checkpoint

    from utils.layerwise import layer_on_device
    from utils.model import decoder_layers, non_layer_modules_to
    trainable = [p for p in model.parameters() if p.requires_grad]
    homes = [p.device for p in trainable]
    for p in trainable:
        p.data = p.data.to(device)
    keep = frozenset(id(p) for p in trainable)
    restore_non_layer = non_layer_modules_to(model, device)
    layers = list(decoder_layers(model))

    def streamed(layer: nn.Module, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            with layer_on_device(layer, device, offload, keep=keep):
                return forward(*args, **kwargs)

        def call(*args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)
        return call

    for layer in layers:
        layer.forward = streamed(layer, layer.forward)  # an instance attribute, deleted by undo

    def undo() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        restore_non_layer()
        for p, home in zip(trainable, homes):
            p.data = p.data.to(home)
    return undo


def _dispatch(model: nn.Module, device: torch.device | str, options: LoraOptions,
              stream=None) -> tuple[Callable[[], None], torch.device, dict]:
    """Train with the model (its adapters added) dispatched by accelerate (utils.model.place_model:
    options.device_map within options.max_memory over the GPUs, the CPU and disk; decoder layers never
    split): an offloaded layer's frozen weights come to its execution device when it runs. The
    adapters are kept out of the offloading (their hooks removed, their own tensors on the execution
    device), so the optimizer updates the tensors the forward uses. Returns the function that removes
    the hooks and puts every original tensor back (the adapters with their trained values), the
    device the inputs go to, and the placement's record.

    `stream` (utils.model.LayerStream; the decoder layers on the meta device): the layers mapped to
    disk are read from the stream's safetensors files when they run (accelerate's offload_index, nothing
    written), those mapped elsewhere are read from them before the dispatch; undo puts every layer
    back on the meta device."""
    import shutil

    from accelerate.hooks import remove_hook_from_module, remove_hook_from_submodules

    from component.low_rank_linear import unshare_inputs
    from utils.model import ModelSpecError, place_model
    unshare_inputs(model)  # place_model would: each v its own tensor, so that the snapshot below is what it moves
    originals = [(store, key, tensor, tensor.device) for module in model.modules()
                 for store in (module._parameters, module._buffers) for key, tensor in store.items() if tensor is not None]
    index, materialise = (None, None) if stream is None else (_offload_index(model, stream),
                                                              lambda mapping: _materialise_placed(model, stream, mapping))
    try:
        placement = place_model(model, device, options.device_map, options.max_memory, options.offload_folder,
                                index, materialise)
    except ModelSpecError as error:
        raise LoraError(str(error)) from None
    for module in model.modules():  # trainable tensors that went to the offload: theirs back, on the device
        hook = getattr(module, "_hf_hook", None)
        mine = [(key, p) for key, p in module._parameters.items() if p is not None and p.requires_grad]
        if hook is not None and mine and any(p.device.type == "meta" for _, p in mine):
            execution = getattr(hook, "execution_device", None) or placement.input_device
            hook.offload = False  # nothing to read back: the original tensors are put in place below
            remove_hook_from_module(module)
            for key, _ in mine:
                original = next(t for s, k, t, _ in originals if s is module._parameters and k == key)
                original.data = original.data.to(execution)
                module._parameters[key] = original

    def undo() -> None:
        remove_hook_from_submodules(model)
        for name in [k for k, v in model.__dict__.items() if callable(v) and hasattr(nn.Module, k)]:
            del model.__dict__[name]  # accelerate's warnings around .to / .cuda of a dispatched model
        model.__dict__.pop("hf_device_map", None)
        for store, key, original, home in originals:
            current = store[key]
            if current is not original and original.requires_grad:  # a trained adapter: its values
                original.data = current.detach().to(home)
            elif original.device != home:
                original.data = original.data.to(home)
            store[key] = original
        if placement.offload_dir:
            shutil.rmtree(placement.offload_dir, ignore_errors=True)
    return undo, placement.input_device, placement.describe()


def _merge_in_float32(peft_model: nn.Module, factor: str) -> None:
    """Add each adapter's update to its factor in float32 and round the sum once to the factor's
    dtype (peft's own merge would round the update first, then the sum). LoraError when a merged
    entry does not fit that dtype."""
    from peft.tuners.lora import LoraLayer

    from component.low_rank_linear import largest_entry_fits
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.active_adapters:
            continue
        weight = module.get_base_layer().weight
        merged = weight.detach().float() + sum(module.get_delta_weight(a).float() for a in module.active_adapters)
        fits, largest = largest_entry_fits(weight.dtype, merged)
        if not fits:
            raise LoraError(f"after the LoRA {factor} stage {name} has |entry| {largest:.4g}, which does not fit in "
                            f"{weight.dtype}; rerun with --dtype float32 or a lower --learning_rate")
        weight.data = merged.to(weight.dtype)


# ---------------------------------------------------------------------------------------- layers on disk

BASE_LAYER = ".base_layer."  # where peft puts an adapted linear's own tensors


def _stored_name(name: str) -> str:
    """The checkpoint's name of a tensor of the adapted model (peft's base_layer level dropped)."""
    return name.replace(BASE_LAYER, ".")


@contextlib.contextmanager
def _real_stand_ins(linears: list[nn.Module]) -> Iterator[None]:
    """Give each linear whose weight is on the meta device (a layer left on disk) a real CPU stand-in of
    its shape and dtype (one element, expanded) while peft adds the adapters: peft builds them on the CPU,
    drawing the same random values in the same order as for a model in memory, and moves them to the
    base weight's device, which would be meta. The meta weights are put back afterwards."""
    swapped = []
    for linear in linears:
        weight = linear._parameters.get("weight")
        if weight is not None and weight.is_meta:
            linear._parameters["weight"] = nn.Parameter(torch.zeros((), dtype=weight.dtype).expand(weight.shape),
                                                       requires_grad=weight.requires_grad)
            swapped.append((linear, weight))
    try:
        yield
    finally:
        for linear, weight in swapped:
            weight.requires_grad_(linear._parameters["weight"].requires_grad)  # peft froze the base weight
            linear._parameters["weight"] = weight


def _layer_index(model: nn.Module, name: str) -> int | None:
    """The decoder layer a tensor name of the model belongs to, None for the non-layer tensors."""
    from utils.model import layer_prefix
    prefix = layer_prefix(model) + "."
    return int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else None


def _offload_index(model: nn.Module, stream) -> dict[str, dict]:
    """accelerate's offload index of every stored tensor of the model (the adapters are not; a tied
    head is stored under the embedding's name): the file the stream reads it from, its name there, and
    the model's dtype (a checkpoint saved in another is cast). Whatever the device map sends to disk is
    read from there: the layers (on the meta device) and the frozen non-layer tensors alike."""
    from utils.model import dtype_name
    return {name: {"safetensors_file": stream.weight_map[_stored_name(name)], "weight_name": _stored_name(name),
                   "dtype": dtype_name(tensor.dtype)}
            for name, tensor in model.state_dict(keep_vars=True).items() if _stored_name(name) in stream.weight_map}


def _load_layer(model: nn.Module, stream, index: int) -> None:
    """Decoder layer `index`'s meta tensors read from the stream's files, as new parameters / buffers on
    the CPU (the meta ones are what the dispatch's undo restores)."""
    from utils.model import decoder_layers, layer_prefix
    layer = decoder_layers(model)[index]
    meta = {name: tensor for name, tensor in layer.state_dict(keep_vars=True).items() if tensor.is_meta}
    if not meta:
        return
    prefix = f"{layer_prefix(model)}.{index}."
    # cast to the dtype the model was built in (the stream of a compressed model keeps the stored ones)
    read = stream.read([prefix + _stored_name(name) for name in meta],
                       {prefix + _stored_name(name): tensor for name, tensor in meta.items()})
    for name, old in meta.items():
        owner_name, _, key = name.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        tensor = read[prefix + _stored_name(name)]
        if key in owner._parameters:
            owner._parameters[key] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            owner._buffers[key] = tensor


def _materialise_placed(model: nn.Module, stream, mapping: dict[str, str | int]) -> None:
    """Before the dispatch: read every decoder layer that `mapping` does not send to disk."""
    from utils.model import decoder_layers, layer_prefix
    prefix = layer_prefix(model)
    for index in range(len(decoder_layers(model))):
        name = f"{prefix}.{index}"
        owner = max((key for key in mapping if key == "" or name == key or name.startswith(key + ".")), key=len)
        if mapping[owner] != "disk":
            _load_layer(model, stream, index)


def _merge_streamed(model: nn.Module, stream, factor: str) -> None:
    """The streamed form of _merge_in_float32: layer by layer, the layer read from the stream's files,
    its adapters merged in float32, the layer written to a new file in the stream's work folder
    (utils.io: stream.work_dir) and put back on the meta device. The stream reads the new files only
    once every layer is written, so an error leaves it as it was."""
    from safetensors.torch import save_file

    from utils.model import decoder_layers, layer_prefix
    layers = decoder_layers(model)
    moved: dict[str, str] = {}
    for index, layer in enumerate(layers):
        _load_layer(model, stream, index)
        _merge_in_float32(layer, factor)
        prefix = f"{layer_prefix(model)}.{index}."
        tensors = {prefix + _stored_name(name): tensor.detach().contiguous()
                   for name, tensor in layer.state_dict().items() if ".lora_" not in name}
        path = os.path.join(stream.work_dir, f"{factor}-{index:05d}.safetensors")
        save_file(tensors, path, metadata={"format": "pt"})
        moved.update((name, path) for name in tensors)
        del tensors
        layer.to("meta")
    stale = {stream.weight_map[name] for name in moved} - set(moved.values())
    stream.weight_map.update(moved)
    for path in stale:  # an earlier stage's files (never the checkpoint's own)
        if os.path.dirname(path) == stream.work_dir:
            os.remove(path)


def _train_adapters(peft_model: nn.Module, factor: str, n_modules: int, examples: Examples, options: LoraOptions,
                    device: torch.device | str, pad_id: int, progress: bool) -> dict:
    """The training loop of one stage on the model with its adapters; returns the stage's record."""
    from tqdm import tqdm
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    record = {"factor": factor, "modules": n_modules, "trainable_parameters": sum(p.numel() for p in trainable),
              "objective": "distillation KL" if examples.train and len(examples.train[0]) > 2 else "cross-entropy"}
    steps = stage_steps(len(examples.train), options)
    optimizer = torch.optim.AdamW(trainable, lr=options.learning_rate, weight_decay=0.0)
    # float16 frozen layers: scale the loss so that their gradients do not underflow (no-op otherwise)
    half = any(p.dtype == torch.float16 for p in peft_model.parameters() if not p.requires_grad)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=half)
    skipped = 0
    generator = torch.Generator().manual_seed(options.seed + 10 + STAGES.index(factor))
    batches = _batches(len(examples.train), options, generator)
    start = time.perf_counter()
    record["val_loss_before"] = mean_loss(peft_model, examples.val, options.micro_batch_size, pad_id, device)
    val_s = time.perf_counter() - start
    curve, window, val_curve, losses = [], [], [], []
    seen_examples = seen_tokens = 0
    peft_model.train()
    bar = tqdm(range(steps), desc=f"LoRA {factor}", disable=not progress, dynamic_ncols=True)
    for step in bar:
        indices = next(batches)
        micro = [collate([examples.train[i] for i in indices[k:k + options.micro_batch_size]], pad_id)
                 for k in range(0, len(indices), options.micro_batch_size)]
        tokens = sum(scored_tokens(b["labels"]) for b in micro)
        total = 0.0
        for batch in micro:  # gradient accumulation: the mean over the whole batch's tokens
            loss = summed_nll(peft_model, batch, device) / max(tokens, 1)
            scaler.scale(loss).backward()
            total += float(loss.detach())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, options.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, steps, options)
        scale = scaler.get_scale() if half else None
        scaler.step(optimizer)  # skipped when a gradient overflowed (float16 only)
        scaler.update()
        skipped += bool(half and scaler.get_scale() < scale)
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        window.append(total)
        seen_examples += len(indices)
        seen_tokens += tokens
        if len(window) == options.logging_steps or step == steps - 1:
            curve.append([step + 1, round(sum(window) / len(window), 6)])
            window = []
        if options.eval_steps and (step + 1) % options.eval_steps == 0 and step < steps - 1 and examples.val:
            val_start = time.perf_counter()
            val_curve.append([step + 1, round(mean_loss(peft_model, examples.val, options.micro_batch_size,
                                                        pad_id, device), 6)])
            val_s += time.perf_counter() - val_start
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{learning_rate_at(step, steps, options):.2e}")
    bar.close()
    peft_model.eval()
    val_start = time.perf_counter()
    record["val_loss_after"] = mean_loss(peft_model, examples.val, options.micro_batch_size, pad_id, device)
    val_s += time.perf_counter() - val_start
    tail = losses[-min(len(losses), options.logging_steps):]
    if half:
        record.update(loss_scaling=True, overflow_skipped_steps=skipped)
    record.update(steps=steps, examples_seen=seen_examples, tokens_seen=seen_tokens,
                  train_loss_first=round(losses[0], 6) if losses else None,
                  train_loss_final=round(sum(tail) / len(tail), 6) if tail else None,
                  train_loss_curve=curve, val_loss_curve=val_curve,
                  seconds=round(time.perf_counter() - start, 3), validation_s=round(val_s, 3))
    return record


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0  # padded positions are masked out of attention and loss: any id will do


def sequential_lora(model: nn.Module, tokenizer, examples: Examples, options: LoraOptions,
                    device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """SVD-LLM's LoRA fine-tuning of a low-rank model, U stage then V stage (options.stages), in
    place; returns the "lora" record. Ranks and parameter count are checked to be unchanged."""
    import peft
    options.check()
    options.check_examples(examples)
    if not low_rank_modules(model):
        raise LoraError("the model has no low-rank modules: step 7 fine-tunes the factors of a compressed model "
                        "(run step 3 first)")
    before = factor_fingerprint(model)
    first = next(model.parameters())
    home_dtype, home_device = first.dtype, first.device
    del first  # (no reference of ours keeps a tensor alive that a dispatched stage frees)
    home = _float_dtypes(model)
    pad_id = _pad_id(tokenizer)
    stages = []
    upcast = options.frozen_dtype == "float32"
    stream = layer_stream(model)
    if stream is not None:
        from utils.layerwise import fix_mmap_threshold
        _stream_work_dir(model, stream, options)
        fix_mmap_threshold()  # each layer read and freed in turn: as the streamed layer walk does (docs/scale.md)
    for factor in options.stages:
        # exact from float16 / bfloat16; without the upcast only the adapters are float32
        float32 = upcast or factor == FULL_FACTORS  # (the factors themselves learn in float32, then are rounded once)
        model.to(device=None if options.offload_layers or options.device_map else device,
                 dtype=torch.float32 if float32 else None)
        try:
            stages.append(train_stage(model, factor, examples, options, device, pad_id, progress))
            if float32 and home_dtype != torch.float32:
                _check_fits(model, home_dtype, factor)
        finally:
            if stream is None:  # (streamed: the dispatch's undo put every tensor home; the layers are on meta)
                model.to(device=home_device)
            _restore_dtypes(model, home)
        print(f"LoRA {factor}: {stages[-1]['steps']} steps, train loss {_fmt(stages[-1]['train_loss_first'])} -> "
              f"{_fmt(stages[-1]['train_loss_final'])}, validation loss {_fmt(stages[-1]['val_loss_before'])} -> "
              f"{_fmt(stages[-1]['val_loss_after'])} ({stages[-1]['seconds']:.1f} s)"
              + ("" if stages[-1]["merged"] else "; not merged (--lora_guard: the validation loss did not fall)"))
    after = factor_fingerprint(model)
    if after != before:
        changed = sorted(k for k in before if before[k] != after.get(k))
        raise AssertionError(f"step 7 changed the architecture: {changed[:3]}")
    settings = asdict(options)
    settings["stages"] = list(options.stages)
    home_name = str(home_dtype).replace("torch.", "")
    if upcast:
        train_dtype = "float32"
    else:  # per stage: a factors stage trains u and v themselves in float32, an adapter stage only its adapters
        kinds = [(factor, "factors float32" if factor == FULL_FACTORS else f"frozen {home_name}, adapters float32")
                 for factor in options.stages]
        distinct = {kind for _, kind in kinds}
        train_dtype = distinct.pop() if len(distinct) == 1 else "; ".join(f"{f}: {kind}" for f, kind in kinds)
    return {"data": examples.info, **settings, "train_dtype": train_dtype, "saved_dtype": home_name,
            "peft_version": peft.__version__, "trained": ("LoRA adapters on the factor of each stage only"
            + (f"; u and v themselves in the {FULL_FACTORS} stage" if FULL_FACTORS in options.stages else "")
            + "; embeddings, norms, lm_head and dense linears frozen"), "parameters": after["parameters"],
            "stage_records": stages}


def streams_layers(options: LoraOptions, model_path: str | None) -> bool:
    """Whether step 7 reads --model_path with its decoder layers left on disk (utils.io.load_compressed
    stream=True): with --device_map and --offload_folder (the merged layers of each stage are written
    there), the frozen weights in the model's dtype, and a compressed model directory."""
    return bool(options.device_map and options.offload_folder and options.frozen_dtype == "model"
                and model_path and os.path.isdir(model_path))


def _stream_work_dir(model: nn.Module, stream, options: LoraOptions) -> None:
    """A fresh folder inside --offload_folder for the layers each stage merges (stream.work_dir), removed
    when the model is freed or the process exits; the stream reads them from there, the output is
    written from them."""
    import shutil
    import tempfile
    import weakref
    if options.frozen_dtype != "model" or not options.device_map:
        raise LoraError("the decoder layers are on disk (a streamed model): train with --device_map and "
                        "--lora_frozen_dtype model")
    if getattr(stream, "work_dir", None) is None:
        if options.offload_folder:
            os.makedirs(options.offload_folder, exist_ok=True)
        stream.work_dir = tempfile.mkdtemp(prefix="svd-lora-layers-", dir=options.offload_folder)
        weakref.finalize(model, shutil.rmtree, stream.work_dir, True)


def _float_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """dtype of every floating parameter and buffer (a float16 model may keep float32 buffers)."""
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {name: t.dtype for name, t in tensors if t.is_floating_point()}


def _restore_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast each floating parameter and buffer back to its recorded dtype, in place (ties kept)."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for key, param in module._parameters.items():
            if param is not None and dtypes.get(prefix + key, param.dtype) != param.dtype:
                param.data = param.data.to(dtypes[prefix + key])
        for key, buffer in module._buffers.items():
            if buffer is not None and dtypes.get(prefix + key, buffer.dtype) != buffer.dtype:
                module._buffers[key] = buffer.to(dtypes[prefix + key])


def _check_fits(model: nn.Module, dtype: torch.dtype, stage: str) -> None:
    from component.low_rank_linear import largest_entry_fits
    for name, module in low_rank_modules(model).items():
        for factor in (FACTORS if stage == FULL_FACTORS else (stage,)):
            fits, largest = largest_entry_fits(dtype, getattr(module, factor).weight)
            if not fits:
                raise LoraError(f"after the LoRA {stage} stage {name}.{factor} has |entry| {largest:.4g}, which does "
                                f"not fit in {dtype}; rerun with --dtype float32 or a lower --learning_rate")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def with_lora_record(compression: dict, record: dict) -> dict:
    """The compression block with step 7's record (an earlier one kept under 'previous')."""
    if compression.get("lora"):
        record = {**record, "previous": compression["lora"]}
    return {**compression, "lora": record}


# ---------------------------------------------------------------------------------------- command line

def add_placement_arguments(group: argparse._ArgumentGroup, device_map_help: str, offload_removed: str) -> None:
    """--device_map, --max_memory, --offload_folder (accelerate dispatch, utils.model.place_model): the same
    flags in compress.py (steps 4-7, 9) and in this module's CLI; only what the help says of their use differs."""
    group.add_argument("--device_map", default=None, choices=["auto", "balanced", "sequential"], help=device_map_help)
    group.add_argument("--max_memory", default=None,
                       help="budget per device for --device_map, e.g. 0=70GiB,1=70GiB,cpu=200GiB (default: what each "
                            "has free); what does not fit goes to disk")
    group.add_argument("--offload_folder", default=None,
                       help=f"where disk-offloaded weights go (a fresh folder inside it, {offload_removed}; default: "
                            f"the system's temporary folder)")


def add_lora_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Step 7's flags, named as SVD-LLM's utils/LoRA.py (shared by compress.py and this file)."""
    defaults = LoraOptions()
    p = parser
    p.add_argument("--data_path", default=None,
                   help="training data: an Alpaca .json/.jsonl (instruction, input, output) or a text file "
                        "(slices such as FILE[0:0.8]); offline Alpaca-form sample: "
                        "../shared/data/alpaca_demo/alpaca_en_demo.jsonl")
    p.add_argument("--lora_r", type=int, default=defaults.r, help="adapter rank (default %(default)s)")
    p.add_argument("--lora_alpha", type=float, default=defaults.alpha,
                   help="adapter scale alpha; the update is (alpha / r) B A (default %(default)s)")
    p.add_argument("--lora_dropout", type=float, default=defaults.dropout, help="dropout on the adapters' input "
                   "(default %(default)s)")
    p.add_argument("--batch_size", type=int, default=defaults.batch_size,
                   help="examples per optimizer step (default %(default)s)")
    p.add_argument("--micro_batch_size", type=int, default=defaults.micro_batch_size,
                   help="examples per forward pass; gradients accumulate to --batch_size (default %(default)s)")
    p.add_argument("--num_epochs", type=float, default=defaults.num_epochs,
                   help="passes over the training data per stage (default %(default)s)")
    p.add_argument("--learning_rate", type=float, default=defaults.learning_rate, help="peak AdamW learning rate "
                   "(default %(default)s)")
    p.add_argument("--cutoff_len", type=int, default=256, help="tokens per example at most / per text window "
                   "(default %(default)s)")
    p.add_argument("--val_set_size", type=int, default=None,
                   help="examples held out for the validation loss (default: 2000 as SVD-LLM, at most a tenth "
                        "of the examples; 0: none)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps per stage at most (short runs)")
    p.add_argument("--warmup_steps", type=int, default=defaults.warmup_steps,
                   help="linear warm-up steps, at most a tenth of a stage's steps (default %(default)s)")
    p.add_argument("--eval_steps", type=int, default=None,
                   help="also log the validation loss every N steps (default: before and after each stage)")
    p.add_argument("--train_on_inputs", action="store_true",
                   help="Alpaca data: score the prompt tokens too (default: the response only)")
    p.add_argument("--lora_stages", default="u,v",
                   help="stages in order: u,v (SVD-LLM's sequential recipe), or one of them; factors: u and v "
                        "themselves trained (no adapters; float32, the model on the device)")
    p.add_argument("--lora_frozen_dtype", choices=FROZEN_DTYPES, default=defaults.frozen_dtype,
                   help="model: the frozen weights stay in the model's dtype, adapters float32; "
                        "float32: the whole model in float32 during training")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass (less activation memory, one more forward)")
    p.add_argument("--lora_offload_layers", action="store_true",
                   help="keep the decoder layers on the host and bring one at a time to the device (forward, and "
                        "again to recompute it in the backward pass): for a model larger than the device")
    p.add_argument("--lora_distill_top_k", type=int, default=0, metavar="K",
                   help="distillation: train on the original model's next-token distributions at the scored tokens "
                        "(its K most likely tokens and the rest, KL) instead of the data's tokens; the original "
                        "(the compressed model's base model) runs once over the data first (default 0: off)")
    p.add_argument("--lora_guard", action="store_true",
                   help="merge a stage's adapters only if they lowered the validation loss, else keep the factors "
                        "as they were (SVD-LLM merges every stage)")


def options_from_args(args: argparse.Namespace) -> LoraOptions:
    from utils.model import parse_max_memory
    try:
        max_memory = parse_max_memory(getattr(args, "max_memory", None))
    except ValueError as error:
        raise LoraError(str(error)) from None
    if getattr(args, "offload_folder", None) and os.path.exists(args.offload_folder) \
            and not os.path.isdir(args.offload_folder):
        raise LoraError(f"--offload_folder {args.offload_folder}: exists and is not a folder")
    options = LoraOptions(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          learning_rate=args.learning_rate, num_epochs=args.num_epochs, batch_size=args.batch_size,
                          micro_batch_size=args.micro_batch_size, max_steps=args.max_steps,
                          warmup_steps=args.warmup_steps, eval_steps=args.eval_steps, seed=args.seed,
                          stages=tuple(s.strip() for s in args.lora_stages.split(",") if s.strip()),
                          frozen_dtype=args.lora_frozen_dtype, gradient_checkpointing=args.gradient_checkpointing,
                          offload_layers=args.lora_offload_layers, device_map=getattr(args, "device_map", None),
                          max_memory=max_memory, offload_folder=getattr(args, "offload_folder", None),
                          guard=getattr(args, "lora_guard", False),
                          distill_top_k=getattr(args, "lora_distill_top_k", 0))
    options.check()
    return options


def validate_args(args: argparse.Namespace, chained: bool = False) -> LoraOptions:
    """Every step-7 check that needs no model (LoraError). chained: the model comes from step 3."""
    from utils.io import is_compressed_model, read_json
    from utils.outputs import check_output_path
    options = options_from_args(args)
    if not args.data_path:
        raise LoraError("--data_path is required: an Alpaca .json/.jsonl or a text file to train on "
                        "(e.g. ../shared/data/alpaca_demo/alpaca_en_demo.jsonl)")
    if args.cutoff_len < 2:
        raise LoraError(f"--cutoff_len {args.cutoff_len}: must be at least 2 tokens")
    if args.val_set_size is not None and args.val_set_size < 0:
        raise LoraError(f"--val_set_size {args.val_set_size}: must be 0 or more")
    if options.guard and args.val_set_size == 0:  # (checked again on the examples: a default split may be empty)
        raise LoraError(GUARD_NEEDS_VALIDATION)
    check_data_path(args.data_path)
    if not args.save_path:
        raise LoraError("--save_path (--output_dir) is required: step 7 writes the fine-tuned model there")
    protected = []
    if not chained:
        if not args.model_path:
            raise LoraError("step 7 fine-tunes a compressed model: give --model_path (--prune_model), "
                            "or run step 3 in the same command")
        if not os.path.exists(args.model_path):
            raise LoraError(f"--model_path {args.model_path}: no such file or directory")
        if not is_compressed_model(args.model_path):
            raise LoraError(f"--model_path {args.model_path}: not a compressed model (no 'compression' block in "
                            f"its config.json); run step 3 first")
        if not args.model_path.endswith(".pt"):
            block = read_json(os.path.join(args.model_path, "config.json"))["compression"]
            if block.get("quantization"):
                raise LoraError(f"--model_path {args.model_path}: quantized (step 8); LoRA trains float factors, "
                                f"so run step 7 before step 8")
            if not block.get("ranks"):
                raise LoraError(f"--model_path {args.model_path}: has no low-rank modules; step 7 fine-tunes "
                                f"the factors of a model compressed by step 3")
        protected = [args.model_path]
    check_output_path(args.save_path, "model", args.overwrite, protected)
    return options


def run(model: nn.Module, tokenizer, compression: dict, args: argparse.Namespace, options: LoraOptions,
        device: str, teacher: Callable[[], nn.Module] | None = None) -> dict:
    """Read the data, train both stages, return the new compression block (the caller saves).
    teacher: loads the original model, for --lora_distill_top_k."""
    if compression.get("quantization"):
        raise LoraError("the model is quantized (step 8); LoRA trains float factors, so run step 7 before step 8")
    examples = load_examples(args.data_path, tokenizer, args.cutoff_len, args.val_set_size, args.seed,
                             args.train_on_inputs)
    print(f"LoRA data: {examples.info['format']} {args.data_path}: {len(examples.train)} training, "
          f"{len(examples.val)} validation examples; {stage_steps(len(examples.train), options)} steps per stage "
          f"of {options.batch_size} ({options.micro_batch_size} x {options.accumulation})")
    cost = lora_estimate(model, len(examples.train), options, args.cutoff_len, device, args.seed)
    print(cost.message())
    if options.distill_top_k:
        if teacher is None:
            raise LoraError("--lora_distill_top_k needs the original model: the compressed model names none")
        start = time.perf_counter()
        original = teacher()
        examples = distilled(examples, original, options.distill_top_k, options.micro_batch_size,
                             _pad_id(tokenizer), device)
        del original
        print(f"LoRA distillation: the original's top {options.distill_top_k} next-token log-probabilities at "
              f"every scored token ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    record = sequential_lora(model, tokenizer, examples, options, device)
    record["cost"] = cost.record(time.perf_counter() - start)  # the estimate printed before, and what it took
    return with_lora_record(compression, record)


def lora_estimate(model: nn.Module, train_examples: int, options: LoraOptions, cutoff_len: int, device,
                  seed: int = 0):
    """Both stages' steps x examples per step x one timed window of cutoff_len tokens through the
    model, three times (forward and backward); utils.cost."""
    from utils.cost import estimate, window_seconds
    unit = window_seconds(model, cutoff_len, device, seed)
    steps = stage_steps(train_examples, options)
    cheaper = [("--max_steps 50", 50 / steps)] if steps > 50 else []
    if cutoff_len > 128:
        cheaper.append(("--cutoff_len 128", 128 / cutoff_len))
    return estimate("LoRA (step 7)", {"stages": len(options.stages), "steps": steps,
                                      "examples per step": options.batch_size},
                    f"one window of {cutoff_len} tokens through the model on {device} (at most; examples are "
                    f"often shorter)", unit["window_s"], 3.0, cheaper)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", "--prune_model", dest="model_path", default=None,
                   help="the compressed model to fine-tune (directory or .pt); --prune_model is SVD-LLM's name")
    p.add_argument("--save_path", "--output_dir", dest="save_path", default=None,
                   help="where the fine-tuned compressed model goes; --output_dir is SVD-LLM's name")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of this tool at --save_path")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the model is loaded and saved in (auto: as it was); see --lora_frozen_dtype")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split, adapters, dropout, order")
    add_lora_arguments(p.add_argument_group("LoRA (SVD-LLM's utils/LoRA.py flags)"))
    add_placement_arguments(p.add_argument_group("placement (compress.py's flags of the same names)"),
                            "dispatch the model with accelerate over GPUs, CPU and disk for training instead of "
                            "moving it whole to --device (a model larger than one device; adapters stay on the "
                            "execution devices)", "removed after each stage")
    return p


def main(argv: list[str] | None = None) -> int:
    from utils.data import DatasetError
    from utils.io import CompressedModelError, load_compressed, save_compressed
    from utils.model import DTYPES, default_device, load_tokenizer, resolve_model
    from utils.outputs import OutputError
    args = build_parser().parse_args(argv)
    try:
        options = validate_args(args)
        args.device = args.device or default_device()
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise LoraError(f"--device {args.device}: no CUDA device here; use --device cpu")
        if not (args.device == "cpu" or args.device.startswith("cuda")):
            raise LoraError(f"--device {args.device}: use cpu, cuda or cuda:N")
    except (LoraError, DatasetError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        model, tokenizer, compression = load_compressed(args.model_path,
                                                        None if args.dtype == "auto" else DTYPES[args.dtype],
                                                        stream=streams_layers(options, args.model_path))
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve_model(compression["base_model"]))
        def original() -> nn.Module:
            from evaluater import load_base
            return load_base(compression, next(model.parameters()).dtype, args.seed).to(args.device)
        compression = run(model, tokenizer, compression, args, options, args.device,
                          original if compression.get("base_model") else None)
        save_compressed(model, tokenizer, args.save_path, compression, overwrite=args.overwrite,
                        protected=(args.model_path,))
    except (LoraError, DatasetError, CompressedModelError, OutputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"LoRA: saved -> {args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
