"""Gemma 4 unified's assistant (gemma4_unified_assistant) against transformers: the drafting step's logits and
projected hidden state (plain and centroid-masked heads, a padded mask), generate(assistant_model=...) with a
Gemma 4 unified target that shares keys and values (tokens equal to transformers' assisted generation and to
plain greedy decoding, drafts equal round for round), the save round trip through transformers, and the
config's defaults against transformers' Gemma4UnifiedAssistantConfig. transformers cannot build the assistant
as released (see test_family_gemma4_assistant._buildable, here over Gemma4UnifiedTextConfig)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import VOCAB, randomize
from test_family_gemma4_assistant import (
    _COMMON,
    _buildable,
    _steer,
    check_assisted_generation,
    check_drafting_step,
    check_save_round_trip,
)

import autolm

transformers = pytest.importorskip("transformers")
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
    check_drafting_step(hf, ours, head, sizes=((9, 9), (9, 6)))


def test_assisted_generation_matches_transformers_and_greedy(checkpoints, monkeypatch):
    hf, ours, _ = checkpoints
    check_assisted_generation(hf, ours, monkeypatch)


def test_save_round_trip(checkpoints, tmp_path):
    text_keys = ("sliding_window", "num_kv_shared_layers", "layer_types", "max_position_embeddings")
    kinds = ("gemma4_unified_assistant", "gemma4_unified_text")
    check_save_round_trip(checkpoints, tmp_path, kinds, _UNIFIED, text_keys)


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
