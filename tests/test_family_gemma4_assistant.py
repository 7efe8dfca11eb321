"""Gemma 4's assistant (gemma4_assistant) against transformers: the drafting step's logits and projected hidden
state (the plain head and the centroid-masked one, a window shorter than the target's keys, a padded mask),
generate(assistant_model=...) with a Gemma 4 target with per-layer inputs and KV sharing (the candidates of
every round equal to transformers' SinglePositionMultiTokenCandidateGenerator's, the tokens equal to
transformers' assisted generation and to plain greedy decoding), the save round trip through transformers, and
the config's defaults and errors.

transformers 5.23 cannot build the assistant as released: Gemma4TextConfig.kv_sharing_modes refuses a config whose
every layer is KV-shared, which Gemma4AssistantConfig requires. `_buildable` patches that one property, while
transformers builds a model, to what the assistant's config says (every layer reuses the target's keys and
values); nothing else of transformers is changed."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from conftest import VOCAB, randomize

import autolm
from autolm.errors import ConfigError, GenerationError
from autolm.generation import target_draft

transformers = pytest.importorskip("transformers")
from transformers.generation import candidate_generator  # noqa: E402
from transformers.models.gemma4 import configuration_gemma4  # noqa: E402

_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
}
_COMMON = dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
               max_position_embeddings=64, sliding_window=4, rope_parameters=_ROPE)  # fmt: skip
_TEXT = dict(_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, hidden_size_per_layer_input=0,
             vocab_size_per_layer_input=0, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
PROMPT = torch.tensor([[3, 17, 99, 5, 42, 7, 150, 11]])  # longer than the window


@contextlib.contextmanager
def _buildable(cls=configuration_gemma4.Gemma4TextConfig):  # gemma4_unified's text config class too
    released = cls.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return released.fget(self)

    cls.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        cls.kv_sharing_modes = released


def _steer(model, dim: int, big: float, sign: float) -> None:
    """Logits led by one feature of the final norm: tokens 5 and 6 (+-sign there) win by its sign, so the
    assistant's drafts agree with the target's tokens in some rounds and not in others."""
    with torch.no_grad():
        model.model.norm.weight[dim] = big
        emb = model.model.embed_tokens.weight
        emb[:, dim] = 0
        emb[5, dim], emb[6, dim] = sign, -sign


def _assistant(ordered: bool, seed: int):
    config = transformers.Gemma4AssistantConfig(text_config=_TEXT, backbone_hidden_size=64,
                                                use_ordered_embeddings=ordered, num_centroids=16,
                                                centroid_intermediate_top_k=4)  # fmt: skip
    with _buildable():
        model = transformers.Gemma4AssistantForCausalLM(config).eval()
    randomize(model, seed)
    if ordered:
        model.masked_embedding.token_ordering.copy_(
            torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))
        )
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """transformers' target (per-layer inputs, the last two of four layers KV-shared) and assistants (the plain
    head, steered against the target; the centroid-masked head), with autolm's loads of them."""
    root = tmp_path_factory.mktemp("gemma4_assistant")
    target = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
        **_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_kv_shared_layers=2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        layer_types=["sliding_attention", "full_attention"] * 2)).eval()  # fmt: skip
    randomize(target, 1)
    _steer(target, 3, 4.0, 1.0)
    plain, ordered = _assistant(False, 2), _assistant(True, 4)
    _steer(plain, 2, 30.0, -1.0)
    plain.generation_config.num_assistant_tokens = 3
    hf = {"target": target, "plain": plain, "ordered": ordered}
    ours = {}
    for name, model in hf.items():
        model.save_pretrained(root / name)
        ours[name] = autolm.AutoModelForCausalLM.from_pretrained(root / name)
    return hf, ours, root


def _shared_kv(gen, S_full: int, S_sliding: int):
    return {
        "full_attention": tuple(torch.randn(1, 2, S_full, 32, generator=gen) for _ in range(2)),
        "sliding_attention": tuple(torch.randn(1, 2, S_sliding, 16, generator=gen) for _ in range(2)),
    }


def check_drafting_step(hf, ours, head, sizes=((9, 9), (9, 6), (3, 3))):
    """The assistant's one drafting forward (logits, projected hidden state) equals transformers' over shared
    keys and values of (full, sliding) lengths `sizes` (the window 4 keeps 5 of 9 or 6 sliding keys), with a
    padded mask and none."""
    gen = torch.Generator().manual_seed(1)
    padded = torch.ones(1, 10, dtype=torch.long)
    padded[0, :2] = 0
    for S_full, S_sliding in sizes:
        kv = _shared_kv(gen, S_full, S_sliding)
        x = torch.randn(1, 1, 128, generator=gen)
        for mask in (None, padded):
            args = dict(inputs_embeds=x, shared_kv_states=kv, position_ids=torch.tensor([[S_full]]),
                        attention_mask=mask)  # fmt: skip
            with torch.no_grad():
                want, got = hf[head](**args), ours[head](**args)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=1e-4)


def check_assisted_generation(hf, ours, monkeypatch) -> None:
    """target.generate(assistant_model=...) gives plain greedy tokens, in transformers and here, with the same
    drafts round for round; the rounds kept every candidate, some, and none."""
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
    for drafts in our_drafts:  # each round's drafts against the tokens they preceded
        n = next((i for i, t in enumerate(drafts) if t != tokens[at + i]), len(drafts))
        kept.add("all" if n == len(drafts) else "some" if n else "none")
        at += n + 1
    assert kept == {"all", "some", "none"}


@pytest.mark.parametrize("head", ["plain", "ordered"])
def test_drafting_step_matches_transformers(checkpoints, head):
    hf, ours, _ = checkpoints
    assert type(ours[head]).__name__ == "Gemma4AssistantForCausalLM"
    check_drafting_step(hf, ours, head)


def test_assisted_generation_matches_transformers_and_greedy(checkpoints, monkeypatch):
    hf, ours, _ = checkpoints
    check_assisted_generation(hf, ours, monkeypatch)


def test_drafts_match_transformers_with_the_centroid_head(checkpoints):
    hf, ours, _ = checkpoints
    hf["ordered"].generation_config.num_assistant_tokens = 2
    ours["ordered"].generation_config.num_assistant_tokens = 2
    with torch.no_grad():
        want = hf["target"].generate(PROMPT, max_new_tokens=6, do_sample=False, assistant_model=hf["ordered"])
    got = ours["target"].generate(PROMPT, max_new_tokens=6, do_sample=False, assistant_model=ours["ordered"])
    assert got.tolist() == want.tolist()


def check_save_round_trip(
    checkpoints, tmp_path, kinds, patched=configuration_gemma4.Gemma4TextConfig, text_keys=()
):
    """The saved assistant: model_type and its text_config's `kinds`, the assistant's fields (and `text_keys`)
    as the original file's, reloaded by transformers (its config patched buildable) and autolm with the logits."""
    hf, ours, root = checkpoints
    ours["ordered"].save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((root / "ordered" / "config.json").read_text())
    assert (saved["model_type"], saved["text_config"]["model_type"]) == kinds
    for key in (
        "backbone_hidden_size",
        "use_ordered_embeddings",
        "num_centroids",
        "centroid_intermediate_top_k",
    ):
        assert saved[key] == original[key], key
    for key in text_keys:
        assert saved["text_config"][key] == original["text_config"][key], key
    with _buildable(patched):
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == type(ours["ordered"]).__name__
    again = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    kv = _shared_kv(torch.Generator().manual_seed(5), 7, 7)
    args = dict(inputs_embeds=torch.randn(1, 1, 128), shared_kv_states=kv, position_ids=torch.tensor([[7]]))
    with torch.no_grad():
        want = hf["ordered"](**args).logits
        torch.testing.assert_close(back(**args).logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again(**args).logits, want, atol=1e-5, rtol=1e-5)


def test_save_round_trip(checkpoints, tmp_path):
    check_save_round_trip(checkpoints, tmp_path, ("gemma4_assistant", "gemma4_text"))


def test_config_defaults_and_text_config():
    theirs = {f.name: f.default for f in dataclasses.fields(transformers.Gemma4AssistantConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(autolm.Gemma4AssistantConfig)}
    for key in ("backbone_hidden_size", "use_ordered_embeddings", "num_centroids", "centroid_intermediate_top_k",
                "tie_word_embeddings"):  # fmt: skip
        assert ours[key] == theirs[key], key
    # the layers' settings default as gemma4_text's: transformers' default config, per-layer inputs on, is refused
    with pytest.raises(Exception, match="hidden_size_per_layer_input"):  # its strict validator's error
        transformers.Gemma4AssistantConfig()
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input"):
        autolm.Gemma4AssistantConfig()
    ours = autolm.Gemma4AssistantConfig.from_dict({"text_config": _TEXT, "backbone_hidden_size": 64})
    theirs = transformers.Gemma4AssistantConfig(text_config=_TEXT, backbone_hidden_size=64)
    assert ours.num_kv_shared_layers == theirs.text_config.num_kv_shared_layers == 2
    assert ours.tie_word_embeddings is theirs.tie_word_embeddings is True
    for key in ("hidden_size", "sliding_window", "rms_norm_eps", "max_position_embeddings", "layer_types"):
        assert getattr(ours, key) == getattr(theirs.text_config, key), key


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_size_per_layer_input": 8}, "hidden_size_per_layer_input"),
        ({"vocab_size_per_layer_input": VOCAB}, "vocab_size_per_layer_input"),
        ({"use_double_wide_mlp": True}, "use_double_wide_mlp"),
        ({"num_kv_shared_layers": 1}, "num_kv_shared_layers"),
        ({"outer": {"backbone_hidden_size": 0}}, "backbone_hidden_size"),
        ({"outer": {"use_ordered_embeddings": True, "num_centroids": 7}}, "num_centroids"),
        ({"outer": {"text_config": [1]}}, "text_config"),
    ],
)
def test_config_errors_name_the_field(change, field):
    outer = change.pop("outer", {})
    with pytest.raises(ConfigError, match=field):
        autolm.Gemma4AssistantConfig.from_dict({"text_config": dict(_TEXT, **change), **outer})


def test_generation_errors(checkpoints):
    _, ours, _ = checkpoints
    plain = ours["plain"]
    with pytest.raises(GenerationError, match="shared_kv_states"):
        plain(inputs_embeds=torch.zeros(1, 1, 128))
    unshared = autolm.Gemma4ForCausalLM(autolm.Gemma4TextConfig(
        **_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2, hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"]))  # fmt: skip
    with pytest.raises(GenerationError, match="num_kv_shared_layers"):
        unshared.generate(PROMPT, max_new_tokens=3, assistant_model=plain)
    with pytest.raises(GenerationError, match="one row"):
        ours["target"].generate(PROMPT.repeat(2, 1), max_new_tokens=3, assistant_model=plain)
