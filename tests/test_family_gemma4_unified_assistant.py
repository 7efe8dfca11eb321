"""Gemma 4 unified's assistant (gemma4_unified_assistant) against transformers: the drafting step's logits and
projected hidden state (plain and centroid-masked heads, a padded mask), generate(assistant_model=...) with a
Gemma 4 unified target that shares keys and values (tokens equal to transformers' assisted generation and to
plain greedy decoding, drafts equal round for round), the save round trip through transformers, and the
config's defaults against transformers' Gemma4UnifiedAssistantConfig. transformers cannot build the assistant
as released (see test_family_gemma4_assistant._buildable, here over Gemma4UnifiedTextConfig)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import VOCAB, randomize
from test_family_gemma4_assistant import _COMMON, PROMPT, _buildable, _shared_kv, _steer

import autolm
from autolm.generation import target_draft

transformers = pytest.importorskip("transformers")
from transformers.generation import candidate_generator  # noqa: E402
from transformers.models.gemma4_unified import configuration_gemma4_unified  # noqa: E402

_UNIFIED = configuration_gemma4_unified.Gemma4UnifiedTextConfig
_TEXT = dict(_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             layer_types=["sliding_attention", "full_attention"])  # fmt: skip


def _assistant(ordered: bool, seed: int):
    config = transformers.Gemma4UnifiedAssistantConfig(text_config=_TEXT, backbone_hidden_size=64,
                                                       use_ordered_embeddings=ordered, num_centroids=16,
                                                       centroid_intermediate_top_k=4)  # fmt: skip
    with _buildable(_UNIFIED):
        model = transformers.Gemma4UnifiedAssistantForCausalLM(config).eval()
    randomize(model, seed)
    if ordered:
        model.masked_embedding.token_ordering.copy_(
            torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))
        )
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """transformers' Gemma 4 unified target (the last two of four layers KV-shared) and assistants (the plain
    head steered against the target, the centroid-masked head), with autolm's loads of them."""
    root = tmp_path_factory.mktemp("gemma4_unified_assistant")
    target = transformers.Gemma4UnifiedForCausalLM(_UNIFIED(
        **_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2)).eval()  # fmt: skip
    randomize(target, 2)
    _steer(target, 3, 8.0, 1.0)
    plain, ordered = _assistant(False, 3), _assistant(True, 4)
    _steer(plain, 2, 8.0, -1.0)
    plain.generation_config.num_assistant_tokens = 3
    hf = {"target": target, "plain": plain, "ordered": ordered}
    ours = {}
    for name, model in hf.items():
        model.save_pretrained(root / name)
        ours[name] = autolm.AutoModelForCausalLM.from_pretrained(root / name)
    return hf, ours, root


@pytest.mark.parametrize("head", ["plain", "ordered"])
def test_drafting_step_matches_transformers(checkpoints, head):
    hf, ours, _ = checkpoints
    assert type(ours[head]).__name__ == "Gemma4UnifiedAssistantForCausalLM"
    assert type(ours["target"]).__name__ == "Gemma4UnifiedForCausalLM"
    gen = torch.Generator().manual_seed(1)
    padded = torch.ones(1, 10, dtype=torch.long)
    padded[0, :2] = 0
    for S_full, S_sliding in ((9, 9), (9, 6)):
        kv = _shared_kv(gen, S_full, S_sliding)
        x = torch.randn(1, 1, 128, generator=gen)
        for mask in (None, padded):
            args = dict(inputs_embeds=x, shared_kv_states=kv, position_ids=torch.tensor([[S_full]]),
                        attention_mask=mask)  # fmt: skip
            with torch.no_grad():
                want, got = hf[head](**args), ours[head](**args)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=1e-4)


def test_assisted_generation_matches_transformers_and_greedy(checkpoints, monkeypatch):
    hf, ours, _ = checkpoints
    theirs_drafts, our_drafts = [], []
    hf_get = candidate_generator.SinglePositionMultiTokenCandidateGenerator.get_candidates
    our_propose = target_draft.TargetDraft.propose

    def hf_recorded(self, input_ids, *args, **kwargs):
        ids, logits = hf_get(self, input_ids, *args, **kwargs)
        if logits is not None:
            theirs_drafts.append(ids[0, input_ids.shape[1] :].tolist())
        return ids, logits

    def our_recorded(self, run, limit):
        found = our_propose(self, run, limit)
        if found.tokens.shape[1]:
            our_drafts.append(found.tokens[0].tolist())
        return found

    monkeypatch.setattr(
        candidate_generator.SinglePositionMultiTokenCandidateGenerator, "get_candidates", hf_recorded
    )
    monkeypatch.setattr(target_draft.TargetDraft, "propose", our_recorded)
    with torch.no_grad():
        greedy = hf["target"].generate(PROMPT, max_new_tokens=20, do_sample=False)
        assisted = hf["target"].generate(
            PROMPT, max_new_tokens=20, do_sample=False, assistant_model=hf["plain"]
        )
    ours_out = ours["target"].generate(
        PROMPT, max_new_tokens=20, do_sample=False, assistant_model=ours["plain"]
    )
    assert assisted.tolist() == greedy.tolist()
    assert ours_out.tolist() == greedy.tolist()
    assert our_drafts == theirs_drafts
    tokens, at, kept = greedy[0].tolist(), PROMPT.shape[1] + 1, set()
    for drafts in our_drafts:  # rounds that kept every candidate, some, and none
        n = next((i for i, t in enumerate(drafts) if t != tokens[at + i]), len(drafts))
        kept.add("all" if n == len(drafts) else "some" if n else "none")
        at += n + 1
    assert kept == {"all", "some", "none"}


def test_save_round_trip(checkpoints, tmp_path):
    hf, ours, root = checkpoints
    ours["ordered"].save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((root / "ordered" / "config.json").read_text())
    assert saved["model_type"] == "gemma4_unified_assistant"
    assert saved["text_config"]["model_type"] == "gemma4_unified_text"
    for key in (
        "backbone_hidden_size",
        "use_ordered_embeddings",
        "num_centroids",
        "centroid_intermediate_top_k",
    ):
        assert saved[key] == original[key], key
    for key in ("sliding_window", "num_kv_shared_layers", "layer_types", "max_position_embeddings"):
        assert saved["text_config"][key] == original["text_config"][key], key
    with _buildable(_UNIFIED):
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "Gemma4UnifiedAssistantForCausalLM"
    again = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    kv = _shared_kv(torch.Generator().manual_seed(5), 7, 7)
    args = dict(inputs_embeds=torch.randn(1, 1, 128), shared_kv_states=kv, position_ids=torch.tensor([[7]]))
    with torch.no_grad():
        want = hf["ordered"](**args).logits
        torch.testing.assert_close(back(**args).logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again(**args).logits, want, atol=1e-5, rtol=1e-5)


def test_config_defaults_equal_transformers():
    theirs = {f.name: f.default for f in dataclasses.fields(transformers.Gemma4UnifiedAssistantConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(autolm.Gemma4UnifiedAssistantConfig)}
    for key in ("backbone_hidden_size", "use_ordered_embeddings", "num_centroids", "centroid_intermediate_top_k",
                "tie_word_embeddings"):  # fmt: skip
        assert ours[key] == theirs[key], key
    # the layers' settings default as gemma4_unified_text's (every layer KV-shared), written as transformers does
    theirs, ours = (
        transformers.Gemma4UnifiedAssistantConfig().to_dict(),
        autolm.Gemma4UnifiedAssistantConfig(),
    )
    text = ours.to_dict()["text_config"]
    assert ours.num_kv_shared_layers == theirs["text_config"]["num_kv_shared_layers"] == 30
    compared = [k for k in text if k in theirs["text_config"] and k not in ("dtype", "transformers_version")]
    assert len(compared) > 20
    for key in compared:
        assert text[key] == theirs["text_config"][key], key
    for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block"):
        assert key not in text and key not in theirs["text_config"], key
    given = autolm.Gemma4UnifiedAssistantConfig.from_dict({"text_config": _TEXT})
    assert (
        given.sliding_window == 4 and given.num_kv_shared_layers == 2 and given.backbone_hidden_size == 3840
    )
