"""peft's trainable tokens (LoraConfig's trainable_token_indices): chosen rows of the embeddings trained beside
LoRA, in peft's layout and files; a tied output layer follows them. The same user code runs with transformers +
peft and with autolm, and gives the same losses, logits, files, merged models and layer statuses."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import pytest
import safetensors.torch
import torch

import autolm
import autolm.lora
from autolm.errors import AdapterError

IDS = torch.tensor([[1, 5, 9, 7, 3, 5, 2, 7, 11, 4]])


def _libraries():
    import peft
    import transformers

    return [(transformers, peft), (autolm, autolm.lora)]


def _train(lib, lib_peft, directory, out, tokens):
    """Three AdamW steps of LoRA on q_proj with these token rows trained; what each library gives."""
    model = lib.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    pm = lib_peft.get_peft_model(
        model, lib_peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=tokens)
    )
    torch.manual_seed(1)
    # the same LoRA weights in both (B non-zero: every piece moves the logits)
    for n, p in pm.named_parameters():
        if ".lora_" in n:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = pm(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pm.print_trainable_parameters()
    with torch.no_grad():
        logits = pm(input_ids=IDS).logits
        with pm.disable_adapter():
            base = pm(input_ids=IDS).logits
    pm.save_pretrained(out)
    generated = pm.generate(IDS, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        merged = pm.merge_and_unload()(input_ids=IDS).logits
    trained = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    return losses, printed.getvalue(), logits, base, generated, merged, trained


@pytest.mark.parametrize(
    "name, tokens",
    [("qwen2_tied_bias", [5, 7]), ("llama_gqa_llama3_sharded", {"embed_tokens": [5, 7], "lm_head": [3, 9]})],
)
def test_trainable_tokens_train_save_and_merge_as_peft(checkpoint, tmp_path, name, tokens):
    """Tied embeddings (the output layer follows the rows) and untied ones with the output layer's own rows:
    training, the adapter file, loading it in the other library, generating and merging, all as peft's."""
    directory, _ = checkpoint(name)
    ref, ours = (
        _train(*libs, directory, tmp_path / out, tokens) for libs, out in zip(_libraries(), ("peft", "lora"))
    )
    assert ours[0] == pytest.approx(ref[0], abs=1e-5) and ours[1] == ref[1] and ours[6] == ref[6]
    for a, b in zip(ref[2:6], ours[2:6]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    files = [
        safetensors.torch.load_file(tmp_path / n / "adapter_model.safetensors") for n in ("peft", "lora")
    ]
    assert {k: v.shape for k, v in files[0].items()} == {k: v.shape for k, v in files[1].items()}
    assert any("token_adapter.trainable_tokens_delta" in k for k in files[1])
    for (lib, lib_peft), adapter, want in zip(_libraries(), ("lora", "peft"), (ours[2], ref[2])):
        loaded = lib_peft.PeftModel.from_pretrained(
            lib.AutoModelForCausalLM.from_pretrained(directory), tmp_path / adapter
        )
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)


def test_trainable_tokens_beside_other_adapters_and_their_status(checkpoint):
    """Two adapters with their own rows: set_adapter switches the rows, the layer and model statuses are peft's,
    deleting one leaves the other."""
    directory, _ = checkpoint("qwen2_tied_bias")
    seen = []
    for lib, lib_peft in _libraries():
        pm = lib_peft.get_peft_model(
            lib.AutoModelForCausalLM.from_pretrained(directory),
            lib_peft.LoraConfig(
                r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [5, 7]}
            ),
        )
        pm.add_adapter(
            "other", lib_peft.LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices=[8])
        )
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "trainable_tokens_delta" in n:
                    p.add_(1.0)
        status = (
            [dataclasses.asdict(s) for s in pm.get_layer_status()],
            dataclasses.asdict(pm.get_model_status()),
        )
        pm.set_adapter("other")
        with torch.no_grad():
            other = pm(input_ids=IDS).logits
        pm.delete_adapter("other")
        with torch.no_grad():
            default = pm(input_ids=IDS).logits
        seen.append((status, other, default, pm.active_adapter))
    assert seen[1][0] == seen[0][0] and seen[1][3] == seen[0][3] == "default"
    for a, b in zip(seen[0][1:3], seen[1][1:3]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_trainable_tokens_mistakes_are_named(checkpoint):
    directory, _ = checkpoint("qwen2_tied_bias")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    LoraConfig = autolm.lora.LoraConfig
    with pytest.raises(AdapterError, match="outside the embeddings"):
        autolm.lora.get_peft_model(
            model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[10**6])
        )
    with pytest.raises(AdapterError, match="both in modules_to_save"):
        autolm.lora.get_peft_model(
            model,
            LoraConfig(
                target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[3]
            ),
        )
    with pytest.raises(AdapterError, match="trainable_token_indices must be"):
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=["a"])
    with pytest.raises(AdapterError, match="matches no module"):
        autolm.lora.get_peft_model(
            model, LoraConfig(target_modules=["q_proj"], trainable_token_indices={"wte": [3]})
        )
