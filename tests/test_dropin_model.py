"""transformers code with only the import changed, second round: config objects, loading info, autocast,
transformers' PEFT integration on the model, the family classes and pipeline(); each test runs the same user code
against transformers and against autolm on the same checkpoint and compares what it returns."""

from __future__ import annotations

import json
import os

import pytest
import torch

import autolm

NAME = "llama_gqa_llama3_sharded"
IDS = torch.tensor([[1, 17, 33, 5, 99, 42, 7]])


def _both(fn):
    """fn(lib) for transformers then autolm."""
    import transformers

    return [fn(transformers), fn(autolm)]


def _close(got, ref):
    for a, b in zip(got, ref):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert a == b, (a, b)


# ---- config objects ---------------------------------------------------------------------------------------


def test_config_dtype_hidden_states_switch_and_loading_info(checkpoint):
    directory, _ = checkpoint("llama_bf16")

    def user_code(lib):
        model, info = lib.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
        facts = [model.config.dtype, model.dtype, {k: sorted(v) for k, v in info.items()}]
        model.config.output_hidden_states = True
        with torch.no_grad():
            out = model(IDS)
        facts.append(len(out.hidden_states))
        model.config.output_hidden_states = False
        with torch.no_grad():
            facts.append(model(IDS).hidden_states)
        return facts

    ref, got = _both(user_code)
    assert got == ref and ref[0] is torch.bfloat16


def test_config_update_diff_json_and_save(checkpoint, tmp_path):
    directory, _ = checkpoint(NAME)

    def user_code(lib):
        config = lib.AutoConfig.from_pretrained(directory)
        config.update({"rms_norm_eps": 1e-5, "my_key": 3})
        config.output_attentions = True
        out = tmp_path / lib.__name__
        config.save_pretrained(out)
        saved = json.loads((out / "config.json").read_text())
        again = lib.AutoConfig.from_pretrained(out)
        return config.to_diff_dict(), json.loads(config.to_json_string(use_diff=False)), saved, again

    ref, got = _both(user_code)
    for diff, full, saved in (got[:3], ref[:3]):
        assert diff["rms_norm_eps"] == full["rms_norm_eps"] == saved["rms_norm_eps"] == 1e-5
        assert diff["my_key"] == saved["my_key"] == 3 and saved["output_attentions"] is True
    ours, theirs = got[0], ref[0]
    assert all(ours[k] == theirs[k] for k in ours if k not in ("dtype",)), (ours, theirs)
    assert (
        got[3].my_key == ref[3].my_key == 3 and got[3].output_attentions is ref[3].output_attentions is True
    )
    assert got[2]["dtype"] == ref[2]["dtype"]


def test_fewer_layers_than_layer_types(checkpoint):
    """num_hidden_layers=1 on a model whose config lists layer_types: the first layer's type is used."""
    directory, _ = checkpoint("qwen2_sliding")

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory, num_hidden_layers=1)
        with torch.no_grad():
            return model.config.num_hidden_layers, model.config.layer_types[:1], model(IDS).logits

    ref, got = _both(user_code)
    _close(got, ref)


def test_autocast_bf16_logits(smol_dir):
    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(smol_dir)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(IDS).logits

    ref, got = _both(user_code)
    assert got.dtype == ref.dtype == torch.bfloat16
    # the same ops in bf16 as transformers' SDPA path (equal here); one bf16 step at these magnitudes allowed
    torch.testing.assert_close(got.float(), ref.float(), atol=0.0625, rtol=0)


# ---- transformers' PEFT integration on the model -----------------------------------------------------------


def _two_adapters(checkpoint, tmp_path):
    import peft
    import transformers

    directory, _ = checkpoint(NAME)
    for name, targets in (("one", ["q_proj", "v_proj"]), ("two", ["o_proj"])):
        base = transformers.AutoModelForCausalLM.from_pretrained(directory)
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(tmp_path / name)
    return directory


def test_model_load_add_set_disable_enable_adapters(checkpoint, tmp_path):
    import peft

    directory = _two_adapters(checkpoint, tmp_path)

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        with torch.no_grad():
            facts = [model(IDS).logits]
            model.load_adapter(str(tmp_path / "one"))
            model.load_adapter(str(tmp_path / "two"), adapter_name="two")
            facts += [model.active_adapters(), model(IDS).logits]
            model.set_adapter("default")
            facts += [model.active_adapters(), model(IDS).logits]
            model.disable_adapters()
            facts.append(model(IDS).logits)
            model.enable_adapters()
            facts.append(model(IDS).logits)
        state = model.get_adapter_state_dict()
        facts += [sorted(state), [state[k] for k in sorted(state)]]
        model.add_adapter(peft.LoraConfig(r=2, target_modules=["k_proj"]), adapter_name="new")
        facts += [model.active_adapters(), sorted(n for n, p in model.named_parameters() if p.requires_grad)]
        with pytest.raises(ValueError):
            model.set_adapter("nope")
        model.set_adapter("two")
        model.save_pretrained(tmp_path / f"saved-{lib.__name__}")
        facts.append(sorted(os.listdir(tmp_path / f"saved-{lib.__name__}")))
        return facts

    ref, got = _both(user_code)
    torch.testing.assert_close(ref[0], ref[5])  # disabled: the base model
    assert not torch.allclose(ref[2], ref[4], atol=1e-3)  # the two adapters differ
    _close(got[:8], ref[:8])
    for a, b in zip(got[8], ref[8]):
        torch.testing.assert_close(a, b)
    assert got[9:11] == ref[9:11]
    assert set(got[11]) <= set(ref[11]) and "adapter_model.safetensors" in got[11]


# ---- names ----------------------------------------------------------------------------------------------


def test_family_classes_are_the_loaded_models_classes(checkpoint):
    for name, cls in (("qwen2_tied_bias", "Qwen2ForCausalLM"), (NAME, "LlamaForCausalLM")):
        directory, _ = checkpoint(name)

        def user_code(lib, cls=cls, directory=directory):
            model = lib.AutoModelForCausalLM.from_pretrained(directory)
            fresh = lib.AutoModelForCausalLM.from_config(lib.AutoConfig.from_pretrained(directory))
            return (
                isinstance(model, getattr(lib, cls)),
                type(fresh) is getattr(lib, cls),
                type(model).__name__,
            )

        ref, got = _both(user_code)
        assert got == ref == (True, True, cls)


# ---- pipeline -----------------------------------------------------------------------------------------------


def test_text_generation_pipeline_with_chat_messages(smol_dir):
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(smol_dir)
        tokenizer = lib.AutoTokenizer.from_pretrained(smol_dir)
        pipe = lib.pipeline("text-generation", model=model, tokenizer=tokenizer)
        greedy = dict(max_new_tokens=8, do_sample=False)
        return [
            pipe(messages, **greedy),
            pipe(messages, return_full_text=False, **greedy),
            pipe(["Once upon a time", "Hello"], max_new_tokens=4, do_sample=False),
            pipe("Once upon a time", return_full_text=False, **greedy),
            pipe([*messages, {"role": "assistant", "content": "The capital"}], **greedy),
            pipe("Once", return_tensors=True, max_new_tokens=3, do_sample=False),
            lib.pipeline("text-generation", model=smol_dir)("Paris is", max_new_tokens=3, do_sample=False),
            # batched: left-padded with the tokenizer's pad token, a batch of two then one
            pipe(["Once upon a time", "Hello", "Paris is"], batch_size=2, max_new_tokens=4, do_sample=False),
            pipe(
                [messages, [*messages, {"role": "assistant", "content": "It"}]],
                batch_size=2,
                max_new_tokens=4,
                do_sample=False,
            ),
            lib.pipeline("text-generation", model=model, tokenizer=tokenizer, batch_size=3)(
                ["The capital of France is", "Hi"], return_full_text=False, max_new_tokens=4, do_sample=False
            ),
        ]

    ref, got = _both(user_code)
    assert got == ref
    assert "Paris" in ref[0][0]["generated_text"][-1]["content"]
