"""TRL's other trainers with only the import changed (`from autolm import AutoModelForCausalLM`): RLOO, KTO, CPO,
ORPO, TPO, knowledge distillation (DistillationTrainer, GKD), Online DPO, A*-PO and SDFT train an autolm model, in
full or through their peft_config, to the logged metrics and final weights of transformers' model, step for step
(test_dropin_train.py has SFT, DPO and GRPO; test_heads.py the RewardTrainer).

Left out, each adding no mechanism these do not cover: GMPOTrainer (GRPOTrainer's sampling and loss with another
ratio), SDPOTrainer (SDFT's self-distillation plus GRPO's reward sampling), IWOPDTrainer and GOLDTrainer (GKD's
on-policy teacher; GOLD's cross-tokenizer loss needs a byte-level tokenizer), the BEMA callback (DPO). The async and
server trainers need a vLLM server; TRL 1.16 has no XPO, Nash-MD or PRM trainer.

Tolerances: the runs make the same calls on the same tensors, so they agree to float32 rounding (1e-5). Online DPO
and A*-PO run in float32 (bf16=False) on left-padded prompts: there autolm counts positions over the real tokens
(a left-padded row gives its unpadded logits) where transformers' forward counts slots, the same rotary angles up to
a shift that float32 rounds alike and bfloat16 does not."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import write_char_tokenizer

import autolm

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import otherwise

STEPS = 2
PROMPTS = ["hello ", "the quick ", "abc "]
PAIRS = {
    "prompt": PROMPTS * 2,
    "chosen": ["world", "brown fox", "def"] * 2,
    "rejected": ["zzz", "qqq", "xyz"] * 2,
}
CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
SKIP = frozenset({"learning_rate", "epoch", "step_time"})  # the schedule and the clock, not the model


@pytest.fixture(scope="module")
def dirs(checkpoint):
    """(student, teacher): the tiny Llama, and a tiny Qwen2 with its own weights on the same vocabulary."""
    out = []
    for name in ("llama_gqa_llama3_sharded", "qwen2_tied_bias"):
        directory, _ = checkpoint(name)
        write_char_tokenizer(directory)
        out.append(directory)
    return out


def _tokenizer(directory, padding_side: str | None = None):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(directory)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.chat_template = CHAT
    if padding_side:
        tok.padding_side = padding_side
    return tok


def _args(config_class, tmp_path, lib, **kwargs):
    return config_class(
        output_dir=str(tmp_path / lib.__name__), max_steps=STEPS, per_device_train_batch_size=2, logging_steps=1,
        learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no", **kwargs,
    )  # fmt: skip


def _lora(lora: bool):
    import peft

    return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None


def _reward(completions, **_):
    return [float(len(c)) for c in completions]


def _messages():
    return [
        [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        for p, c in zip(PAIRS["prompt"], PAIRS["chosen"])
    ]


def _compare(make, skip: frozenset[str] = frozenset(), atol: float = 1e-5, rtol: float = 1e-5) -> list[dict]:
    """make(lib) -> a trainer over lib's model; trained from the same seed with transformers and with autolm, the
    logged rows (but the keys in `skip`) and the trainable parameters at the end must agree. Returns
    transformers' rows."""
    import transformers

    skip = SKIP | skip
    runs = []
    for lib in (transformers, autolm):
        torch.manual_seed(0)  # the LoRA adapter TRL's peft_config makes draws from it
        trainer = make(lib)
        trainer.train()
        rows = [{k: v for k, v in h.items() if k not in skip and isinstance(v, (int, float))}
                for h in trainer.state.log_history if "loss" in h]  # fmt: skip
        weights = {
            n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
        }
        runs.append((rows, weights))
    (ref_rows, ref_weights), (rows, weights) = runs
    assert len(rows) == len(ref_rows) == STEPS
    assert [sorted(r) for r in rows] == [sorted(r) for r in ref_rows]
    assert all(r["grad_norm"] > 0 for r in ref_rows)  # it trains
    torch.testing.assert_close(rows, ref_rows, atol=atol, rtol=rtol)
    assert weights and sorted(weights) == sorted(ref_weights)
    torch.testing.assert_close(weights, ref_weights, atol=atol, rtol=rtol)
    return ref_rows


@pytest.mark.parametrize("lora", [False, True])
def test_rloo_trainer(dirs, tmp_path, lora):
    """RLOOTrainer: the model samples groups of completions through its own generate, a reward function scores
    them, and the leave-one-out advantages train it (rewards, KL, entropy, loss, gradient norms)."""
    import datasets
    import trl

    def make(lib):
        args = _args(trl.RLOOConfig, tmp_path, lib, num_generations=2, max_completion_length=8)
        return trl.RLOOTrainer(
            model=lib.AutoModelForCausalLM.from_pretrained(dirs[0]), reward_funcs=_reward, args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=_tokenizer(dirs[0]),
            peft_config=_lora(lora),
        )  # fmt: skip

    rows = _compare(make)
    assert rows[0]["reward_std"] > 0  # completions that differ


@pytest.mark.parametrize("lora", [False, True])
def test_kto_trainer(dirs, tmp_path, lora):
    """KTOTrainer on unpaired desirable / undesirable completions, against a reference model (a copy, or the
    adapter disabled) and its KL batch."""
    import datasets
    import trl

    data = {"prompt": PROMPTS * 2, "completion": ["world", "brown fox", "def", "zzz", "qqq", "xyz"],
            "label": [True] * 3 + [False] * 3}  # fmt: skip

    def make(lib):
        return trl.KTOTrainer(
            model=lib.AutoModelForCausalLM.from_pretrained(dirs[0]), args=_args(trl.KTOConfig, tmp_path, lib,
            max_length=32), train_dataset=datasets.Dataset.from_dict(data), processing_class=_tokenizer(dirs[0]),
            peft_config=_lora(lora),
        )  # fmt: skip

    rows = _compare(make)
    assert rows[-1]["kl"] != 0  # the policy moved off the reference


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("name", ["cpo", "orpo", "tpo"])
def test_preference_trainers(dirs, tmp_path, name, lora):
    """trl.experimental's CPO and ORPO (chosen / rejected through one concatenated forward; they read
    config.is_encoder_decoder) and TPO (a third, gold completion) on preference pairs."""
    import datasets
    from trl.experimental import cpo, orpo, tpo

    trainer_class, config_class = {
        "cpo": (cpo.CPOTrainer, cpo.CPOConfig),
        "orpo": (orpo.ORPOTrainer, orpo.ORPOConfig),
        "tpo": (tpo.TPOTrainer, tpo.TPOConfig),
    }[name]
    data = dict(PAIRS, reference=["world!", "brown dog", "defg"] * 2) if name == "tpo" else PAIRS

    def make(lib):
        return trainer_class(
            model=lib.AutoModelForCausalLM.from_pretrained(dirs[0]), args=_args(config_class, tmp_path, lib,
            max_length=32), train_dataset=datasets.Dataset.from_dict(data), processing_class=_tokenizer(dirs[0]),
            peft_config=_lora(lora),
        )  # fmt: skip

    # CPO / ORPO log the mean of all logits, right padding's included, where autolm lets a padding query see
    # itself (transformers masks it): every logged value but those, and the weights, are the same
    rows = _compare(make, skip=frozenset({"logits/chosen", "logits/rejected"}))
    assert all(r["loss"] > 0 for r in rows)


@pytest.mark.parametrize("lora", [False, True])
def test_distillation_trainer(dirs, tmp_path, lora):
    """DistillationTrainer: a Qwen2 teacher (autolm's too, under no_grad) and the Llama student, through the
    backbone (`base_model`), `get_output_embeddings` and `logits_to_keep`, the student sampling on-policy."""
    import datasets
    import trl

    def make(lib):
        args = _args(trl.DistillationConfig, tmp_path, lib, max_completion_length=8)
        return trl.DistillationTrainer(
            model=lib.AutoModelForCausalLM.from_pretrained(dirs[0]),
            teacher_model=lib.AutoModelForCausalLM.from_pretrained(dirs[1]), args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=_tokenizer(dirs[0]),
            peft_config=_lora(lora),
        )  # fmt: skip

    rows = _compare(make)
    assert all(r["loss"] > 0 for r in rows)  # a teacher that differs


@pytest.mark.parametrize("lora", [False, True])
def test_gkd_trainer(dirs, tmp_path, lora):
    """trl.experimental's GKDTrainer on chat messages: the generalized JSD to a Qwen2 teacher over sequences the
    student samples itself (lmbda=1: every step on-policy)."""
    import datasets
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    def make(lib):
        args = _args(GKDConfig, tmp_path, lib, max_length=32, max_new_tokens=8, lmbda=1.0)
        return GKDTrainer(
            model=lib.AutoModelForCausalLM.from_pretrained(dirs[0]),
            teacher_model=lib.AutoModelForCausalLM.from_pretrained(dirs[1]), args=args,
            train_dataset=datasets.Dataset.from_dict({"messages": _messages()}), processing_class=_tokenizer(dirs[0]),
            peft_config=_lora(lora),
        )  # fmt: skip

    _compare(make)


@pytest.mark.parametrize("lora", [False, True])
def test_online_dpo_trainer(dirs, tmp_path, lora):
    """trl.experimental's OnlineDPOTrainer: two sampled completions per prompt, ranked by a reward function, a
    DPO step against the reference (a copy, or the adapter disabled)."""
    import datasets
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    def make(lib):
        args = _args(OnlineDPOConfig, tmp_path, lib, max_new_tokens=8, bf16=False)
        return OnlineDPOTrainer(
            model=lib.AutoModelForCausalLM.from_pretrained(dirs[0]), reward_funcs=_reward, args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=_tokenizer(dirs[0]),
            peft_config=_lora(lora),
        )  # fmt: skip

    # at the first step policy and reference are the same model, their reward margin zero: TRL's accuracy counts
    # its sign, which the last bit of float rounding sets (autolm's reference pass takes its no-grad kernels)
    rows = _compare(make, skip=frozenset({"rewards/accuracies"}))
    assert rows[-1]["objective/kl"] != 0


def test_a2po_trainer(dirs, tmp_path):
    """trl.experimental's A2POTrainer (no peft_config): optimal values from samples of the reference model,
    then one on-policy sample per prompt regressed onto them. The prompts are left-padded (see the module's
    note: TRL pads them on the tokenizer's side, and a prompt padded on the right, then a completion, puts
    padding between real tokens)."""
    import datasets
    from trl.experimental.a2po import A2POConfig, A2POTrainer

    def make(lib):
        args = _args(A2POConfig, tmp_path, lib, max_completion_length=8, num_value_samples=4, bf16=False)
        return A2POTrainer(
            model=lib.AutoModelForCausalLM.from_pretrained(dirs[0]), reward_funcs=_reward, args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 4}),
            processing_class=_tokenizer(dirs[0], padding_side="left"),
        )  # fmt: skip

    rows = _compare(make)
    assert rows[0]["v_star"] > 0


@pytest.mark.parametrize("lora", [False, True])
def test_sdft_trainer(dirs, tmp_path, lora):
    """trl.experimental's SDFTTrainer: the model samples completions and is distilled towards itself prompted
    with a privileged context (the teacher pass under no_grad)."""
    import datasets
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    data = {"prompt": PROMPTS * 2, "privileged_context": ["world", "brown fox", "def"] * 2}

    def make(lib):
        args = _args(SDFTConfig, tmp_path, lib, max_completion_length=8, num_generations=2)
        return SDFTTrainer(
            model=lib.AutoModelForCausalLM.from_pretrained(dirs[0]), args=args,
            train_dataset=datasets.Dataset.from_dict(data), processing_class=_tokenizer(dirs[0]),
            peft_config=_lora(lora),
        )  # fmt: skip

    rows = _compare(make)
    assert any(r["loss"] != 0 for r in rows)
