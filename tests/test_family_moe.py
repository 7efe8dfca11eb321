"""The mixture-of-experts families against transformers: Mixtral (windows shorter than the prompt), Qwen 2 MoE
(shared expert, dense `mlp_only_layers`, windows on some layers), Qwen 3 MoE (`decoder_sparse_step`, normalised
top-k, q/k norms, attention biases), gpt-oss (attention sinks, alternating windows, YaRN, router and expert
biases, clamped activation); every tiny checkpoint has more experts than each token uses."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import padded_batch
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.kernels import native

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "mixtral": Family(
        "MixtralConfig",
        dict(
            COMMON,
            intermediate_size=64,
            num_hidden_layers=2,
            head_dim=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=6,
            router_jitter_noise=0.1,
        ),
        # peft's table gives q_proj, v_proj for mixtral, but peft 0.21 drops its own default while converting
        # the config for transformers 5 (then finds no target): the same targets, given explicitly
        lora_targets=["q_proj", "v_proj"],
    ),
    "qwen2_moe": Family(
        "Qwen2MoeConfig",
        dict(
            COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=3,
            num_experts=5,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=2,
        ),
        lora_targets=["q_proj", "v_proj"],
    ),
    "qwen3_moe": Family(
        "Qwen3MoeConfig",
        dict(
            COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            head_dim=24,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=6,
        ),
        lora_targets=["q_proj", "v_proj"],
    ),
    "gpt_oss": Family(
        "GptOssConfig",
        dict(
            COMMON,
            intermediate_size=32,
            num_hidden_layers=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=6,
            swiglu_limit=1.0,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 16,
            },
        ),
        lora_targets=["q_proj", "v_proj"],
    ),
}
NAMES = list(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", NAMES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", NAMES)
def test_bf16(tmp_path_factory, name):
    FAMILIES[name].check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", NAMES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", NAMES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("name", NAMES)
def test_quantized(tmp_path_factory, name, bits):
    FAMILIES[name].check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", NAMES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_disk_offload(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name,bits", [("qwen3_moe", "int8"), ("gpt_oss", "int4"), ("mixtral", "int4")])
def test_quantized_experts_in_the_one_token_graphs(tmp_path_factory, monkeypatch, name, bits):
    """Quantized experts inside the one-token step's graphs (one row, and a left-padded batch; run as exported,
    which is what the compiled code computes) follow the eager step, teacher-forced on its tokens."""
    from test_decode_steps import greedy_steps, prompt

    from autolm import step
    from autolm.step import graphs

    monkeypatch.delenv("AUTOLM_EAGER", raising=False)
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, quantization=bits)
    fed, eager = greedy_steps(model, prompt(), 12, "eager")
    step.install_plan(model, graphs.exported(model))
    step.install_plan(model, graphs.exported(model, batched=True), batched=True)
    _, got = greedy_steps(model, prompt(), 12, "auto", forced=fed)
    assert (got - eager).abs().max() <= 0.03 * eager.abs().max()
    ids, mask = padded_batch(seed=4)
    logits = []
    for mode in ("eager", "auto"):
        model.decode_mode = mode
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=2,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logits.append(out.logits[1])  # the first decode step's (the prompt's tokens are the same)
    assert (logits[1] - logits[0]).abs().max() <= 0.03 * logits[0].abs().max()


def mxfp4_quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values (..., K) -> MXFP4 blocks (..., K / 32, 16) uint8 and scales (..., K / 32) uint8, as the Hub's
    gpt-oss checkpoints store them: per block of 32 a power of two, each value the nearest FP4 code."""
    from autolm.nn.expert_formats import FP4_VALUES

    g = values.float().unflatten(-1, (-1, 32))
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    codes = (g / torch.ldexp(torch.ones_like(exp), exp.int()).unsqueeze(-1)).unsqueeze(-1)
    codes = (codes - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)  # (..., G, 32)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_checkpoint(tmp_path_factory, tmp_path):
    """A gpt-oss checkpoint with its experts in MXFP4 (`*_blocks` + `*_scales`, quant_method "mxfp4", the Hub's
    layout) loads dequantized: transformers' logits on the same file; saved, it is a plain checkpoint
    transformers loads; quantized to int8 while loading, the experts are Int8Experts."""
    import json

    import transformers
    from safetensors.torch import load_file, save_file

    directory, _ = FAMILIES["gpt_oss"].checkpoint(tmp_path_factory)
    sd = load_file(f"{directory}/model.safetensors")
    for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4_quantize(sd.pop(name).transpose(1, 2))  # stored (E, out, in)
        sd[f"{name}_blocks"], sd[f"{name}_scales"] = blocks.contiguous(), scales.contiguous()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.load(open(f"{directory}/config.json"))
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids, mask = padded_batch()
    real = mask.bool()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    ours = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert "quantization_config" not in ours.config.extra
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
        ours.save_pretrained(tmp_path / "saved")
        again = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "saved", attn_implementation="eager"
        )
        torch.testing.assert_close(
            again(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, quantization="int8")
    assert type(quant.model.layers[0].mlp.experts).__name__ == "Int8Experts"


# What llama.cpp represents of each family: no sliding window for Mixtral and the Qwen MoEs, every layer sparse,
# no attention biases for Qwen 3 MoE, gpt-oss's default swiglu_limit; each converter's layout (tests/gguf_moe.py).
GGUF_FAMILIES = {
    "mixtral": Family("MixtralConfig", {**FAMILIES["mixtral"].kwargs, "sliding_window": None}),
    "qwen2_moe": Family(
        "Qwen2MoeConfig", {**FAMILIES["qwen2_moe"].kwargs, "mlp_only_layers": [], "use_sliding_window": False}
    ),
    "qwen3_moe": Family(
        "Qwen3MoeConfig",
        {
            **FAMILIES["qwen3_moe"].kwargs,
            "decoder_sparse_step": 1,
            "attention_bias": False,
            "use_sliding_window": False,
        },
    ),
    "gpt_oss": Family(
        "GptOssConfig", {**FAMILIES["gpt_oss"].kwargs, "swiglu_limit": 7.0}
    ),  # llama.cpp's fixed limit
}


@pytest.mark.parametrize("name", NAMES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The family's checkpoint as llama.cpp's converter writes it (stacked experts, its metadata keys, Mixtral as
    "llama" with experts) loads with transformers' logits; int8 from the same file quantizes the experts."""
    from conftest import positions
    from gguf_moe import write_moe_gguf

    _, hf = GGUF_FAMILIES[name].checkpoint(tmp_path_factory)
    write_moe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == type(hf).__name__
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[0].mlp.experts).__name__ == "Int8Experts"


@pytest.mark.skipif(not native.available(), reason="autolm's C++ kernel is not built on this machine")
@pytest.mark.parametrize("name", NAMES)
def test_gguf_experts_stay_in_their_blocks(tmp_path_factory, tmp_path, name, monkeypatch):
    """A quantized MoE file (experts Q8_0 and Q4_0, gpt-oss's MXFP4, stacked as llama.cpp's converter does) with
    quantization="gguf": the experts stay in the file's blocks, views of its memory map (no float copy), computed
    on by the C++ kernel one expert at a time (eager) or each row with its own expert (the one-token step's
    graphs); the logits of the same file dequantized, within the int8 activations' rounding."""
    from gguf_moe import write_moe_gguf
    from test_decode_steps import greedy_steps

    from autolm import step
    from autolm.nn.ggml import GGMLExperts
    from autolm.quant import memory_report
    from autolm.step import graphs

    _, hf = GGUF_FAMILIES[name].checkpoint(tmp_path_factory)
    path = tmp_path / "model.gguf"
    mxfp4 = (
        name == "gpt_oss"
    )  # as llama.cpp's converter writes gpt-oss's experts (and ggml-org's files hold them)
    types = (
        dict.fromkeys(("gate", "up", "down"), "MXFP4")
        if mxfp4
        else {"gate": "Q8_0", "up": "Q8_0", "down": "Q4_0"}
    )
    write_moe_gguf(hf, str(path), experts=types)
    plain = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    kept = autolm.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32, quantization="gguf"
    )
    experts = kept.model.layers[0].mlp.experts
    assert isinstance(experts, GGMLExperts)
    stacks = [experts.gate_proj, experts.up_proj, experts.down_proj]
    assert [s.ggml_type for s in stacks] == ([39] * 3 if mxfp4 else [8, 8, 2])  # MXFP4; Q8_0, Q8_0, Q4_0
    assert all(s.weight.untyped_storage().nbytes() == os.path.getsize(path) for s in stacks)  # the file's map
    floats = plain.model.layers[0].mlp.experts
    down = floats.down_proj.data.transpose(1, 2) if floats.transposed else floats.down_proj.data
    torch.testing.assert_close(experts.down_proj.dequantize(), down)
    assert memory_report(kept)[2] == memory_report(plain)[2]  # the parameters the blocks stand for
    ids, mask = padded_batch()
    with torch.no_grad():
        got, want = kept(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    close = (got - want).abs() <= 0.02 * (want.abs() + want.abs().max())
    assert close.float().mean() >= 0.95
    prompt = ids[-1:, -6:]
    plain_tokens, plain_logits = greedy_steps(kept, prompt, 6, "forward")
    monkeypatch.delenv("AUTOLM_EAGER", raising=False)
    step.install_plan(kept, graphs.exported(kept))  # the graphs AOTInductor compiles, exported
    tokens, logits = greedy_steps(kept, prompt, 6, "auto")
    assert step._PLANS[kept][1] is not None and tokens == plain_tokens
    assert ((logits - plain_logits).abs() <= 0.02 * (plain_logits.abs() + plain_logits.abs().max())).all()


# The families' chat templates as their tokenizer_config.json / chat_template.jinja hold them: Mixtral-8x7B-Instruct
# (user and assistant only: a system turn raises), Qwen 2 MoE's ChatML (Qwen2-57B-A14B-Instruct), Qwen 3 MoE's
# (Qwen3's, thinking and tools), gpt-oss's harmony format (channels, reasoning effort, tools); the last two as
# llama.cpp's models/templates copy them from the Hub.
TEMPLATES = {
    "mixtral": ("mixtral-8x7b-instruct-v0.1.jinja", ()),
    "qwen2_moe": ("qwen2-moe-chatml.jinja", ("<|im_start|>", "<|im_end|>")),
    "qwen3_moe": ("qwen3-moe.jinja", ("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    "gpt_oss": (
        "gpt-oss.jinja",
        ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"),
    ),
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}


def _chat_tokenizer(path, template: str, specials) -> str:
    """A character tokenizer with the family's turn markers as special tokens and its chat template."""
    import json
    import os

    from conftest import write_char_tokenizer
    from tokenizers import AddedToken, Tokenizer

    os.makedirs(path, exist_ok=True)
    write_char_tokenizer(str(path))
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    specials = ("<pad>", "<s>", "</s>", *specials)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(os.path.join(path, "tokenizer.json"))
    config = json.load(open(os.path.join(path, "tokenizer_config.json")))
    with open(os.path.join(os.path.dirname(__file__), "data", "chat_templates", template)) as f:
        config["chat_template"] = f.read()
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def _conversations(name: str) -> list[tuple[list[dict], dict]]:
    """(messages, extra template arguments) each family's template takes."""
    turns = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
    ]
    system = [{"role": "system", "content": "Be brief."}]
    if name == "mixtral":
        return [(turns[:1], {}), (turns, {})]
    out = [(turns[:1], {}), (turns, {}), (system + turns, {})]
    if name == "qwen3_moe":
        thought = {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nParis."}
        call = {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        }
        out += [
            (turns + [thought], {}),
            (turns, {"enable_thinking": False}),
            (system + turns + [call, {"role": "tool", "content": "Sunny"}], {"tools": [WEATHER]}),
        ]
    if name == "gpt_oss":
        answer = {"role": "assistant", "content": "Paris.", "thinking": "The user asks a capital."}
        call = {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        }
        out += [
            (system + turns, {"reasoning_effort": "high", "model_identity": "You are a tiny model."}),
            (turns + [answer, {"role": "user", "content": "Thanks"}], {}),
            (turns + [call, {"role": "tool", "content": "Sunny"}], {"tools": [WEATHER]}),
        ]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_renders_like_transformers(name, tmp_path):
    """Each family's real template renders (text and ids) as transformers renders it, with and without the
    generation prompt; Mixtral's refuses a system turn as transformers' does."""
    import jinja2
    import transformers

    from autolm.errors import TokenizerError

    directory = _chat_tokenizer(tmp_path, *TEMPLATES[name])
    ours, ref = (
        autolm.AutoTokenizer.from_pretrained(directory),
        transformers.AutoTokenizer.from_pretrained(directory),
    )
    for messages, extra in _conversations(name):
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **extra)
            assert text == ref.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False, **extra
            )
            ids = ours.apply_chat_template(messages, add_generation_prompt=gen, **extra)["input_ids"]
            assert ids == ref.apply_chat_template(messages, add_generation_prompt=gen, **extra)["input_ids"]
    if name == "mixtral":
        system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        with pytest.raises(TokenizerError, match="alternate"):
            ours.apply_chat_template(system, tokenize=False)
        with pytest.raises(jinja2.TemplateError, match="alternate"):
            ref.apply_chat_template(system, tokenize=False)


@pytest.mark.parametrize("name", NAMES)
def test_cli_generate_chat_and_inspect(name, tmp_path_factory, tmp_path):
    """`autolm generate --chat` (the family's template) answers with transformers' greedy tokens; `autolm
    inspect` names the family, its experts and the parameters one token uses."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import transformers

    src, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    directory = tmp_path / "model"
    shutil.copytree(src, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(
        json.dumps({**config, "max_position_embeddings": 512})
    )  # harmony's prompt
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    tokenizer = _chat_tokenizer(tmp_path / "tokenizer", *TEMPLATES[name])
    for f in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, f), directory)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    want = tok.decode(
        hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True
    )
    env = dict(os.environ, AUTOLM_HOME=str(tmp_path / "home"))

    def cli(*args):
        p = subprocess.run(
            [sys.executable, "-m", "autolm.cli", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert p.returncode == 0, p.stderr
        return p.stdout

    assert cli("generate", str(directory), "Hi", "--chat", "--max-new-tokens", "8").strip() == want.strip()
    shown = cli("inspect", str(directory))
    c = hf.config
    experts = getattr(c, "num_local_experts", None) or c.num_experts
    expert_params = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    active = hf.num_parameters() - expert_params * (experts - c.num_experts_per_tok) // experts
    assert f"{type(hf).__name__} ({c.model_type})" in shown
    assert (
        f"experts:      {experts} in each of" in shown and f"{c.num_experts_per_tok} used per token" in shown
    )
    assert f"active parameters per token {active:,}" in shown


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory, name):
    """peft has no default target modules for these types: both refuse a LoraConfig that names none."""
    import peft
    import transformers

    from autolm.errors import AdapterError

    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig())
    with pytest.raises(AdapterError, match=name):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


def test_sharded_checkpoints_both_ways(tmp_path_factory, tmp_path):
    """transformers' sharded save (one expert's pieces in several files) loads; autolm's sharded save (the
    stacked experts split back into per-expert tensors) loads in transformers with the same logits."""
    import transformers

    _, hf = FAMILIES["mixtral"].checkpoint(tmp_path_factory)
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="40KB")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "theirs")
    assert len(model.load_report.files) > 3
    ids, mask = padded_batch()
    real = mask.bool()
    model.save_pretrained(tmp_path / "ours", max_shard_size="40KB")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            back(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_save_loads_back(tmp_path_factory, tmp_path, bits):
    """A quantized MoE model saved by autolm (its experts split per expert as the checkpoint names them) loads
    back with the same logits."""
    directory, _ = FAMILIES["qwen2_moe"].checkpoint(tmp_path_factory)
    quant = autolm.AutoModelForCausalLM.from_pretrained(directory, quantization=bits)
    quant.save_pretrained(tmp_path)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back.model.layers[0].mlp.experts) is type(quant.model.layers[0].mlp.experts)
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            back(ids, attention_mask=mask).logits, quant(ids, attention_mask=mask).logits
        )


def test_bench_counts_only_the_experts_a_token_uses(tmp_path_factory):
    """The benchmark's bytes per decode step and prefill FLOPs count the experts a token uses, not all of them."""
    from autolm.bench import prefill_flops
    from autolm.bench.moe import unused_expert_bytes

    directory, _ = FAMILIES["qwen3_moe"].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    c = model.config  # one sparse layer (decoder_sparse_step 2) of 6 experts, 2 used
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    assert unused_expert_bytes(model) == (c.num_experts - c.num_experts_per_tok) * per_expert * 4
    dense = c.hidden_size * 3 * c.intermediate_size
    attention = sum(
        m.in_features * m.out_features
        for m in model.model.layers[0].self_attn.modules()
        if hasattr(m, "in_features")
    )
    router = 0  # the router's logits are not among the matrices prefill_flops counts
    weights = 2 * attention + dense + c.num_experts_per_tok * per_expert + router
    attn = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 5 * 6 / 2
    assert prefill_flops(model, 5) == 2 * weights * 5 + attn + 2 * c.hidden_size * c.vocab_size


def test_gguf_bench_counts_the_kept_experts_a_token_uses(tmp_path_factory, tmp_path):
    """The GGUF benchmark's bytes per decode step for a file whose experts stay in their blocks: the kept tensors
    but the embedding and the experts' blocks a token does not use; its table names the eager decode's tokens."""
    import io

    from gguf_moe import write_moe_gguf

    from autolm.bench.gguf import kept_bytes, print_rows

    _, hf = GGUF_FAMILIES["qwen3_moe"].checkpoint(tmp_path_factory)
    path = tmp_path / "model.gguf"
    write_moe_gguf(hf, str(path), experts={"gate": "Q8_0", "up": "Q8_0", "down": "Q4_0"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="gguf")
    c = model.config
    blocks = 0
    for layer in model.model.layers:
        e = layer.mlp.experts
        blocks += sum(s.weight.numel() for s in (e.gate_proj, e.up_proj, e.down_proj))
    emb = model.model.embed_tokens
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    if model.lm_head.weight is not getattr(emb, "blocks", None):  # an untied head: the embedding is not read
        for t in emb.buffers():
            tensors.pop(id(t))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    unused = blocks * (c.num_experts - c.num_experts_per_tok) // c.num_experts
    assert 0 < kept_bytes(str(path)) == total - unused < total
    out = io.StringIO()
    results = {"autolm": {"decode": (10.0, 0.0), "decode_n": (128, 0)}, "llama.cpp": {"decode": (20.0, 0.0)}}
    print_rows("file", results, 1, 1, out)
    assert "| decode tok/s, eager (128) | 10.0 ± 0.0 | 20.0 ± 0.0 | 0.50x |" in out.getvalue()


def test_tensor_parallel_save_gathers_the_experts(tmp_path_factory, tmp_path):
    """Under tensor parallelism each rank holds a slice of every expert; save_pretrained writes them whole (the
    checkpoint transformers reads, equal to the one-process model's)."""
    import textwrap

    from safetensors.torch import load_file
    from test_distributed import torchrun

    directory, _ = FAMILIES["qwen2_moe"].checkpoint(tmp_path_factory)
    script = tmp_path / "tp_save.py"
    script.write_text(
        textwrap.dedent("""
        import sys, torch
        import autolm
        from autolm.distributed import exit_all
        torch.set_num_threads(1)
        model = autolm.AutoModelForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto")
        model.save_pretrained(sys.argv[2])
        exit_all()
    """)
    )
    torchrun(str(script), directory, str(tmp_path / "saved"))
    want = load_file(f"{directory}/model.safetensors")
    got = load_file(tmp_path / "saved" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_gpt_oss_has_no_tensor_parallel_plan(tmp_path_factory):
    """gpt-oss has no tensor-parallel plan (transformers has none either; its per-head sinks would need one): a
    clear error before any rank is started."""
    from autolm.errors import ConfigError

    directory, _ = FAMILIES["gpt_oss"].checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
