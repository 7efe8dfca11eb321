"""GGUF in and out of Nemotron 3's MoE layout (llama.cpp's "nemotron_h_moe"): the file llama.cpp's NemotronHModel
converter writes (emulated with the gguf package) loads as NemotronHForCausalLM with transformers' logits, save_gguf
writes that same file, its Q8_0 version runs in its own blocks, and what llama.cpp's graph cannot run is refused.
Two tiny Nemotron 3 stacks: Nano-like (Mamba-2, MoE, attention, MoE, Mamba-2; sigmoid routing in 2 groups choosing
1, routed_scaling_factor 2.5, head_dim other than hidden / heads) and Super-like (the experts behind latent
projections, one group, the top k not renormalised)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VOCAB
from family_checks import Family
from test_family_nemotron_h import MOE, SIZES, _converted, _logits, write_nemotron_h_gguf
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm

GGUF_MOE = Family(
    "NemotronHConfig",
    dict(SIZES, **MOE, use_bias=False, mlp_bias=False, head_dim=24,
         layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention"]),
)  # fmt: skip
GGUF_LATENT = Family(
    "NemotronHConfig",
    dict(SIZES, **{**MOE, "n_group": 1}, use_bias=False, mlp_bias=False, moe_latent_size=40, norm_topk_prob=False,
         layers_block_type=["linear_attention", "moe", "full_attention", "moe"]),
)  # fmt: skip
FAMILIES = pytest.mark.parametrize("family", [GGUF_MOE, GGUF_LATENT], ids=["nano", "latent"])


def _moe_keys(w, c, kinds: list[str]) -> None:
    """NemotronHModel.set_gguf_parameters' MoE branch (after TextModel's expert keys: expert_count,
    expert_used_count, expert_group_count and expert_group_used_count off n_routed_experts, num_experts_per_tok,
    n_group and topk_group): the MoE length per layer, the expert sizes and counts, the top k's
    renormalisation and scaling, moe_latent_size where config.json sets it."""
    w.add_feed_forward_length([c.moe_intermediate_size if k == "moe" else 0 for k in kinds])
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(c.moe_shared_expert_intermediate_size)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_weights_norm(c.norm_topk_prob)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_group_count(c.n_group)
    if c.moe_latent_size is not None:
        w.add_moe_latent_size(c.moe_latent_size)


def _tensors(hf, c, kinds: list[str]):
    """The converter's tensors: the router's bias as e_score_correction.bias (ModelBase.filter_tensors), each MoE
    block's experts stacked, down_proj and up_proj, under the merged name it maps (model.layers.N.mlp.experts.*),
    the Mamba-2 and attention tensors as for the dense layout (the MoE branch's own Mamba-2 transforms are the
    same), the rest as they are."""
    from safetensors.torch import load_file

    tensors, experts = load_file(f"{hf.name_or_path}/model.safetensors"), {}
    for name, t in tensors.items():
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if ".mixer.experts." in name:
            bid = int(name.split(".")[2])
            experts.setdefault(bid, {})[name] = t
            if len(experts[bid]) == 2 * c.n_routed_experts:
                for part in ("down_proj", "up_proj"):
                    stack = [experts[bid][f"backbone.layers.{bid}.mixer.experts.{e}.{part}.weight"]
                             for e in range(c.n_routed_experts)]  # fmt: skip
                    yield f"model.layers.{bid}.mlp.experts.{part}.weight", torch.stack(stack)
            continue
        yield _converted(name, t, c, kinds)


def write_nemotron_h_moe_gguf(hf, path: str, kind: str = "F32", mtp: bool = False) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Nemotron-H with MoE blocks `hf` (config.json has
    num_experts_per_tok: arch "nemotron_h_moe"; --outtype f32, or q8_0: 2-D and 3-D weights in Q8_0 but the
    router and the conv (F32), F16 where a row is no whole block): the dense layout's keys (TextModel's, Llama's,
    GraniteHybridModel's, NemotronHModel's key/value length) with TextModel's expert keys and the MoE branch's
    (_moe_keys); the tensors as _tensors maps them. `mtp`: as of a checkpoint with a multi-token-prediction
    head, one block more (attention and MoE in the per-layer keys, nextn_predict_layers 1) with its tensors (a
    few, random: the reader leaves them)."""
    import gguf
    from gguf_mimic import add_toy_vocab

    c, q8 = hf.config, kind == "Q8_0"
    kinds = list(c.layers_block_type) + (["mtp"] if mtp else [])
    n = len(kinds)
    w = gguf.GGUFWriter(path, "nemotron_h_moe")
    w.add_block_count(n)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.layer_norm_epsilon)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_ssm_conv_kernel(c.conv_kernel)
    w.add_ssm_state_size(c.ssm_state_size)
    w.add_ssm_group_count(c.n_groups)
    w.add_ssm_inner_size(c.mamba_num_heads * c.mamba_head_dim)
    w.add_ssm_time_step_rank(c.mamba_num_heads)
    w.add_head_count_kv([c.num_key_value_heads if k in ("full_attention", "mtp") else 0 for k in kinds])
    w.add_rope_scaling_finetuned(False)
    w.add_context_length(2**20)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    _moe_keys(w, c, ["moe" if k == "mtp" else k for k in kinds])
    if mtp:
        w.add_nextn_predict_layers(1)
        for stem, shape in (("nextn.eh_proj", (c.hidden_size, 2 * c.hidden_size)), ("attn_norm", (c.hidden_size,)),
                            ("ffn_gate_inp", (c.n_routed_experts, c.hidden_size))):  # fmt: skip
            w.add_tensor(f"blk.{n - 1}.{stem}.weight", np.random.default_rng(0).random(shape, np.float32))
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NEMOTRON_H_MOE, n)
    for name, t in _tensors(hf, c, kinds[: len(c.layers_block_type)]):
        name = names.get_name(name) or names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert name is not None
        a = np.ascontiguousarray(t.float().numpy())
        stem = name.split(".")[2 if name.startswith("blk.") else 0]
        if q8 and a.ndim >= 2 and name.endswith(".weight") and stem not in ("ssm_conv1d", "ffn_gate_inp"):
            if not stem.endswith("_norm") and a.shape[-1] % 32 == 0:
                w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
                continue
            if not stem.endswith("_norm"):
                a = a.astype(np.float16)
        elif q8 and a.ndim >= 2 and stem in ("ssm_a", "ssm_d"):  # no ".weight": F16 (rows of 1)
            a = a.astype(np.float16)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(hf, path: str) -> None:
    """The converter's file of any Nemotron-H checkpoint here: "nemotron_h_moe" with MoE blocks, else "nemotron_h"."""
    moe = "moe" in hf.config.layers_block_type
    (write_nemotron_h_moe_gguf if moe else write_nemotron_h_gguf)(hf, path)


@FAMILIES
def test_the_converters_file_loads(tmp_path_factory, tmp_path, family):
    """The converter's file loads as NemotronHForCausalLM with transformers' logits: the block kinds off the
    per-layer KV heads and MoE lengths, the expert sizes, groups, scaling and renormalisation off the expert keys,
    the router's bias off exp_probs_b, the latent size where set."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_nemotron_h_moe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "NemotronHForCausalLM" and model.gguf.arch == "nemotron_h_moe"
    c, kw = model.config, family.kwargs
    assert [c.block_type(i) for i in range(c.num_hidden_layers)] == kw["layers_block_type"]
    for field in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group",
                  "moe_shared_expert_intermediate_size", "routed_scaling_factor"):  # fmt: skip
        assert getattr(c, field) == kw[field], field
    assert (c.moe_latent_size, c.norm_topk_prob) == (
        kw.get("moe_latent_size"),
        kw.get("norm_topk_prob", True),
    )
    assert c.head_dim == kw["head_dim"] and not c.mlp_bias
    bias = model.model.layers[1].mixer.gate.e_score_correction_bias
    torch.testing.assert_close(bias, hf.model.layers[1].mixer.gate.e_score_correction_bias)
    torch.testing.assert_close(_logits(model), _logits(hf), atol=1e-4, rtol=1e-4)


def test_a_multi_token_prediction_block_is_left_out(tmp_path_factory, tmp_path):
    """A file converted with the checkpoint's MTP head (one block more, nextn_predict_layers 1): the model of the
    blocks before it, as transformers skips the head, with transformers' logits."""
    _, hf = GGUF_MOE.checkpoint(tmp_path_factory)
    write_nemotron_h_moe_gguf(hf, str(tmp_path / "model.gguf"), mtp=True)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert model.config.num_hidden_layers == 5 and model.config.block_type(4) == "linear_attention"
    torch.testing.assert_close(_logits(model), _logits(hf), atol=1e-4, rtol=1e-4)


def test_q8_0_runs_in_its_own_blocks(tmp_path_factory, tmp_path):
    """The converter's Q8_0 file with quantization="gguf": the Mamba-2 projections, the shared MLP and the stacked
    non-gated experts kept in their Q8_0 blocks, computing as the file's weights dequantized do; those weights
    within Q8_0's rounding of transformers', the logits near the F32 file's (Q8_0's rounding of these random
    weights sends some tokens to other experts: looser than for a dense model)."""
    _, hf = GGUF_MOE.checkpoint(tmp_path_factory)
    write_nemotron_h_moe_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    plain = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf")
    assert hasattr(kept.model.layers[0].mixer.in_proj, "ggml_type")
    assert hasattr(kept.model.layers[1].mixer.shared_experts.up_proj, "ggml_type")
    experts = kept.model.layers[3].mixer.experts
    assert type(experts).__name__ == "GGMLExperts" and experts.gate_proj is None
    assert experts.up_proj.ggml_type == experts.down_proj.ggml_type == 8  # Q8_0
    theirs = hf.state_dict()
    for name in ("model.layers.1.mixer.experts.up_proj", "model.layers.3.mixer.experts.down_proj",
                 "model.layers.1.mixer.gate.weight", "model.layers.0.mixer.in_proj.weight"):  # fmt: skip
        ours = plain.get_parameter(name)
        assert (ours - theirs[name]).norm() / theirs[name].norm() < 0.01, name
    with (
        torch.no_grad()
    ):  # each expert on its blocks as on the weights they hold (the kernel's int8 activations)
        x = torch.randn(5, experts.hidden_size, generator=torch.Generator().manual_seed(0))
        deq = plain.model.layers[3].mixer.experts
        for e in [*range(experts.num_experts), torch.tensor([0, 3, 1, 1, 2])]:
            assert (experts.expert(x, e) - deq.expert(x, e)).norm() / deq.expert(x, e).norm() < 0.02, e
    got, want = _logits(kept), _logits(hf)
    assert (got - want).norm() / want.norm() < 0.3


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"mlp_bias": True}, "mlp_bias"),
        ({"layers_block_type": ["linear_attention", "moe", "mlp", "full_attention"]}, "layers_block_type"),
        ({"topk_group": 2}, "topk_group"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"time_step_min": 0.01}, "time_step_min"),
    ],
    ids=["shared_bias", "mlp_beside_moe", "all_groups", "no_scaling", "clamp"],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path, byte_tokenizer, kw, field):  # noqa: F811
    """Biases on the shared MLP (llama.cpp has none), dense MLP blocks beside MoE ones (every feed-forward block
    of the format is a MoE one), groups all chosen (llama.cpp refuses topk_group = n_group), a routed scaling of 0
    (llama.cpp reads 1) and the dense layout's fixed values: a ConfigError naming the field, and no file."""
    from autolm.gguf_writer import save_gguf
    from autolm.models.nemotron_h import NemotronHConfig

    config = NemotronHConfig.from_dict({**GGUF_MOE.kwargs, "vocab_size": VOCAB, **kw})
    model = autolm.AutoModelForCausalLM.from_config(config)
    with pytest.raises(autolm.ConfigError, match=f"'nemotron_h_moe'.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
