"""transformers and peft code with only the import changed: each test runs the same user code against
transformers/peft and against autolm, on the same checkpoint, and compares what it returns."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest
import torch

import autolm

NAME = "llama_gqa_llama3_sharded"
IDS = torch.tensor([[1, 17, 33, 5, 99, 42, 7]])


def _libs():
    import transformers

    return [transformers, autolm]


def _both(fn):
    """fn(lib) for transformers then autolm."""
    return [fn(lib) for lib in _libs()]


# ---- loading --------------------------------------------------------------------------------------------


def test_the_seed_articles_first_line(checkpoint):
    directory, _ = checkpoint(NAME)

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(
            directory,
            torch_dtype=torch.float32,
            low_cpu_mem_usage=True,
            device_map="auto",
            attn_implementation="sdpa",
            trust_remote_code=True,
        )
        with torch.no_grad():
            return model(IDS).logits

    ref, got = _both(user_code)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_config_overrides_and_config_json_path(checkpoint):
    directory, _ = checkpoint(NAME)

    def user_code(lib):
        a = lib.AutoConfig.from_pretrained(directory, num_hidden_layers=1)
        b = lib.AutoConfig.from_pretrained(os.path.join(directory, "config.json"))
        model = lib.AutoModelForCausalLM.from_pretrained(directory, num_hidden_layers=1)
        with torch.no_grad():
            logits = model(IDS).logits
        return (
            a.num_hidden_layers,
            b.num_hidden_layers,
            b.architectures,
            b.use_cache,
            b.model_type,
            json.loads(b.to_json_string())["hidden_size"],
            logits,
        )

    ref, got = _both(user_code)
    assert got[:6] == ref[:6]
    torch.testing.assert_close(got[6], ref[6], atol=1e-5, rtol=1e-5)


def test_saved_config_keeps_every_key_transformers_writes(checkpoint, tmp_path):
    directory, _ = checkpoint(NAME)
    autolm.AutoConfig.from_pretrained(directory).save_pretrained(tmp_path / "a")
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    missing = set(original) - set(written) - {"transformers_version"}
    assert not missing
    assert all(written[k] == original[k] for k in original if k not in ("transformers_version",))


def test_adapter_folder_loads_its_base_model_with_the_adapter(checkpoint, tmp_path):
    import peft
    import transformers

    directory, _ = checkpoint(NAME)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory)
    pm = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "adapter")

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
        with torch.no_grad():
            return model(IDS).logits

    ref, got = _both(user_code)
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(directory)(IDS).logits
    assert not torch.allclose(ref, plain, atol=1e-3)  # the adapter is on
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- the model ------------------------------------------------------------------------------------------


def test_tutorial_decode_loop_with_past_key_values(checkpoint):
    directory, _ = checkpoint(NAME)

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        tokens, past, ids = [], None, IDS
        with torch.no_grad():
            for _ in range(8):
                out = model(ids, past_key_values=past)
                past = out.past_key_values
                ids = out.logits[:, -1:].argmax(-1)
                tokens.append(int(ids))
        return tokens

    ref, got = _both(user_code)
    assert got == ref


def test_prompt_reuse_with_an_empty_dynamic_cache(checkpoint):
    """transformers' cache recipes: `DynamicCache()` (or `DynamicCache(config=...)`) filled by one forward over a
    shared prefix, deep-copied and handed to generate() per continuation; `cache.layers[i].keys / .values`;
    `crop()` back to a shorter prefix."""
    import copy

    directory, _ = checkpoint(NAME)
    prefix, more = IDS[:, :4], [IDS, torch.cat([IDS[:, :4], IDS[:, 1:3]], 1)]

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        with torch.no_grad():
            prompt_cache = model(prefix, past_key_values=lib.DynamicCache()).past_key_values
            outs = [model.generate(ids, past_key_values=copy.deepcopy(prompt_cache), max_new_tokens=5, do_sample=False)
                    for ids in more]  # fmt: skip
            cache = lib.DynamicCache(config=model.config)
            model(IDS, past_key_values=cache)
            keys = [layer.keys.clone() for layer in cache.layers]
            cache.crop(-3)  # the last three tokens dropped
            step = model(IDS[:, 4:5], past_key_values=cache).logits
        return outs, prompt_cache.get_seq_length(), keys, cache.get_seq_length(), step

    ref, got = _both(user_code)
    assert all(torch.equal(a, b) for a, b in zip(got[0], ref[0], strict=True)) and got[1] == ref[1] == 4
    for a, b in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[3] == ref[3] == 5
    torch.testing.assert_close(got[4], ref[4], atol=1e-5, rtol=1e-5)


def test_family_class_from_pretrained_and_module_accessors(checkpoint):
    """`LlamaForCausalLM.from_pretrained(...)` (the family's class), get_decoder / set_input_embeddings /
    set_output_embeddings / disable_input_require_grads / set_attn_implementation as transformers has them."""
    directory, _ = checkpoint(NAME)

    def user_code(lib):
        model = lib.LlamaForCausalLM.from_pretrained(directory)
        embed = model.get_input_embeddings()
        model.set_input_embeddings(embed)
        model.set_output_embeddings(model.get_output_embeddings())
        model.enable_input_require_grads()
        model.disable_input_require_grads()
        with torch.no_grad():
            out = model.get_decoder()(IDS).last_hidden_state
        model.set_attn_implementation("eager")
        return type(model).__name__, out, model.config._attn_implementation, model(IDS).logits.requires_grad

    ref, got = _both(user_code)
    assert got[0] == ref[0] == "LlamaForCausalLM" and got[2:] == ref[2:]
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(autolm.errors.ConfigError, match="not a Qwen3ForCausalLM"):
        autolm.Qwen3ForCausalLM.from_pretrained(directory)


def test_hidden_states_attentions_and_tuples(checkpoint):
    directory, _ = checkpoint(NAME)

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
        with torch.no_grad():
            out = model(IDS, output_hidden_states=True, output_attentions=True)
            tup = model(IDS, return_dict=False, use_cache=False)
        default = lib.AutoModelForCausalLM.from_pretrained(directory).config._attn_implementation
        return out.hidden_states, out.attentions, tup[0], (model.config._attn_implementation, default)

    ref, got = _both(user_code)
    assert got[3] == ref[3] == ("eager", "sdpa")
    assert len(got[0]) == len(ref[0]) and len(got[1]) == len(ref[1])
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=1e-5)


def test_model_methods(checkpoint):
    directory, _ = checkpoint(NAME)

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        facts = [
            model.num_parameters(),
            model.num_parameters(exclude_embeddings=True),
            model.get_memory_footprint(return_buffers=False),
            model.can_generate(),
            tuple(model.get_output_embeddings().weight.shape),
            model.name_or_path == directory,
            model.config.use_cache,
            model._no_split_modules,  # what accelerate's device maps read
        ]
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(True)
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        facts.append(model.num_parameters(only_trainable=True))
        return facts, loss.detach(), model.get_output_embeddings().weight.grad

    ref, got = _both(user_code)
    assert got[0] == ref[0]
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings(checkpoint, tied):
    directory, _ = checkpoint("qwen2_tied_bias" if tied else NAME)

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        old = model.get_input_embeddings().weight.detach().clone()
        emb = model.resize_token_embeddings(old.shape[0] + 5, pad_to_multiple_of=8)
        with torch.no_grad():
            logits = model(IDS).logits
        return (
            emb.weight.shape[0],
            model.config.vocab_size,
            model.get_output_embeddings().weight.shape[0],
            old,
            emb.weight.detach(),
            model.get_output_embeddings().weight.detach(),
            logits,
        )

    ref, got = _both(user_code)
    assert got[:3] == ref[:3]
    n = ref[3].shape[0]
    for a, b in ((got[4], ref[4]), (got[5], ref[5])):
        torch.testing.assert_close(a[:n], b[:n])
        torch.testing.assert_close(a[n:], b[n:], atol=1e-3, rtol=0)  # both draw near the old rows' mean
    torch.testing.assert_close(got[6][..., :n], ref[6][..., :n], atol=1e-3, rtol=1e-3)


# ---- generate -------------------------------------------------------------------------------------------


def test_generate_dict_scores_logits_and_transformers_objects(checkpoint):
    import transformers

    directory, _ = checkpoint(NAME)

    class StopAfter(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] >= IDS.shape[1] + 4

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        gen = transformers.GenerationConfig(
            max_new_tokens=10, do_sample=False, no_repeat_ngram_size=2, eos_token_id=None, pad_token_id=0
        )
        out = model.generate(
            IDS,
            generation_config=gen,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            logits_processor=transformers.LogitsProcessorList(
                [transformers.RepetitionPenaltyLogitsProcessor(1.3)]
            ),
            stopping_criteria=transformers.StoppingCriteriaList([StopAfter()]),
        )
        return out.sequences, torch.stack(out.scores), torch.stack(out.logits)

    ref, got = _both(user_code)
    assert torch.equal(got[0], ref[0]) and got[0].shape[1] == IDS.shape[1] + 4
    torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], ref[2], atol=1e-4, rtol=1e-4)


def test_set_seed_static_cache_and_transformers_names(checkpoint):
    """set_seed (Python's, NumPy's and torch's generators), StaticCache(config=..., max_cache_len=...) handed to
    generate() (or cache_implementation="static"), and transformers' class names for isinstance checks, as
    scripts use them."""
    import random

    import numpy as np

    directory, _ = checkpoint(NAME)

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        lib.set_seed(3)
        draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
        lib.set_seed(5)
        sampled = model.generate(IDS, do_sample=True, top_k=20, max_new_tokens=6)
        cache = lib.StaticCache(config=model.config, max_cache_len=32)
        greedy = model.generate(IDS, past_key_values=cache, max_new_tokens=5, do_sample=False)
        names = (isinstance(model, lib.PreTrainedModel), isinstance(cache, lib.Cache), cache.get_seq_length())
        static = model.generate(IDS, cache_implementation="static", max_new_tokens=5, do_sample=False)
        return draws, sampled, greedy, names, static

    ref, got = _both(user_code)
    assert got[0] == ref[0] and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert torch.equal(got[4], ref[4]) and torch.equal(got[4], got[2])
    assert got[3] == ref[3] == (True, True, IDS.shape[1] + 4)


def test_generate_returns_hidden_states_and_attentions(checkpoint):
    """generate(output_hidden_states=True, output_attentions=True, return_dict_in_generate=True): per new token,
    each layer's hidden states and attention weights of the forward that chose it (the prompt's whole, then one
    row each), as transformers returns them, left padding included (the padding's own rows, which attend to
    nothing real, are the libraries' arbitrary fill: transformers spreads them over every position)."""
    directory, _ = checkpoint(NAME)
    batch = torch.tensor([[0, 0, 17, 33, 5], [1, 17, 33, 5, 99]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
        out = model.generate(batch, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_hidden_states=True, output_attentions=True)  # fmt: skip
        return out.sequences, out.hidden_states, out.attentions, sorted(out.keys())

    ref, got = _both(user_code)
    assert torch.equal(got[0], ref[0]) and got[3] == ref[3]
    real = mask.bool()
    for steps_got, steps_ref in zip(got[1:3], ref[1:3], strict=True):
        assert len(steps_got) == len(steps_ref) == 3
        for step, (layers_got, layers_ref) in enumerate(zip(steps_got, steps_ref, strict=True)):
            assert len(layers_got) == len(layers_ref)
            for a, b in zip(layers_got, layers_ref):
                assert a.shape == b.shape
                if (
                    step == 0
                ):  # the prompt's rows: (B, T, hidden) or (B, heads, T, T) -> the real tokens' rows
                    a, b = (
                        (a[real], b[real])
                        if a.dim() == 3
                        else (a.transpose(1, 2)[real], b.transpose(1, 2)[real])
                    )
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generate_from_inputs_embeds(checkpoint):
    """generate(inputs_embeds=...) as soft-prompt and multimodal code calls it: the embeddings feed the prompt's
    forward (beam search too); the sequences hold the new tokens alone (input_ids first where given too), and
    max_length / min_length count the embeddings' positions."""
    directory, _ = checkpoint(NAME)
    batch = torch.tensor([[0, 0, 17, 33, 5], [1, 17, 33, 5, 99]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        embeds = model.get_input_embeddings()(IDS) * 1.5  # soft prompts: not any token's embedding
        out = [model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)]
        out.append(model.generate(inputs_embeds=embeds, max_length=IDS.shape[1] + 4, min_length=IDS.shape[1] + 3,
                                  repetition_penalty=1.3, do_sample=False, eos_token_id=5))  # fmt: skip
        out.append(model.generate(IDS, inputs_embeds=embeds, max_new_tokens=4, do_sample=False))
        padded = model.get_input_embeddings()(batch)
        out.append(model.generate(inputs_embeds=padded, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                  pad_token_id=0))  # fmt: skip
        out.append(model.generate(inputs_embeds=padded, attention_mask=mask, max_new_tokens=4, num_beams=3,
                                  num_return_sequences=2, do_sample=False, pad_token_id=0))  # fmt: skip
        return out

    ref, got = _both(user_code)
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(g, r), (g, r)
    assert got[0].shape == (1, 6) and got[2].shape == (1, IDS.shape[1] + 4) and got[3].shape == (2, 5)
    assert got[4].shape == (4, 4)  # beam search from the embeddings too
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(autolm.errors.GenerationError, match="inputs_embeds cannot be used with speculative"):
        model.generate(
            inputs_embeds=model.get_input_embeddings()(IDS), prompt_lookup_num_tokens=2, max_new_tokens=2
        )


# ---- peft -----------------------------------------------------------------------------------------------


def test_peft_names_paths_and_printout(checkpoint, tmp_path):
    import peft

    directory, _ = checkpoint(NAME)

    def user_code(lib_model, lib_peft, out):
        model = lib_model.AutoModelForCausalLM.from_pretrained(directory)
        config = lib_peft.LoraConfig(
            task_type=lib_peft.TaskType.CAUSAL_LM,
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
        )
        pm = lib_peft.get_peft_model(model, config)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            pm.print_trainable_parameters()
        a = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape
        pm.save_pretrained(out)
        return (
            [n for n, p in pm.named_parameters() if p.requires_grad],
            printed.getvalue(),
            a,
            set(json.loads((out / "adapter_config.json").read_text())),
        )

    import transformers

    ref = user_code(transformers, peft, tmp_path / "peft")
    got = user_code(autolm, autolm.lora, tmp_path / "autolm")
    assert got[:3] == ref[:3]
    lacking = ref[3] - got[3] - {"peft_version"}  # autolm does not claim to be a peft version
    assert not lacking, f"adapter_config.json lacks peft's keys: {sorted(lacking)}"


# ---- tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_surface(smol_dir, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(smol_dir, name), d)

    def user_code(lib):
        tok = lib.AutoTokenizer.from_pretrained(d, use_fast=True)
        facts = [
            tok.tokenize("Hello world, how are you?"),
            tok.convert_tokens_to_ids(["Hello", "Ġworld"]),
            tok.convert_ids_to_tokens([19556, 905]),
            sorted(tok.all_special_tokens),
            sorted(tok.all_special_ids),
        ]
        enc = tok("Hello world", "second part here", return_offsets_mapping=True, return_token_type_ids=True)
        facts.append(
            {k: [tuple(x) if isinstance(x, (list, tuple)) else x for x in v] for k, v in enc.items()}
        )
        tok.truncation_side = "left"
        facts.append(
            dict(tok(["Hello world this is long", "hi"], truncation=True, max_length=3, padding=True))
        )
        facts.append(
            tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<x1>", "<x2>"]})
        )
        facts.append(tok.add_tokens(["newword", "hello"]))
        facts += [len(tok), tok.pad_token_id, tok.tokenize("a newword <x1>"), sorted(tok.all_special_tokens)]
        facts.append(
            dict(tok(["ab", "abc def ghi"], padding=True, pad_to_multiple_of=8, return_tensors="pt"))
        )
        return facts

    ref, got = _both(user_code)
    for i, (a, b) in enumerate(zip(got, ref)):
        if isinstance(b, dict) and any(isinstance(v, torch.Tensor) for v in b.values()):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), i
        else:
            assert a == b, (i, a, b)


def test_real_peft_wraps_an_autolm_model(checkpoint):
    """peft itself (not autolm.lora) around an autolm model, with a task type: same logits and tokens as
    peft around transformers' model, given the same seed for the adapter's initialisation."""
    import peft

    directory, _ = checkpoint(NAME)

    def user_code(lib):
        model = lib.AutoModelForCausalLM.from_pretrained(directory)
        torch.manual_seed(0)
        pm = peft.get_peft_model(
            model,
            peft.LoraConfig(
                task_type=peft.TaskType.CAUSAL_LM,
                r=4,
                target_modules=["q_proj", "v_proj"],
                init_lora_weights=False,
            ),
        )
        with torch.no_grad():
            return pm(input_ids=IDS).logits, pm.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)

    ref, got = _both(user_code)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], ref[1])
