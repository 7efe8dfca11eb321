"""GLM-5.3-Flash's language model (glm5_next_text; glm5_next: the image-text checkpoints) against transformers'
Glm5NextForConditionalGeneration (a tiny vision tower; transformers has no text-only causal LM) and peft:
hyper-connections with Sinkhorn-made mixing, KDA layers (the bounded forget gate, or softplus without a bound), latent
attention without RoPE over the keys the k-pool indexer keeps (whole pools plus the tail after the last one; a
"shared" layer reusing the layer before it), clamped SwiGLU in the dense MLPs, shared and routed experts.

Two checkpoints, each over 13-token prompts longer than what the indexers keep: GLM (pools of 2, 2 kept, 2 streams,
a shared layer, dense and sparse layers mixed) and a variant (pools of 3, 1 kept, 3 streams, no lower bound, a tight
swiglu_limit, attention biases, values wider than keys, expert groups, the head tied, the indexer schedule from
index_topk_pattern, "full_attention" read as "indexed_attention"). The battery (a padded batch's logits, generate with
beams (GLM), bf16, the eager one-token step and a padded teacher-forced step with the indexers' keys in the cache, LoRA vs
peft, quantized), the text model saved (transformers' Glm5NextTextModel loads it), the released names, the config
as transformers reads and writes it and its checks. No compiled step (the indexed layers read their indexers' cache
layers, as DeepSeek-V3.2's). No GGUF yet (llama.cpp's "glm5-next" is not read or written)."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import transformers
from conftest import padded_batch, positions
from test_family_minimax_m2 import RoutedFamily

import autolm
from autolm import step
from autolm.models.glm5_next import Glm5NextConfig, Glm5NextTextConfig

# transformers maps glm5_next to no causal-LM auto class; its image-text model is the causal LM the battery runs
transformers.AutoModelForCausalLM.register(
    transformers.Glm5NextConfig, transformers.Glm5NextForConditionalGeneration, exist_ok=True
)
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4, out_hidden_size=64,
              projection_intermediate_size=32, image_size=16)  # fmt: skip
SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, v_head_dim=12,
             n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=64, index_topk=4, index_head_dim=16,
             index_n_heads=8, index_kpool=2, linear_head_dim=8, linear_num_heads=2, hc_mult=2, hc_sinkhorn_iters=3,
             layer_types=["linear_attention", "indexed_attention", "indexed_attention", "linear_attention"],
             mlp_layer_types=["dense", "sparse", "sparse", "dense"], indexer_types=["full", "full", "shared", "full"],
             vision_config=VISION)  # fmt: skip
TARGETS = [
    "q_a_proj",
    "kv_b_proj",
    "o_proj",
    "q_proj",
    "g_b_proj",
    "gate_proj",
    "wq_b",
]  # peft has no default
GLM = RoutedFamily("Glm5NextConfig", SIZES, lora_targets=TARGETS)
VARIANT = RoutedFamily(
    "Glm5NextConfig",
    dict(SIZES, hc_mult=3, hc_sinkhorn_iters=20, linear_lower_bound=None, linear_num_heads=3, linear_conv_kernel_dim=3,
         index_kpool=3, index_topk=3, swiglu_limit=0.05, attention_bias=True, v_head_dim=24, n_group=2, topk_group=1,
         norm_topk_prob=False, routed_scaling_factor=1.5, tie_word_embeddings=True, indexer_types=None,
         index_topk_pattern="FSFF", mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
         layer_types=["full_attention", "indexed_attention", "linear_attention", "indexed_attention"]),
    lora_targets=["kv_a_proj_with_mqa", "v_proj", "f_b_proj", "weights_proj", "up_proj"],
)  # fmt: skip
FAMILIES = {"glm": GLM, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_selection_and_clamp_matter(tmp_path_factory):
    """Past the first pools each query keeps 2 pools and its tail (not every earlier key), layer 2 reuses layer 1's
    selection; with plain causal attention, or the SwiGLU unclamped in the variant, the logits are not
    transformers'."""
    directory, hf = GLM.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attns = [layer.self_attn for layer in model.model.layers]
    masks = {}
    for i in (1, 2):
        attns[i].register_forward_pre_hook(lambda m, args, i=i: masks.__setitem__(i, m.keep(*args)))
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    kept = masks[1][0, 0]
    assert kept.sum(-1).tolist() == [
        1,
        2,
        3,
        4,
        5,
        4,
        5,
        4,
        5,
        4,
        5,
        4,
        5,
    ]  # 2 pools of 2 and a tail of 0 or 1
    assert kept[12, 12] and not kept[12, :12].all()
    assert masks[2].equal(masks[1])
    for i in (1, 2):
        attns[i].keep = lambda x, ctx: torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        dense = model(ids[:1], attention_mask=mask[:1]).logits[real[:1]]
        theirs = hf(ids[:1], attention_mask=mask[:1]).logits[real[:1]]
    assert (dense - theirs).abs().max() > 1e-3
    directory, hf = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    for m in model.modules():
        if hasattr(m, "limit"):
            m.limit = 1e6
    with torch.no_grad():
        loose = model(ids, attention_mask=mask).logits[real]
        theirs = hf(ids, attention_mask=mask).logits[real]
    assert (loose - theirs).abs().max() > 1e-3


def test_generate(tmp_path_factory):
    """Greedy and beam search over a padded batch, and one row, give transformers' tokens (the variant's quirks are
    the padded step's below: transformers' reference KDA is slow to generate with)."""
    GLM.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GLM.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    GLM.check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_step(tmp_path_factory, name):
    """The eager step over a left-padded batch, teacher-forced: each token's logits equal transformers' on the whole
    sequence; the cache's extra layers hold each full indexer's keys and gate scores (2 * index_head_dim wide),
    nothing for the other layers; the compiled graphs are not offered."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    n, width = model.config.num_hidden_layers, 2 * model.config.index_head_dim
    indexed = [getattr(layer.self_attn, "indexer", None) is not None for layer in model.model.layers]
    assert model.attention_shapes()[n:] == [(1, width if i else 0) for i in indexed]
    assert not step.compilable(model)
    ids, mask = padded_batch(seed=3)
    more = torch.randint(3, 100, (ids.shape[0], 6), generator=torch.Generator().manual_seed(4))
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        theirs = hf(full_ids, attention_mask=full_mask, position_ids=positions(full_mask)).logits[:, -6:]
    model.decode_mode = "eager"
    with torch.inference_mode():
        cache = model.make_cache(ids.shape[0], full_ids.shape[1] + 1)
        model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache)
        held = [bool(cache.keys[n + i][:, :, : ids.shape[1]].abs().sum() > 0) for i in range(n)]
        assert held == indexed
        decode = step.decoder(model, cache, mask)
        pos = positions(full_mask)
        for i in range(6):
            t = ids.shape[1] + i
            got = decode(more[:, i : i + 1], full_mask[:, : t + 1], pos[:, t : t + 1], cache)
            torch.testing.assert_close(got, theirs[:, i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    """An adapter peft made on transformers' image-text model gives peft's logits in autolm (its vision tower's
    tensors skipped); autolm saves it under the text model's names, the language model's tensors peft saved (peft
    cannot load text names onto the image-text model: transformers maps glm5_next's names without them); merging
    changes nothing."""
    import peft
    from family_checks import _randomize_lora
    from safetensors.torch import load_file

    family = FAMILIES[name]
    directory, hf = family.checkpoint(tmp_path_factory)
    ids, mask = padded_batch(seed=5)
    real = mask.bool()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets))
    _randomize_lora(pm)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask).logits[real]
    pm.unload()
    ours = autolm.PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory),
                                            str(tmp_path / "peft"))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
        ours.save_pretrained(tmp_path / "ours")
        theirs = {k.replace("model.language_model.", "model."): v
                  for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items() if ".visual." not in k}  # fmt: skip
        saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        assert saved.keys() == theirs.keys() and all(torch.equal(saved[k], theirs[k]) for k in saved)
        merged = ours.merge_and_unload()(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, bits", [("variant", "int8"), ("glm", "int4")])
def test_quantized(tmp_path_factory, name, bits):
    FAMILIES[name].check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_text_model_is_transformers(tmp_path_factory, tmp_path, name):
    """The language model's tensors under transformers' text names (the vision tower's skipped); saved, it is the
    glm5_next_text model: text_config's keys and values, transformers' Glm5NextTextModel loads it with hidden states
    whose head gives autolm's logits, and autolm loads it back bit-identical."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "Glm5NextForCausalLM" and model.config.model_type == "glm5_next_text"
    prefix = "model.language_model."
    theirs = {k.replace(prefix, "model."): tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith(prefix) or k == "lm_head.weight"}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "variant")
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())["text_config"]
    for d in (written, original):
        for key in ("transformers_version", "architectures", "dtype", "tie_word_embeddings"):
            d.pop(key, None)
    assert written == original
    text = transformers.AutoModel.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert type(text).__name__ == "Glm5NextTextModel"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        hidden = text(ids, attention_mask=mask).last_hidden_state[real]
        torch.testing.assert_close(ours, hidden @ model.lm_head.weight.T, atol=1e-4, rtol=1e-4)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())


def _released(name: str) -> str:
    """transformers' name -> the released files' (before transformers' conversion mapping)."""
    name = re.sub(r"\.self_attn\.forget_gate\.", ".self_attn.", name)
    return re.sub(r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2", name)


def test_released_names_load(tmp_path_factory, tmp_path):
    """The released files' names (the forget gate's tensors on self_attn, hc_attn_fn ..., per-expert tensors,
    q/k/v_conv1d pieces) load to the same logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, _ = GLM.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "released")
    released = {}
    for k, v in load_file(f"{directory}/model.safetensors").items():
        k = _released(k)
        if k.endswith("mlp.experts.gate_up_proj"):
            for e, (g, u) in enumerate(zip(*v.chunk(2, dim=1), strict=True)):
                released[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = g.contiguous()
                released[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = u.contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            for e, d in enumerate(v):
                released[k.replace("down_proj", f"{e}.down_proj.weight")] = d.contiguous()
        elif k.endswith("self_attn.conv1d.weight"):
            for p, piece in zip("qkv", v.chunk(3), strict=True):
                released[k.replace("conv1d", f"{p}_conv1d")] = piece.contiguous()
        else:
            released[k] = v
    assert "model.language_model.layers.0.hc_attn_fn" in released
    assert "model.language_model.layers.0.self_attn.A_log" in released
    save_file(released, str(tmp_path / "released" / "model.safetensors"), metadata={"format": "pt"})
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "released")(
            ids, attention_mask=mask
        ).logits
        theirs = autolm.AutoModelForCausalLM.from_pretrained(directory)(ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


def test_default_config_is_transformers():
    """Glm5NextTextConfig() writes transformers' defaults; a flat glm5_next file reads as its text settings."""
    theirs = json.loads(transformers.Glm5NextTextConfig().to_json_string())
    theirs.pop("transformers_version")
    assert Glm5NextTextConfig().to_dict() == theirs
    flat = Glm5NextConfig.from_dict({"model_type": "glm5_next", **SIZES, "pad_token_id": 0})
    assert type(flat).__name__ == "Glm5NextTextConfig" and flat.hc_mult == 2 and flat.vocab_size == 154880


@pytest.mark.parametrize("n", [1, 4, 6, 9])
@pytest.mark.parametrize(
    "extra",
    [{}, {"index_topk_freq": 4, "index_skip_topk_offset": 4}, {"linear_attn_config": {"head_dim": 16}}],
)
def test_layer_patterns_are_transformers(n, extra):
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                 num_experts_per_tok=2, num_hidden_layers=n, pad_token_id=0, **extra)  # fmt: skip
    ours, theirs = (
        Glm5NextTextConfig.from_dict(small),
        transformers.Glm5NextTextConfig(**copy.deepcopy(small)),
    )
    for key in ("layer_types", "mlp_layer_types", "indexer_types", "linear_head_dim", "linear_lower_bound"):
        assert getattr(ours, key) == getattr(theirs, key), key


@pytest.mark.parametrize(
    "key, bad",
    [("qk_rope_head_dim", 8), ("index_kpool", 3), ("indexer_types", ["shared", "full"]), ("hc_mult", 0),
     ("swiglu_limit", "x"), ("linear_lower_bound", "x"), ("mlp_layer_types", ["dense"]),
     ("index_kpool_always_select_tail", False), ("hidden_act", "gelu")],
)  # fmt: skip
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, n_routed_experts=8,
                 num_experts_per_tok=2, index_topk=4, index_kpool=2, pad_token_id=0,
                 layer_types=["indexed_attention", "indexed_attention"])  # fmt: skip
    Glm5NextTextConfig(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        Glm5NextTextConfig.from_dict({**small, key: bad})
