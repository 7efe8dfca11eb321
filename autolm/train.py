"""LoRA fine-tuning on chat or prompt/completion JSONL, with the loss on completion tokens only."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

import torch

from ._util import world
from .errors import AutolmError
from .lora import PeftModel
from .models import CausalLM


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    gradient_checkpointing: bool = False
    save_every: int | None = None  # optimizer steps between adapter saves
    seed: int = 0
    progress: bool = True


def load_examples(path: str, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """JSONL rows -> (input_ids, labels) with -100 on prompt tokens.

    A row is {"messages": [...]} (the last message is the assistant's answer, trained on) or
    {"prompt": ..., "completion": ...}.
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AutolmError(f"{path}:{n}: not valid JSON ({e})") from None
            if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
                msgs = row["messages"]
                if msgs[-1].get("role") != "assistant":
                    raise AutolmError(f"{path}:{n}: the last message must be the assistant's answer")
                prompt = tokenizer.apply_chat_template(
                    msgs[:-1], add_generation_prompt=True, return_dict=False
                )
                full = tokenizer.apply_chat_template(msgs, return_dict=False)
                if full[: len(prompt)] != prompt:
                    raise AutolmError(f"{path}:{n}: the chat template does not render the prompt as a prefix")
            elif (
                isinstance(row, dict)
                and isinstance(row.get("prompt"), str)
                and isinstance(row.get("completion"), str)
            ):
                prompt = tokenizer.encode(row["prompt"])
                full = prompt + tokenizer.encode(row["completion"], add_special_tokens=False)
                if tokenizer.eos_token_id is not None:
                    full.append(tokenizer.eos_token_id)
            else:
                raise AutolmError(
                    f"{path}:{n}: expected {{'messages': [...]}} or {{'prompt': ..., 'completion': ...}}"
                )
            full = full[:max_length]
            labels = [-100] * min(len(prompt), len(full)) + full[len(prompt) :]
            out.append((full, labels))
    if not out:
        raise AutolmError(f"{path}: no training examples")
    return out


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on padding)."""
    from torch.nn.utils.rnn import pad_sequence

    def pad(rows, value):
        return pad_sequence(
            [torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=value
        )

    return {
        "input_ids": pad([x for x, _ in batch], pad_id),
        "attention_mask": pad([[1] * len(x) for x, _ in batch], 0),
        "labels": pad([y for _, y in batch], -100),
    }


def finetune(
    peft_model, tokenizer, data_path: str, out_dir: str, config: TrainConfig | None = None
) -> list[float]:
    """Train the active LoRA adapter with AdamW (or, given a plain model, every parameter: full fine-tuning);
    save the adapter (or the model) to out_dir, and every save_every steps. Returns the losses.

    Under torch.distributed (a model from distributed.fsdp_from_pretrained) every rank draws the same
    batches and takes its share of each one's rows. The loss is summed over the rank's labelled tokens
    and divided by the whole batch's count (times the world size, which FSDP's gradient average
    divides out), so the gradients, the adapter and the losses equal one process's.
    """
    cfg = config or TrainConfig()
    rank, size = world()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    examples = load_examples(data_path, tokenizer, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise AutolmError("nothing to train: the model has no trainable (LoRA) parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, cfg.epochs * batches_per_epoch // cfg.grad_accum)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    peft_model.train()
    losses: list[float] = []
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc="finetune", unit="step")
    step, micro = 0, 0
    try:
        while step < total_steps:
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                rows = [examples[i] for i in order[start : start + cfg.batch_size]]
                items = max(1, sum(sum(y != -100 for y in labels[1:]) for _, labels in rows))
                mine = rows[rank::size] or [
                    ([pad_id], [-100])
                ]  # a rank without rows still joins the collectives
                batch = {k: v.to(base.device) for k, v in collate(mine, pad_id).items()}
                loss = peft_model(**batch, num_items_in_batch=items).loss
                (loss * (size / cfg.grad_accum)).backward()
                losses.append(_sum_over_ranks(loss.detach(), size))
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(losses[-cfg.grad_accum :]) / cfg.grad_accum:.4f}")
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    peft_model.save_pretrained(os.path.join(out_dir, f"checkpoint-{step}"))
                if step >= total_steps:
                    break
    finally:
        if bar is not None:
            bar.close()
        base.gradient_checkpointing_disable()
        peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return losses


def _sum_over_ranks(t: torch.Tensor, size: int) -> float:
    if size > 1:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
    return t.item()


class SavePretrainedMixin:
    """Mixed into transformers' Trainer (or a TRL trainer) so that save_model, and the checkpoints it writes, go
    through an autolm model's own save_pretrained: a PeftModel's adapters in peft's format, a model in the HF layout.

        class Trainer(autolm.train.SavePretrainedMixin, transformers.Trainer): pass

    Trainer's own save_model saves only transformers' and peft's classes that way and writes a bare state dict for
    any other module (a full model where an adapter was meant); subclassing Trainer is its documented way to change
    what it does. Other models go to the Trainer's own save_model unchanged."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not isinstance(self.model, (PeftModel, CausalLM)):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(
            self.args, os.path.join(output_dir, "training_args.bin")
        )  # as Trainer: its arguments beside
        return None
