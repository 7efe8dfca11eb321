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
layers, as DeepSeek-V3.2's). GGUF as llama.cpp's "glm5-next" (models.glm5_next_gguf): the converter's file
(write_glm5_next_gguf, from the released spelling of a checkpoint llama.cpp can hold) loads with transformers' logits
and runs in llama.cpp close to them; autolm's file is the converter's, reads back equal and runs in llama.cpp; what
llama.cpp's graph computes otherwise is refused by field on GGUF out, and such files on reading."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import transformers
from conftest import padded_batch, positions
from family_checks import check_wrapper_lora
from test_family_minimax_m2 import RoutedFamily
from test_gguf_out import merged_tokenizer  # noqa: F401

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
    check_wrapper_lora(FAMILIES[name], tmp_path_factory, tmp_path, lambda key: ".visual." not in key)


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


def _released_tensors(directory: str) -> dict[str, torch.Tensor]:
    """A transformers checkpoint's tensors under the released files' names and layout."""
    from safetensors.torch import load_file

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
    return released


def test_released_names_load(tmp_path_factory, tmp_path):
    """The released files' names (the forget gate's tensors on self_attn, hc_attn_fn ..., per-expert tensors,
    q/k/v_conv1d pieces) load to the same logits."""
    import shutil

    from safetensors.torch import save_file

    directory, _ = GLM.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "released")
    released = _released_tensors(directory)
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


# ---- GGUF: llama.cpp's Glm5NextModel converter (arch "glm5-next") -------------------------------------------------

# what llama.cpp's glm5-next holds: four streams, KDA heads as the attention heads, a leading dense layer, an untied
# head; a shared indexer layer, pools of 2, a bounded forget gate, expert groups, the top k not renormalised and a
# SwiGLU limit
GGUF_FAMILY = RoutedFamily(
    "Glm5NextConfig",
    dict(SIZES, hc_mult=4, linear_num_heads=4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"], swiglu_limit=0.3,
         n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5),
)  # fmt: skip
ARCH = "glm5-next"
# the released names (in a layer) -> llama.cpp's (gguf-py's tensor map for glm5-next; this gguf-py has none)
_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    **{f"self_attn.{p}_conv1d": f"ssm_conv1d_{p}" for p in "qkv"}, "self_attn.f_a_proj": "ssm_f_a",
    "self_attn.f_b_proj": "ssm_f_b", "self_attn.b_proj": "ssm_beta", "self_attn.g_a_proj": "ssm_g_a",
    "self_attn.g_b_proj": "ssm_g_b", "self_attn.o_norm": "ssm_norm", "self_attn.A_log": "ssm_a",
    "self_attn.dt_proj": "ssm_dt", "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.k_b_proj": "attn_k_b", "self_attn.v_b_proj": "attn_v_b",
    "self_attn.indexer.wq_b": "indexer.attn_q_b", "self_attn.indexer.wk": "indexer.attn_k",
    "self_attn.indexer.k_norm": "indexer.k_norm", "self_attn.indexer.weights_proj": "indexer.proj",
    "self_attn.indexer.index_kpool_compress_gate": "indexer_compressor_gate",
    "self_attn.indexer.index_kpool_compress_ape": "indexer_compressor_ape",
    **{f"hc_{p}_{q}": f"hc_{p}_{q}" for p in ("attn", "ffn") for q in ("fn", "base", "scale")},
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.gate.e_score_correction": "exp_probs_b",
    **{f"mlp.shared_experts.{p}_proj": f"ffn_{p}_shexp" for p in ("gate", "up", "down")},
    **{f"mlp.experts.{p}_proj": f"ffn_{p}_exps" for p in ("gate", "up", "down")},
    **{p: f"nextn.{p}" for p in ("eh_proj", "enorm", "hnorm")},
}  # fmt: skip
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}  # fmt: skip


def _gguf_keys(w, hp: dict, nextn: int = 0) -> None:
    """TextModel's keys (no RoPE settings: the config has none; head_dim popped) and Glm5NextModel's; `nextn`
    next-token blocks counted in the block count and the per-layer keys."""
    import gguf

    n, lin, a = hp["num_hidden_layers"] + nextn, hp["linear_attn_config"], ARCH
    w.add_block_count(n)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_expert_count(hp["n_routed_experts"])
    w.add_expert_used_count(hp["num_experts_per_tok"])
    w.add_expert_group_count(hp["n_group"])
    w.add_expert_group_used_count(hp["topk_group"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    kv = [0 if t == "linear_attention" else 1 for t in hp["layer_types"]]
    w.add_array(f"{a}.attention.head_count_kv", kv + [1] * nextn)
    if nextn:
        w.add_uint32(f"{a}.nextn_predict_layers", nextn)
    w.add_vocab_size(hp["vocab_size"])
    w.add_layer_norm_eps(1e-6)
    assert lin["num_heads"] == hp["num_attention_heads"]
    w.add_ssm_conv_kernel(lin["short_conv_kernel_size"])
    w.add_uint32(f"{a}.kda.head_dim", lin["head_dim"])
    if lin.get("gate_lower_bound") is not None:
        w.add_float32(f"{a}.kda.gate_lower_bound", lin["gate_lower_bound"])
    assert hp.get("mla_use_nope") and hp["qk_rope_head_dim"] == 0
    w.add_q_lora_rank(hp["q_lora_rank"])
    w.add_kv_lora_rank(hp["kv_lora_rank"])
    w.add_rope_dimension_count(0)
    w.add_key_length(hp["kv_lora_rank"])
    w.add_value_length(hp["kv_lora_rank"])
    w.add_key_length_mla(hp["qk_nope_head_dim"])
    w.add_value_length_mla(hp["v_head_dim"])
    w.add_uint32(f"{a}.attention.indexer.head_count", hp["index_n_heads"])
    w.add_uint32(f"{a}.attention.indexer.key_length", hp["index_head_dim"])
    w.add_uint32(f"{a}.attention.indexer.top_k", hp["index_topk"])
    w.add_uint32(f"{a}.attention.indexer.kpool", hp["index_kpool"])
    w.add_bool(f"{a}.attention.indexer.kpool_select_tail", hp.get("index_kpool_always_select_tail", True))
    w.add_array(f"{a}.attention.indexer.types", [t == "full" for t in hp["indexer_types"]])
    w.add_uint32(f"{a}.hyper_connection.count", hp["hc_mult"])
    w.add_uint32(f"{a}.hyper_connection.sinkhorn_iterations", hp["hc_sinkhorn_iters"])
    w.add_float32(f"{a}.hyper_connection.epsilon", hp["hc_eps"])
    w.add_leading_dense_block_count(hp["first_k_dense_replace"])
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_expert_shared_count(hp["n_shared_experts"])
    w.add_expert_weights_scale(hp["routed_scaling_factor"])
    w.add_bool(f"{a}.expert_weights_norm", hp["norm_topk_prob"])
    w.add_array(f"{a}.swiglu_clamp_exp", [hp["swiglu_limit"]] * n)
    w.add_array(f"{a}.swiglu_clamp_shexp", [hp["swiglu_limit"]] * n)


def _gguf_tensors(tensors: dict, hp: dict):
    """(llama.cpp name, tensor) of the released tensors as Glm5NextModel.modify_tensors maps them."""
    from gguf_mimic import stacked_experts
    from gguf_moe import mla_pieces

    heads, nope = hp["num_attention_heads"], hp["qk_nope_head_dim"]
    tensors = {k.replace("language_model.", "").replace("e_score_correction_bias", "e_score_correction.bias"): v
               for k, v in tensors.items() if ".visual." not in k}  # fmt: skip
    for whole, stacked in stacked_experts(tensors, ".mlp.experts.", hp["n_routed_experts"]):
        for name, t in mla_pieces(whole, stacked, heads, nope):
            if name in _TOP:
                yield _TOP[name], t
                continue
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?", name)
            stem, kind = m.group(2), m.group(3)
            if stem.endswith("_conv1d"):
                t = t.reshape(1, t.shape[0], 1, t.shape[-1])
            if stem.endswith("A_log"):
                yield f"blk.{m.group(1)}.ssm_a", -torch.exp(t.float().flatten()[:heads])
                continue
            if stem.endswith("dt_bias"):
                stem, kind = "self_attn.dt_proj", "bias"
            yield f"blk.{m.group(1)}.{_GGUF_NAMES[stem]}.{kind or 'weight'}", t


def write_glm5_next_gguf(hf, path: str, nextn: int = 0) -> None:
    """The GGUF llama.cpp's Glm5NextModel converter (--outtype f32, no next-token block) makes of the released files
    of transformers' checkpoint `hf`: its config.json spelling (linear_attn_config, first_k_dense_replace,
    mla_use_nope) and names (models.glm5_next's RENAMES, the per-expert and q/k/v conv pieces); the experts stacked,
    kv_b_proj split into attn_k_b / attn_v_b, the convs (1, d_inner, 1, K), A_log as -exp(A_log), dt_bias as
    ssm_dt.bias, the hyper-connections and the k-pool compressor under ".weight", the tied head left out. `nextn`:
    with a next-token block (layer 1's attention and mixture, eh_proj and its norms) after the layers."""
    import gguf
    import numpy as np
    from gguf_mimic import add_toy_vocab

    hp = json.load(open(f"{hf.name_or_path}/config.json"))["text_config"]
    hp["linear_attn_config"] = dict(num_heads=hp["linear_num_heads"], head_dim=hp["linear_head_dim"],
                                    short_conv_kernel_size=hp["linear_conv_kernel_dim"],
                                    gate_lower_bound=hp["linear_lower_bound"])  # fmt: skip
    hp.update(first_k_dense_replace=(hp["mlp_layer_types"] + ["sparse"]).index("sparse"), mla_use_nope=True)
    w = gguf.GGUFWriter(path, ARCH)
    _gguf_keys(w, hp, nextn)
    add_toy_vocab(w)
    tied = json.load(open(f"{hf.name_or_path}/config.json")).get("tie_word_embeddings", False)
    tensors, n, h = _released_tensors(hf.name_or_path), hp["num_hidden_layers"], hp["hidden_size"]
    if nextn:
        block = f"model.language_model.layers.{n}."
        tensors.update({k.replace(".layers.1.", f".layers.{n}."): v for k, v in tensors.items()
                        if ".layers.1." in k and ".hc_" not in k})  # fmt: skip
        tensors.update({block + "eh_proj.weight": torch.randn(h, 2 * h), block + "enorm.weight": torch.ones(h),
                        block + "hnorm.weight": torch.ones(h)})  # fmt: skip
    for name, t in _gguf_tensors(tensors, hp):
        if not (name == "output.weight" and tied):
            w.add_tensor(name, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_converters_file(tmp_path_factory, tmp_path):
    """The converter's file loads as Glm5NextForCausalLM with the config's fields and transformers' logits (a padded
    batch, 1e-4); llama.cpp runs it close to them."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    path = str(tmp_path / "conv.gguf")
    write_glm5_next_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="conv.gguf")
    assert type(model).__name__ == "Glm5NextForCausalLM"
    c, theirs = model.config, hf.config.text_config
    for key in ("layer_types", "mlp_layer_types", "indexer_types", "hc_mult", "hc_eps", "hc_sinkhorn_iters",
                "swiglu_limit", "linear_lower_bound", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim",
                "v_head_dim", "qk_nope_head_dim", "q_lora_rank", "kv_lora_rank", "index_topk", "index_head_dim",
                "index_n_heads", "index_kpool", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                "n_shared_experts", "rms_norm_eps", "tie_word_embeddings"):  # fmt: skip
        assert getattr(c, key) == pytest.approx(getattr(theirs, key)), key
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real],
                                   hf(ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4)  # fmt: skip
        ours = model(ROW).logits[0]
    _close_to_llama_cpp(ours, llama_cpp_logits(path))


def test_gguf_next_token_block_skipped(tmp_path_factory, tmp_path):
    """A file with a next-token block (block_count and the per-layer keys counting it, nextn_predict_layers) loads
    the layers before it, with the same logits."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_glm5_next_gguf(hf, str(tmp_path / "mtp.gguf"), nextn=1)
    write_glm5_next_gguf(hf, str(tmp_path / "plain.gguf"))
    mtp = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mtp.gguf")
    plain = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="plain.gguf")
    assert mtp.config.num_hidden_layers == 4 and mtp.config.num_nextn_predict_layers == 1
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(mtp(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


def test_gguf_out(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """autolm's file is the converter's (metadata and tensors), reads back as the same model, and llama.cpp runs it
    with transformers' logits (close)."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    directory, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    out = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    write_glm5_next_gguf(hf, str(tmp_path / "conv.gguf"))
    ours, conv = GGUFReader(out), GGUFReader(str(tmp_path / "conv.gguf"))
    keys = lambda r: {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith(ARCH)}  # noqa: E731
    assert keys(ours) == keys(conv)
    tensors = lambda r: {t.name: np.asarray(t.data).tobytes() for t in r.tensors}  # noqa: E731
    assert tensors(ours) == tensors(conv)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-5)
        row = hf(ROW).logits[0]
    _close_to_llama_cpp(row, llama_cpp_logits(out))


@pytest.mark.parametrize(
    ("field", "value"),
    [("tie_word_embeddings", True), ("mlp_layer_types", ["dense", "sparse", "dense", "sparse"]), ("hc_mult", 2),
     ("linear_num_heads", 2), ("index_kpool", 1), ("swiglu_limit", 0.0), ("attention_bias", True)],
)  # fmt: skip
def test_gguf_out_refuses_what_llama_cpp_computes_otherwise(tmp_path_factory, tmp_path, field, value):
    """A config llama.cpp's glm5-next would run otherwise (or not load) is a ConfigError naming the field; no file."""
    GGUF_FAMILY.check_gguf_refused(tmp_path_factory, tmp_path, field, lambda c: setattr(c, field, value))


@pytest.mark.parametrize(
    ("given", "message"),
    [({"swiglu_clamp_exp": None}, "swiglu_limit"), ({"swiglu_clamp_shexp": [1.0, 2.0]}, "swiglu_limit"),
     ({"rope.dimension_count": 8}, "qk_rope_head_dim"), ({"expert_gating_func": 1}, "expert_gating_func"),
     ({"attention.layer_norm_epsilon": 1e-5}, "k_norm")],
)  # fmt: skip
def test_gguf_files_refused(given, message):
    """glm5-next files llama.cpp runs as no GLM-5.3-Flash: refused naming the field; a scalar KV head count too."""
    from autolm.models.glm5_next_gguf import derive

    keys = {"swiglu_clamp_exp": [1.0, 1.0], **given}
    get = lambda key, default=None: keys.get(key, default)  # noqa: E731
    with pytest.raises(autolm.ConfigError, match=message):
        derive({"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": [0, 1]}, get)
    with pytest.raises(autolm.ConfigError, match="layer_types"):
        derive({"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1}, get)


def test_hidden_states_are_transformers_streams(tmp_path_factory):
    GLM.check_hidden_states(tmp_path_factory)
