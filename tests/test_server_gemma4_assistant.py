"""The serving engine's speculative decoding with a draft that reads the served model's state (Gemma 4's assistant,
`autolm serve MODEL --draft-model ASSISTANT`, autolm/serve/speculation.py): a lone request gets plain greedy
decoding's tokens and log-probabilities (those of generate() too) in fewer forwards, its drafts the assistant's
from the served model's hidden state and shared keys and values; a row left alone after a batch speculates;
sampled requests speculate; --draft-model with a model that shares no keys and values is refused at start."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, randomize, write_char_tokenizer
from test_family_gemma4_assistant import _COMMON, PROMPT, _assistant, _steer
from test_server_speculation import run, same

import autolm
import autolm.generation.speculative as speculative
from autolm.cli.common import UsageError
from autolm.cli.decode import load_draft
from autolm.generation import target_draft
from autolm.serve.engine import Engine
from autolm.serve.speculation import Speculation

transformers = pytest.importorskip("transformers")
from transformers.generation import candidate_generator  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """autolm's loads of transformers' Gemma 4 target (the last two of four layers KV-shared), its assistant
    (steered so that its drafts agree with the target in some rounds), and the target's tokenizer."""
    root = tmp_path_factory.mktemp("served_gemma4_assistant")
    target = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
        **_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_kv_shared_layers=2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        layer_types=["sliding_attention", "full_attention"] * 2)).eval()  # fmt: skip
    randomize(target, 1)
    _steer(target, 3, 4.0, 1.0)
    assistant = _assistant(False, 2)
    _steer(assistant, 2, 30.0, -1.0)
    assistant.generation_config.num_assistant_tokens = 3
    target.save_pretrained(root / "target")
    assistant.save_pretrained(root / "assistant")
    for name in ("target", "assistant"):
        write_char_tokenizer(str(root / name))
    model = autolm.AutoModelForCausalLM.from_pretrained(root / "target")
    draft = autolm.AutoModelForCausalLM.from_pretrained(root / "assistant")
    tok = autolm.AutoTokenizer.from_pretrained(root / "target")
    return SimpleNamespace(model=model, draft=draft, tok=tok, root=root, hf=(target, assistant))


@pytest.fixture
def rounds(monkeypatch):
    """(accepted, proposed) for each verifying forward, and the TargetDraft rounds' drafts."""
    seen, drafts = [], []
    keep, propose = speculative._keep, target_draft.TargetDraft.propose

    def spy(run, n, k):
        seen.append((n, k))
        return keep(run, n, k)

    def proposed(self, run, limit):
        found = propose(self, run, limit)
        drafts.append(found.tokens[0].tolist())
        return found

    monkeypatch.setattr(speculative, "_keep", spy)
    monkeypatch.setattr(target_draft.TargetDraft, "propose", proposed)
    return seen, drafts


def _transformers_drafts(target, assistant, ids: torch.Tensor, new: int) -> list[list[int]]:
    """The candidates of each round of transformers' assisted generation (SinglePositionMultiTokenCandidate-
    Generator) after ids."""
    drafts, get = [], candidate_generator.SinglePositionMultiTokenCandidateGenerator.get_candidates

    def recorded(self, input_ids, *args, **kwargs):
        out, logits = get(self, input_ids, *args, **kwargs)
        if logits is not None:
            drafts.append(out[0, input_ids.shape[1] :].tolist())
        return out, logits

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(
            candidate_generator.SinglePositionMultiTokenCandidateGenerator, "get_candidates", recorded
        )
        target.generate(ids, max_new_tokens=new, do_sample=False, assistant_model=assistant)
    return drafts


def test_a_lone_request_gets_plain_greedy_tokens(served, rounds):
    """...and the drafts of transformers' assisted generation from the prompt and the first token: the first
    step (one token) leaves the assistant's state as a prefill of both does, each verification the next."""
    model, draft, tok = served.model, served.draft, served.tok
    seen, drafts = rounds
    prompt = PROMPT[0].tolist()
    plain, fast = Engine(model, tok), Engine(model, tok, speculation=Speculation(draft_model=draft))
    try:
        expected = run(plain, [prompt], [20])[0]
        assert not seen
        got = run(fast, [prompt], [20])[0]
    finally:
        plain.stop()
        fast.stop()
    same(got, expected)
    greedy = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
    assert got.all_token_ids == greedy[0, PROMPT.shape[1] :].tolist()
    assert got.completion_tokens == 20
    assert len(seen) == len(drafts)  # every round's candidates came from the assistant
    first = torch.cat([PROMPT, greedy[:, PROMPT.shape[1] : PROMPT.shape[1] + 1]], 1)
    assert drafts == _transformers_drafts(*served.hf, first, 19)
    accepted = [n for n, _ in seen]
    assert sum(accepted) > 0 and 0 in accepted  # rounds that kept candidates and rounds that rejected them
    assert fast.steps + len(seen) < plain.steps  # fewer forwards than tokens


def test_the_row_left_alone_after_a_batch_speculates(served, rounds):
    model, draft, tok = served.model, served.draft, served.tok
    seen, _ = rounds
    prompts = [PROMPT[0].tolist(), [5, 9, 30, 31, 32]]
    plain, fast = Engine(model, tok), Engine(model, tok, speculation=Speculation(draft_model=draft))
    try:
        expected = run(plain, prompts, [24, 4])
        got = run(fast, prompts, [24, 4])
    finally:
        plain.stop()
        fast.stop()
    for a, b in zip(got, expected):
        same(a, b)
    assert seen


def test_sampled_requests_speculate(served, rounds):
    seen, _ = rounds
    model, draft, tok = served.model, served.draft, served.tok
    fast = Engine(model, tok, speculation=Speculation(draft_model=draft))
    try:
        sampled = run(fast, [PROMPT[0].tolist()], [16], config=dict(do_sample=True, top_k=5))[0]
    finally:
        fast.stop()
    assert sampled.completion_tokens == 16 and seen


def test_draft_model_for_a_model_without_kv_sharing_is_refused(served, tmp_path):
    unshared = autolm.Gemma4ForCausalLM(autolm.Gemma4TextConfig(
        **_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2, hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"]))  # fmt: skip
    args = argparse.Namespace(draft_model=str(served.root / "assistant"), dtype="auto", device=None, quantize=None,
                              compile=False, eager=True)  # fmt: skip
    with pytest.raises(UsageError, match=r"--draft-model .*num_kv_shared_layers"):
        load_draft(args, unshared, served.tok)
