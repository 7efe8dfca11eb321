"""Mistral Large 4 (mistral_large4, its language model mistral_large4_text) against transformers'
MistralLarge4ForConditionalGeneration (transformers has no causal LM class of the text model): tiny image-text
checkpoints as transformers 5 writes them (Mistral's own tensor names: tok_embeddings, layers.N.attention.wq,
experts.E.w1, lerope.alpha, ... beside a Pixtral tower), the text settings switched on: NoPE layers, KV sharing, shared
indexer layers, a learned LeRoPE alpha and softmax scaling (main); grouped routing, a dense layer after a mixture,
attention biases, values narrower than the keys, plain RoPE and a smaller soft cap (variant). The battery (logits over a
left-padded batch, generate, the eager one-token step with the indexers' keys in the cache, LoRA, int8), the saved
text model (Mistral's names, which transformers' image-text class loads), transformers' names and config.json, the
config's defaults and checks. No compiled step (DSA layers run eagerly), no GGUF (llama.cpp has no architecture)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from conftest import VOCAB, padded_batch, positions, randomize
from family_checks import _CACHE, Family
from safetensors import safe_open
from test_family_deepseek_v32 import check_padded_step

import autolm
from autolm.models.mistral_large4 import MistralLarge4TextConfig

VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=4)  # fmt: skip
SIZES = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, index_topk=4, index_head_dim=16, index_n_heads=8,
             max_position_embeddings=256)  # fmt: skip


@dataclass
class LargeFamily(Family):
    """The Family battery on transformers' image-text checkpoint of these text settings (its LeRoPE alpha random)."""

    def checkpoint(self, tmp_path_factory, dtype=None):
        import transformers

        key = ("MistralLarge4", repr(sorted(self.kwargs.items())), str(dtype))
        if key not in _CACHE:
            text = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **self.kwargs)
            cfg = transformers.MistralLarge4Config(text_config=text, vision_config=VISION)
            torch.manual_seed(0)
            model = transformers.MistralLarge4ForConditionalGeneration(cfg)
            randomize(model)
            alpha = model.model.language_model.rotary_emb.alpha
            alpha.copy_(0.3 * torch.randn(alpha.shape, generator=torch.Generator().manual_seed(1)))
            d = str(tmp_path_factory.mktemp("mistral_large4"))
            model.save_pretrained(d)
            ref = self.hf_auto().from_pretrained(d, attn_implementation="eager")
            _CACHE[key] = (d, ref.eval())
        return _CACHE[key]

    def hf_auto(self) -> type:
        import transformers

        return transformers.MistralLarge4ForConditionalGeneration


TARGETS = ["q_proj", "kv_b_proj", "o_proj", "wq_b", "wk"]  # peft has no default for mistral_large4
MAIN = LargeFamily("MistralLarge4Config", dict(SIZES, no_rope_layer_interval=2, kv_source_layers=[0, 1, 0, 1],
                   indexer_types=["full", "shared", "full", "shared"]), lora_targets=TARGETS)  # fmt: skip
VARIANT = LargeFamily(
    "MistralLarge4Config",
    dict(SIZES, num_hidden_layers=3, n_group=2, topk_group=1, routed_scaling_factor=2.0, attention_bias=True,
         v_head_dim=8, mlp_layer_types=["sparse", "dense", "sparse"], final_logit_softcapping=5.0, index_topk=3,
         rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    lora_targets=["q_proj", "kv_a_proj_with_mqa", "weights_proj"],
)  # fmt: skip
FAMILIES = {"main": MAIN, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_layers_share_the_latent_and_skip_rope(tmp_path_factory):
    """main: layers 1 and 3 are NoPE (no rotary key), layers 2 and 3 expand layers 0's and 1's latents with no
    kv_a_proj_with_mqa of their own, layers 1 and 3 reuse the selection of the full indexer before them."""
    model = autolm.AutoModelForCausalLM.from_pretrained(MAIN.checkpoint(tmp_path_factory)[0])
    assert type(model).__name__ == "MistralLarge4ForCausalLM"
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.rope_dim for a in attns] == [8, 0, 8, 0]
    assert [a.kv_a_proj_with_mqa is None for a in attns] == [False, False, True, True]
    assert [a.kv_source[0].layer_idx if a.kv_source else None for a in attns] == [None, None, 0, 1]
    assert [a.indexer is None for a in attns] == [False, True, False, True]
    assert attns[1].kv_a_proj_with_mqa.weight.shape[0] == 16  # the latent alone


def test_generate(tmp_path_factory):
    """Greedy tokens over a left-padded batch are transformers' (its positions counted over the real tokens, as
    autolm's; one row: test_saved_text_model)."""
    directory, hf = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(lengths=(9, 5))
    ours = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert torch.equal(ours, hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8))


def test_one_token_step(tmp_path_factory):
    MAIN.check_one_token_step(tmp_path_factory)
    check_padded_step(MAIN, tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    """An adapter peft made on transformers' image-text model (its language model's modules, the tower's q_proj too)
    gives peft's logits in autolm, saved and loaded back as autolm's, and merged. (peft cannot load autolm's adapter
    on the image-text model: it names the text model's modules, which transformers has no causal LM class of.)"""
    import peft
    from family_checks import _randomize_lora

    directory, hf = MAIN.checkpoint(tmp_path_factory)
    ids, mask = padded_batch(seed=5)
    real = mask.bool()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    try:
        _randomize_lora(pm)
        pm.save_pretrained(tmp_path / "peft")
        with torch.no_grad():
            expected = pm(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    finally:
        pm.unload()
    ours = autolm.PeftModel.from_pretrained(
        autolm.AutoModelForCausalLM.from_pretrained(directory), tmp_path / "peft"
    )
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
        ours.save_pretrained(tmp_path / "ours")
        back = autolm.PeftModel.from_pretrained(
            autolm.AutoModelForCausalLM.from_pretrained(directory), tmp_path / "ours"
        )
        torch.testing.assert_close(
            back(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
        merged = ours.merge_and_unload()(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def test_bf16(tmp_path_factory):
    MAIN.check_bf16(tmp_path_factory)


def test_quantized(tmp_path_factory):
    MAIN.check_quantized(tmp_path_factory, "int8")


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_text_model(tmp_path_factory, tmp_path, name):
    """The wrapper's checkpoint is the text model with transformers' head (untied) and greedy tokens; saved, it holds
    the checkpoint's language-model tensors under their names, loads back bit-identical, and transformers' image-text
    class loads those tensors (beside a fresh tower) with the same logits; config.json is text_config's."""
    import transformers

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert (
        not model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    )
    prompt = ids = padded_batch()[0][:1, -9:]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), theirs)
    model.save_pretrained(tmp_path / "text")
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as a,
        safe_open(tmp_path / "text/model.safetensors", "pt") as b,
    ):
        towers = ("vision_encoder.", "patch_merger.", "pre_mm_projector_norm.", "vision_language_adapter.")
        names = set(a.keys())
        assert set(b.keys()) == {k for k in names if not k.startswith(towers)}
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in set(b.keys()))
    written = json.loads((tmp_path / "text/config.json").read_text())
    original = json.loads(open(f"{directory}/config.json").read())
    assert written["model_type"] == "mistral_large4_text"
    for d in (written, original["text_config"]):
        d.pop("transformers_version", None), d.pop("dtype", None), d.pop("architectures", None)
    assert written == original["text_config"]
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    shutil.copy(f"{directory}/config.json", tmp_path / "text/config.json")
    loaded = transformers.MistralLarge4ForConditionalGeneration.from_pretrained(tmp_path / "text")
    ids, mask = padded_batch()
    torch.testing.assert_close(
        _logits(loaded.eval(), ids, mask), _logits(model, ids, mask), atol=1e-4, rtol=1e-4
    )


def test_transformers_names_load_too(tmp_path_factory, tmp_path):
    """A file under transformers' module names (model.language_model.*, stacked experts) loads with the same
    state; autolm's state dict is transformers' language model's, names and shapes."""
    from safetensors.torch import save_file

    directory, hf = MAIN.checkpoint(tmp_path_factory)
    theirs = {k.replace("model.language_model.", "model."): v for k, v in hf.state_dict().items()
              if "vision_tower" not in k and "multi_modal_projector" not in k}  # fmt: skip
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    shutil.copy(f"{directory}/config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    again = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_default_config_is_transformers():
    import transformers

    theirs = json.loads(transformers.MistralLarge4TextConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert MistralLarge4TextConfig().to_dict() == theirs
    small = dict(num_hidden_layers=6, no_rope_layer_interval=3, q_lora_rank=64)
    ours, theirs = MistralLarge4TextConfig.from_dict(small), transformers.MistralLarge4TextConfig(**small)
    assert ours.no_rope_layers == theirs.no_rope_layers == [1, 1, 0, 1, 1, 0]
    assert ours.q_lora_rank is None and ours.to_dict()["q_lora_rank"] == 64  # kept as given, unused


@pytest.mark.parametrize(
    "key, bad",
    [("kv_source_layers", [0, 0]), ("kv_source_layers", [0, 0, 1, 2]), ("kv_source_layers", [0, 1, 1, 3]),
     ("kv_source_layers", [0, 0, 2, 0]), ("no_rope_layers", [1, 2, 1, 1]), ("final_logit_softcapping", 0)],
)  # fmt: skip
def test_config_errors_name_the_key(key, bad):
    """kv_source_layers: one per layer; [0, 0, 1, 2]: a source sharing itself; [0, 1, 1, 3] with layer 1 NoPE: a RoPE
    layer; [0, 0, 2, 0]: layer 3 would read layer 2's latent (the last sharing layer of its kind) in transformers."""
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4, n_routed_experts=8,
                 num_experts_per_tok=2, qk_rope_head_dim=8, index_head_dim=16, no_rope_layers=[1, 0, 1, 1])  # fmt: skip
    MistralLarge4TextConfig(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        MistralLarge4TextConfig.from_dict({**small, key: bad})
