"""Image-text checkpoints whose language model is a text family autolm already has (autolm.models.image_text), against
transformers: Aria (AriaText), Cosmos3 Omni (Qwen 3, its files' flat layout), GLM-4.6V and GLM-GA (GLM-4; GLM-4.6V also
over GLM-4.5 MoE), Granite Docling and Granite 4 Vision (Granite), Nemotron 3 Nano Omni (Nemotron H), each the model
class transformers' AutoModelForImageTextToText gives, with tiny towers, checked as test_family_image_text_more's
cases are: logits over a left-padded batch, head tying, greedy tokens and the saved text model. Apart: ShieldGemma 2
(an image classifier over Gemma 3's image-text model: its yes / no logits and its inner model's), InstructBLIP-Video
(OPT, given a video as InstructBLIP's test gives an image), FastVLM (Qwen 2) and PerceptionLM (Llama), whose timm vision
tower transformers cannot build without timm (their files written by hand from the text model), the Hub's older
layouts, and each wrapper's head tying and defaults against transformers' configs."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS, VOCAB, padded_batch, randomize
from test_family_image_text import (
    CLIP,
    GLM_ROPE,
    GLM_TEXT,
    MROPE,
    QWEN3_VISION,
    QWEN_VISION,
    SIGLIP,
    TEXT,
    _logits,
)
from test_family_image_text import _rewrite as rewrite
from test_family_image_text_more import _tied, check_language_model

import autolm

TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
IDEFICS3_VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                       patch_size=4)  # fmt: skip
GLM_VISION = dict(QWEN_VISION, image_size=16)
GLM_MOE_TEXT = dict(GLM_TEXT, model_type="glm4v_moe_text", rope_parameters=dict(GLM_ROPE), n_routed_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=24, first_k_dense_replace=1, n_shared_experts=1)  # fmt: skip
NEMOTRON_H = dict(SPECS["nemotron_h"][1], **TOKENS, model_type="nemotron_h")
RADIO = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
             image_size=16, video_temporal_patch_size=2)  # fmt: skip
# name -> (transformers' config class prefix, config kwargs, autolm's text model class, transformers' model class)
CASES = {
    # AriaText's experts; the files in the older layout transformers writes (language_model.model.*)
    "aria": ("Aria", dict(text_config=dict(TEXT, model_type="aria_text", moe_num_experts=4, moe_topk=2,
                                           moe_num_shared_experts=1), vision_config=IDEFICS3_VISION,
                          projector_patch_to_query_dict={16: 4}), "AriaTextForCausalLM"),
    # Qwen3-VL's language model, tied by the outer config; written flat (layers.*, blocks.*, merger.*)
    "cosmos3_omni": ("Cosmos3Omni", dict(text_config=dict(TEXT, model_type="qwen3_vl_text", head_dim=16,
                                                          rope_parameters=dict(MROPE, mrope_interleaved=True)),
                                         vision_config=QWEN3_VISION, tie_word_embeddings=True), "Qwen3ForCausalLM"),
    "glm46v": ("Glm46V", dict(text_config=dict(GLM_TEXT, model_type="glm4v_text", rope_parameters=GLM_ROPE),
                              vision_config=GLM_VISION), "Glm4ForCausalLM"),
    # text_config's tying is not the model's: the outer config's alone
    "glmga": ("Glmga", dict(text_config=dict(GLM_TEXT, model_type="glm4v_text", tie_word_embeddings=True,
                                             rope_parameters=GLM_ROPE), vision_config=GLM_VISION),
              "Glm4ForCausalLM", "Glm46VForConditionalGeneration"),
    "glm46v_moe": ("Glm46V", dict(text_config=GLM_MOE_TEXT, vision_config=GLM_VISION, tie_word_embeddings=True),
                   "Glm4MoeForCausalLM"),
    # Granite's multipliers and logits_scaling (the image-text heads divide by it too); Docling tied by default, its
    # density router skipped; Granite 4 Vision's Q-Former projectors skipped
    "granite_docling": ("GraniteDocling", dict(text_config=dict(TEXT, model_type="granite_docling_text"),
                                               vision_config=dict(IDEFICS3_VISION, out_hidden_size=64, scale_factor=2,
                                                                  deepstack_visual_indexes=[0]),
                                               density_router_hidden_size=8), "GraniteForCausalLM"),
    "granite4_vision": ("Granite4Vision", dict(text_config=dict(TEXT, model_type="granite4_vision_text",
                                                                embedding_multiplier=2.0, residual_multiplier=0.5,
                                                                attention_multiplier=0.2, logits_scaling=4.0),
                                              vision_config=dict(CLIP, hidden_size=64, num_hidden_layers=2),
                                              deepstack_layer_map=[[0, 1]], spatial_target_layers=[0, 0, 1, 1],
                                              downsample_rate="1/2", image_grid_pinpoints=[[16, 16]]),
                        "GraniteForCausalLM"),
}  # fmt: skip
# Nemotron H (Mamba-2, attention and MoE blocks) as language_model.backbone.*, RADIO's tower beside it (checked apart:
# transformers' model exposes no head of its own)
OMNI = {"nemotron_h_omni": ("NemotronH_Omni_Reasoning_V3_", dict(text_config=NEMOTRON_H, vision_config=RADIO,
                            vision_hidden_size=32, projector_hidden_size=32), "NemotronHForCausalLM",
                            "NemotronH_Omni_Reasoning_V3")}  # fmt: skip


def _checkpoint(tmp_path_factory, name: str):
    """The case's transformers model (random weights), saved; (directory, model)."""
    import transformers

    prefix, kwargs, _, *model = {**CASES, **OMNI}[name]
    directory = tmp_path_factory.mktemp(name)
    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, (model or [f"{prefix}ForConditionalGeneration"])[0])(config)
    randomize(model)
    model.tie_weights()
    model.save_pretrained(directory)
    return str(directory), model.eval()


@pytest.mark.parametrize("name", CASES)
def test_language_model_is_the_wrappers(name, tmp_path_factory, tmp_path):
    """The checkpoint loads as its text family with the wrapper's logits (a left-padded batch), head tying and
    greedy tokens; saved, transformers' AutoModelForCausalLM loads the text model with the same logits."""
    check_language_model(*_checkpoint(tmp_path_factory, name), CASES[name][2], tmp_path)


def test_nemotron_h_omni(tmp_path_factory, tmp_path):
    """Nemotron 3 Nano Omni's language model: the wrapper's logits (a left-padded batch), its language model's head
    tying and greedy tokens; saved, the text model transformers loads. The Hub's layout (llm_config, the audio
    branch's and the vision norm's tensors, multi-token-prediction layers) reads the same."""
    import transformers

    directory, hf = _checkpoint(tmp_path_factory, "nemotron_h_omni")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "NemotronHForCausalLM"
    assert model.config.tie_word_embeddings == _tied(hf.language_model) == _tied(model)
    ids, mask = padded_batch()
    ours = _logits(model, ids, mask)
    torch.testing.assert_close(ours, _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    prompt = ids[:1, -9:]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), theirs)
    model.save_pretrained(tmp_path / "text")
    text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    assert type(text).__name__ == "NemotronHForCausalLM"
    torch.testing.assert_close(ours, _logits(text, ids, mask), atol=1e-4, rtol=1e-4)

    def hub_config(d):
        return {**{k: v for k, v in d.items() if k != "text_config"}, "llm_config": d["text_config"]}

    def hub_tensors(tensors):
        extra = ("sound_encoder.encoder.layers.0.weight", "sound_projection.linear1.weight",
                 "vision_final_layernorm.weight", "language_model.mtp.layers.0.norm.weight")  # fmt: skip
        return {**tensors, **{k: torch.ones(4) for k in extra}}

    hub = rewrite(directory, tmp_path / "hub", change_config=hub_config, change_tensors=hub_tensors)
    torch.testing.assert_close(_logits(autolm.AutoModelForCausalLM.from_pretrained(hub), ids, mask), ours)


def test_cosmos3_omni_diffusers_names(tmp_path_factory, tmp_path):
    """Cosmos3 Omni's newer files name the language model's attention as Diffusers does (to_q / to_k / to_v /
    to_out, norm_q / norm_k): the same logits, as transformers reads them."""
    import transformers

    names = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out", "q_norm": "norm_q",
             "k_norm": "norm_k"}  # fmt: skip

    def diffusers(tensors):
        out = {}
        for k, v in tensors.items():
            for a, b in names.items():
                k = k.replace(f".self_attn.{a}.", f".self_attn.{b}.") if k.startswith("layers.") else k
            out[k] = v
        assert any(".to_out." in k for k in out)
        return out

    directory, hf = _checkpoint(tmp_path_factory, "cosmos3_omni")
    renamed = rewrite(directory, tmp_path / "diffusers", change_tensors=diffusers)
    ids, mask = padded_batch()
    theirs = _logits(transformers.AutoModelForImageTextToText.from_pretrained(renamed), ids, mask)
    torch.testing.assert_close(theirs, _logits(hf, ids, mask))
    model = autolm.AutoModelForCausalLM.from_pretrained(renamed)
    torch.testing.assert_close(_logits(model, ids, mask), theirs, atol=1e-4, rtol=1e-4)


def test_shieldgemma2(tmp_path):
    """ShieldGemma 2 (transformers' ShieldGemma2ForImageClassification) gives the last token's logits of its yes / no
    tokens: autolm's model of its files (as transformers writes them, and the layouts it reads) is
    Gemma 3's language model with those logits, and with the logits, tying and greedy tokens of the Gemma 3 image-text
    model the classifier runs on the same weights; tied where either config ties it."""
    import transformers
    from safetensors.torch import load_file, save_file

    text = dict(TEXT, model_type="gemma3_text", head_dim=16, sliding_window=4)
    ids, mask = padded_batch()
    for tied in (True, False):
        config = transformers.ShieldGemma2Config(text_config=dict(text, tie_word_embeddings=tied), vision_config=SIGLIP,
                                                 mm_tokens_per_image=4, tie_word_embeddings=False)  # fmt: skip
        torch.manual_seed(0)
        hf = transformers.ShieldGemma2ForImageClassification(config).eval()
        randomize(hf)
        hf.tie_weights()
        hf.yes_token_index, hf.no_token_index = 7, 11
        directory = tmp_path / f"tied_{tied}"
        hf.save_pretrained(directory)
        if tied:  # untied: the head's tensor read below
            check_language_model(str(directory), hf.model, "Gemma3ForCausalLM", tmp_path / "text")
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.tie_word_embeddings == _tied(hf.model) == _tied(model) == tied
        torch.testing.assert_close(
            _logits(model, ids, mask), _logits(hf.model, ids, mask), atol=1e-4, rtol=1e-4
        )
        with torch.no_grad():
            verdict = hf(input_ids=ids, attention_mask=mask).logits
            ours = model(input_ids=ids, attention_mask=mask).logits[:, -1, [7, 11]]
        torch.testing.assert_close(ours, verdict, atol=1e-4, rtol=1e-4)
        if tied:
            continue
        # the files transformers reads: the classifier's tensors without its `model.` prefix, in Gemma 3's older
        # names (model.language_model.model.*) or its own (model.language_model.*)
        written = load_file(directory / "model.safetensors")
        for old in (True, False):
            tensors = {k.removeprefix("model.") if old else
                       k.removeprefix("model.").replace("language_model.model.", "language_model.", 1): v
                       for k, v in written.items()}  # fmt: skip
            hub = directory / f"read_{old}"
            hub.mkdir()
            save_file(tensors, hub / "model.safetensors")
            (hub / "config.json").write_text((directory / "config.json").read_text())
            theirs = transformers.ShieldGemma2ForImageClassification.from_pretrained(hub).eval()
            theirs.yes_token_index, theirs.no_token_index = 7, 11
            with torch.no_grad():
                torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, verdict)
            torch.testing.assert_close(_logits(autolm.AutoModelForCausalLM.from_pretrained(hub), ids, mask),
                                       _logits(model, ids, mask))  # fmt: skip


OPT = dict(TOKENS, model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=128, word_embed_proj_dim=64)  # fmt: skip


def test_instructblipvideo(tmp_path):
    """InstructBLIP-Video's OPT, as InstructBLIP's is checked: the wrapper's logits given a video (which fills no
    place in a prompt without video tokens) over a left-padded batch, its head tying (text_config's own, both ways)
    and greedy tokens; saved, the text model transformers loads."""
    import transformers

    ids, mask = padded_batch()
    for tied in (True, False):
        config = transformers.InstructBlipVideoConfig(
            text_config=dict(OPT, tie_word_embeddings=tied), vision_config=IDEFICS3_VISION, num_query_tokens=2,
            qformer_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                encoder_hidden_size=32, vocab_size=VOCAB), video_token_index=VOCAB - 1)  # fmt: skip
        torch.manual_seed(0)
        hf = transformers.InstructBlipVideoForConditionalGeneration(config).eval()
        randomize(hf)
        hf.tie_weights()
        hf.save_pretrained(tmp_path / "video")
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "video")
        assert type(model).__name__ == "OPTForCausalLM"
        assert model.config.tie_word_embeddings == _tied(hf.language_model) == _tied(model) == tied
        ours = _logits(model, ids, mask)
        video = torch.zeros(len(ids), 2, 3, 16, 16)
        with torch.no_grad():
            theirs = hf(
                input_ids=ids, attention_mask=mask, pixel_values=video, qformer_input_ids=ids[:, :2]
            ).logits
        torch.testing.assert_close(ours, theirs[mask.bool()], atol=1e-4, rtol=1e-4)
        prompt = ids[:1, -9:]
        greedy = hf.language_model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), greedy)
        model.save_pretrained(tmp_path / "text")
        text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
        torch.testing.assert_close(ours, _logits(text, ids, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("prefix", "family", "tied"), [("FastVlm", "qwen2", True), ("PerceptionLM", "llama", False)]
)
def test_timm_tower_wrappers(prefix, family, tied, tmp_path):
    """FastVLM and PerceptionLM: transformers builds their vision tower with timm (not installed here), so their files
    are written by hand, as transformers' model would save them: the text model's tensors under
    model.language_model.* and lm_head.*, a timm tower's and the projector's beside them, the config transformers'
    config class writes. They load as the text model with its logits and tying; saved, transformers loads them."""
    import json

    import transformers
    from safetensors.torch import save_file

    text = dict(TEXT, model_type=family, tie_word_embeddings=tied)
    config = getattr(transformers, f"{prefix}Config")(text_config=text)
    assert config.tie_word_embeddings == tied
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config.text_config).eval()
    randomize(lm)
    lm.tie_weights()
    tensors = {("lm_head." + k[8:] if k.startswith("lm_head.") else "model.language_model." + k[6:]): v.contiguous()
               for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}  # fmt: skip
    tensors["model.vision_tower.timm_model.stem.0.conv.weight"] = torch.ones(8, 3, 3, 3)
    tensors["model.multi_modal_projector.linear_1.weight"] = torch.ones(64, 8)
    tmp_path.joinpath("wrapper").mkdir()
    save_file(tensors, tmp_path / "wrapper" / "model.safetensors")
    (tmp_path / "wrapper" / "config.json").write_text(json.dumps(config.to_dict()))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "wrapper")
    assert type(model).__name__ == type(lm).__name__
    assert model.config.tie_word_embeddings == _tied(model) == tied
    ids, mask = padded_batch()
    ours = _logits(model, ids, mask)
    torch.testing.assert_close(ours, _logits(lm, ids, mask), atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "text")
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    torch.testing.assert_close(ours, _logits(saved, ids, mask), atol=1e-4, rtol=1e-4)


# name -> (transformers' config class, text_config, whether the head is the language model's own (tied by it))
TYING = {
    "aria": ("AriaConfig", CASES["aria"][1]["text_config"], False),
    "cosmos3_omni": ("Cosmos3OmniConfig", CASES["cosmos3_omni"][1]["text_config"], False),
    "glm46v": ("Glm46VConfig", CASES["glm46v"][1]["text_config"], False),
    "glm46v_moe": ("Glm46VConfig", GLM_MOE_TEXT, False),
    "glmga": ("GlmgaConfig", CASES["glm46v"][1]["text_config"], False),
    "granite_docling": ("GraniteDoclingConfig", CASES["granite_docling"][1]["text_config"], False),
    "granite4_vision": ("Granite4VisionConfig", CASES["granite4_vision"][1]["text_config"], False),
    "shieldgemma2": ("ShieldGemma2Config", dict(TEXT, model_type="gemma3_text", head_dim=16), False),
    "fast_vlm": ("FastVlmConfig", dict(TEXT, model_type="qwen2"), False),
    "perception_lm": ("PerceptionLMConfig", dict(TEXT, model_type="llama"), False),
    "nemotron_h_omni": ("NemotronH_Omni_Reasoning_V3_Config", NEMOTRON_H, True),
    "instructblipvideo": ("InstructBlipVideoConfig", OPT, True),
}


@pytest.mark.parametrize("name", TYING)
def test_head_tying_as_transformers(name):
    """Read from the config.json transformers writes, each wrapper's language model ties its head as transformers'
    model does, for each setting of the outer config and of text_config (absent, false, true)."""
    import json

    import transformers

    from autolm.models import config_class

    cls, text, own = TYING[name]
    towers = {"nemotron_h_omni": dict(vision_config=RADIO),
              "granite_docling": dict(vision_config=dict(out_hidden_size=TEXT["hidden_size"]))}  # fmt: skip
    kwargs = towers.get(name, {})
    # Nemotron H's head is never tied (transformers' and autolm's configs refuse true)
    inners = (None, False) if name == "nemotron_h_omni" else (None, False, True)
    for outer in (None, False, True):
        for inner in inners:
            given = dict(text) if inner is None else dict(text, tie_word_embeddings=inner)
            tie = {} if outer is None or own else dict(tie_word_embeddings=outer)
            theirs = getattr(transformers, cls)(text_config=given, **tie, **kwargs)
            expected = (theirs.text_config if own else theirs).tie_word_embeddings
            written = json.loads(json.dumps(theirs.to_dict()))
            ours = config_class(written["model_type"]).from_dict(written)
            assert ours.tie_word_embeddings == expected, (outer, inner)


def test_text_defaults():
    """Granite Docling's text defaults where text_config leaves them out are transformers' (granite_docling_text);
    Granite 4 Vision's are Granite's; Nemotron H Omni's older files name text_config llm_config."""
    import transformers

    from autolm.models import Granite4VisionConfig, GraniteDoclingConfig, NemotronH_Omni_Reasoning_V3_Config

    theirs = transformers.GraniteDoclingConfig().text_config
    ours = GraniteDoclingConfig(text_config={})
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "pad_token_id", "bos_token_id",
                "eos_token_id", "embedding_multiplier", "logits_scaling", "residual_multiplier",
                "attention_multiplier"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.tie_word_embeddings and ours.model_type == "granite"
    granite = transformers.Granite4VisionConfig().text_config
    ours = Granite4VisionConfig(text_config={})
    for key in ("vocab_size", "hidden_size", "logits_scaling", "embedding_multiplier", "residual_multiplier"):
        assert getattr(ours, key) == getattr(granite, key), key
    legacy = NemotronH_Omni_Reasoning_V3_Config.from_dict({"llm_config": NEMOTRON_H})
    assert legacy.model_type == "nemotron_h" and legacy.hidden_size == NEMOTRON_H["hidden_size"]
