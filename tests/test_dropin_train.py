"""Training through the ecosystem with only the import changed: transformers' Trainer and TRL's SFTTrainer and
DPOTrainer run an autolm model (and autolm's LoRA adapters) to the same losses as a transformers model, and save
what peft and transformers load back."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import write_char_tokenizer

import autolm
import autolm.lora
from autolm.train import SavePretrainedMixin

NAME = "llama_gqa_llama3_sharded"
TEXTS = ["hello world, this is a test", "another line of text here", "short", "the quick brown fox jumps",
         "lorem ipsum dolor", "abc def ghi", "one more example", "and the last"]  # fmt: skip
IDS = torch.tensor([[1, 17, 33, 5, 99, 42, 7]])


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    directory, _ = checkpoint(NAME)
    write_char_tokenizer(directory)
    return directory


def _libs():
    import peft
    import transformers

    return [(transformers, peft), (autolm, autolm.lora)]


def _history(trainer) -> list[tuple[float, float]]:
    return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def test_trainer_trains_an_autolm_lora_model_as_peft_and_saves_the_adapter(model_dir, tmp_path):
    import datasets
    import peft
    import transformers

    class Trainer(SavePretrainedMixin, transformers.Trainer):
        pass

    made = []
    for lib, lib_peft in _libs():
        model = lib.AutoModelForCausalLM.from_pretrained(model_dir)
        made.append(
            lib_peft.get_peft_model(model, lib_peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        )
    theirs = dict(made[0].named_parameters())
    with torch.no_grad():  # the same initial adapter in both
        for name, p in made[1].named_parameters():
            if ".lora_" in name:
                p.copy_(theirs[name])

    def user_code(lib, pm, out):
        tok = lib.AutoTokenizer.from_pretrained(model_dir)
        data = datasets.Dataset.from_dict({"text": TEXTS}).map(lambda b: tok(b["text"]), batched=True)
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            logging_steps=1, learning_rate=1e-2, save_steps=2, report_to=[], use_cpu=True, seed=0,
        )  # fmt: skip
        collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
        trainer = Trainer(
            model=pm, args=args, train_dataset=data, data_collator=collator, processing_class=tok
        )
        trainer.train()
        trainer.save_model()
        return _history(trainer)

    ref = user_code(transformers, made[0], tmp_path / "peft")
    got = user_code(autolm, made[1], tmp_path / "autolm")
    assert len(got) == len(ref) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=1e-5)
    logits = []
    for folder in ("peft", "autolm", "autolm/checkpoint-2"):
        assert os.path.isfile(tmp_path / folder / "adapter_model.safetensors"), folder
        assert json.loads((tmp_path / folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            logits.append(peft.PeftModel.from_pretrained(base, tmp_path / folder)(input_ids=IDS).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits[2], logits[1], atol=1e-4)  # the checkpoint is the halfway adapter


@pytest.mark.parametrize("lora", [True, False])
def test_sft_trainer_trains_an_autolm_model(model_dir, tmp_path, lora):
    """TRL's SFTTrainer: LoRA through its peft_config (peft wraps the autolm model) or a full fine-tune; TRL takes
    only transformers' tokenizer classes, so autolm's tokenizer goes in through PreTrainedTokenizerFast's
    tokenizer_object (transformers' documented way to wrap a `tokenizers` tokenizer), or TRL loads one itself."""
    import datasets
    import peft
    import transformers
    import trl

    class SFTTrainer(SavePretrainedMixin, trl.SFTTrainer):
        pass

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(model_dir)
        tok = lib.AutoTokenizer.from_pretrained(model_dir)
        if lib is autolm:
            tok = transformers.PreTrainedTokenizerFast(
                tokenizer_object=tok.backend_tokenizer, **tok.special_tokens_map
            )
        args = trl.SFTConfig(
            output_dir=str(tmp_path / lib.__name__), max_steps=3, per_device_train_batch_size=2, logging_steps=1,
            learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, save_strategy="no", max_length=32,
        )  # fmt: skip
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                             processing_class=tok if lora else None, peft_config=config)  # fmt: skip
        trainer.train()
        trainer.save_model()
        return _history(trainer), sorted(os.listdir(tmp_path / lib.__name__))

    ref, got = (user_code(lib) for lib, _ in _libs())
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(ref[0]), atol=1e-5, rtol=1e-5)
    saved = [transformers.AutoModelForCausalLM.from_pretrained(model_dir)] * 2
    if lora:
        assert "adapter_model.safetensors" in got[1] and "adapter_config.json" in got[1]
        saved = [
            peft.PeftModel.from_pretrained(m, tmp_path / d) for m, d in zip(saved, ("transformers", "autolm"))
        ]
    else:
        assert "model.safetensors" in got[1] and "config.json" in got[1]
        saved = [
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d)
            for d in ("transformers", "autolm")
        ]
    with torch.no_grad():
        torch.testing.assert_close(
            saved[1](input_ids=IDS).logits, saved[0](input_ids=IDS).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("lora", [True, False])
def test_dpo_trainer_trains_an_autolm_model(model_dir, tmp_path, lora):
    """TRL's DPOTrainer with DPOConfig's defaults (bf16 on: the step runs under CPU autocast) gives the losses,
    log-probs and gradient norms transformers' model gives, step for step: a full fine-tune against a reference
    model TRL builds, or LoRA through peft_config against the adapter disabled. Under autocast the grouped K/V
    heads' gradients round as transformers' SDPA path rounds them (SDPA's own GQA where there is no mask)."""
    import datasets
    import peft
    import transformers
    import trl

    pairs = {"prompt": ["hello ", "the quick ", "abc "] * 2, "chosen": ["world", "brown fox", "def"] * 2,
             "rejected": ["zzz", "qqq", "xyz"] * 2}  # fmt: skip

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(model_dir)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        tok.pad_token = tok.pad_token or tok.eos_token
        args = trl.DPOConfig(
            output_dir=str(tmp_path / lib.__name__), max_steps=3, per_device_train_batch_size=2, logging_steps=1,
            learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no", max_length=32,
        )  # fmt: skip
        assert args.bf16
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(pairs),
                                 processing_class=tok, peft_config=config)  # fmt: skip
        trainer.train()
        keys = ("loss", "grad_norm", "logps/chosen", "logps/rejected")
        return [[h[k] for k in keys] for h in trainer.state.log_history if "loss" in h]

    torch.manual_seed(0)
    ref = user_code(transformers)
    torch.manual_seed(0)
    got = user_code(autolm)
    assert len(got) == len(ref) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=1e-5)


def test_grpo_trainer_samples_and_trains_an_autolm_model(model_dir, tmp_path):
    """TRL's GRPOTrainer: the model samples its completions through its own generate (the same draws from the
    same seed as transformers' model), a reward function scores them, and the policy-gradient steps give
    transformers' rewards, losses and gradient norms."""
    import datasets
    import transformers
    import trl

    def user_code(lib):
        torch.manual_seed(0)
        model = lib.AutoModelForCausalLM.from_pretrained(model_dir)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        tok.pad_token = tok.pad_token or tok.eos_token
        args = trl.GRPOConfig(
            output_dir=str(tmp_path / lib.__name__), max_steps=2, per_device_train_batch_size=4, num_generations=4,
            max_completion_length=8, logging_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True, seed=0,
            save_strategy="no",
        )  # fmt: skip
        prompts = datasets.Dataset.from_dict({"prompt": ["hello ", "the quick ", "abc "] * 4})
        trainer = trl.GRPOTrainer(model=model, args=args, train_dataset=prompts, processing_class=tok,
                                  reward_funcs=lambda completions, **_: [float(len(c)) for c in completions])  # fmt: skip
        trainer.train()
        keys = ("loss", "reward", "reward_std", "grad_norm")
        return [[h[k] for k in keys] for h in trainer.state.log_history if "loss" in h]

    ref, got = user_code(transformers), user_code(autolm)
    assert len(got) == len(ref) == 2 and all(row[2] > 0 and row[3] > 0 for row in ref)  # rewards that differ
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=1e-4)


def test_prepare_model_for_kbit_training_as_peft(model_dir):
    """peft's QLoRA preparation with the import changed: every parameter frozen, the bf16 ones cast to fp32 (the
    same logits as peft's preparation gives transformers' model after), and on a quantized model gradient
    checkpointing on with the embeddings' output requiring grad, so LoRA trains through the checkpointed layers."""

    def user_code(libs):
        lib, lib_peft = libs
        model = lib.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        model = lib_peft.prepare_model_for_kbit_training(model)
        dtypes = {p.dtype for p in model.parameters()}
        frozen = not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            return model(IDS).logits, dtypes, frozen, model.is_gradient_checkpointing

    ref, got = [user_code(libs) for libs in _libs()]
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    assert got[1:] == ref[1:] == ({torch.float32}, True, False)  # a float model: no checkpointing, as peft

    # the QLoRA recipe with the import changed: quantization_config=BitsAndBytesConfig(load_in_4bit=True) loads
    # autolm's int4 (groups of 64), the head and llm_int8_skip_modules left in floating point, as bitsandbytes
    import transformers

    for bnb in (autolm.BitsAndBytesConfig, transformers.BitsAndBytesConfig):
        config = bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                     llm_int8_skip_modules=["down_proj"])  # fmt: skip
        model = autolm.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, quantization_config=config
        )
        quantized = {n for n, m in model.named_modules() if isinstance(m, autolm.quant.Int4Linear)}
        assert model.is_loaded_in_4bit and not model.is_loaded_in_8bit and model.is_quantized
        assert quantized and all(m.group_size == 64 for n, m in model.named_modules() if n in quantized)
        assert not any(n.endswith(("down_proj", "lm_head")) for n in quantized)
    model = autolm.lora.prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    peft_model = autolm.lora.get_peft_model(
        model, autolm.lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    peft_model.train()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(
        g.abs().sum() > 0 for g in grads
    )  # lora_B starts at zero, so its gradient is the one that moves
