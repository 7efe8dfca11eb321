"""generate(return_dict_in_generate=True, output_scores / output_logits / output_hidden_states / output_attentions)
with beam search and with speculative decoding, against transformers on a tiny Llama (eager attention, so both
libraries return attention weights).

- Beam search (GenerateBeamDecoderOnlyOutput): sequences, sequences_scores, beam_indices, per step the processed
  scores and raw logits of every running beam, and the forward's hidden states and attentions per layer (the
  prompt's whole forward first, then one row per beam), for a left-padded batch.
- Speculation (GenerateDecoderOnlyOutput from assisted decoding): per new token its scores, logits, hidden states
  (B, 1, h) and attention over the slots up to its own, split out of the verifying forward, as transformers'
  _split_model_outputs splits them; transformers' first round (prompt and candidates in one forward) gives its
  accepted candidates' entries the prompt's first rows instead, a slicing slip autolm does not copy: there the
  comparison is with transformers' plain greedy decoding, which gives each token its own row.
"""

from __future__ import annotations

import copy

import pytest
import torch

import autolm

NAME = "llama_gqa_llama3_sharded"
ASK = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True,
           output_attentions=True, do_sample=False)  # fmt: skip


@pytest.fixture(scope="module")
def models(checkpoint):
    """(transformers' model with eager attention, autolm's) for the tiny Llama."""
    import transformers

    directory, _ = checkpoint(NAME)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    return hf, autolm.AutoModelForCausalLM.from_pretrained(directory)


def _same_layers(ours, theirs, prompt_rows: torch.Tensor | None = None) -> None:
    """Per step, per layer: equal shapes and values; the prompt's step (0) compared on its real rows only (a
    padding row attends to nothing real: the libraries fill it differently)."""
    assert len(ours) == len(theirs)
    for step, (layers_ours, layers_theirs) in enumerate(zip(ours, theirs)):
        assert len(layers_ours) == len(layers_theirs)
        for a, b in zip(layers_ours, layers_theirs):
            assert a.shape == b.shape, (step, a.shape, b.shape)
            if step == 0 and prompt_rows is not None:
                a, b = (a[prompt_rows], b[prompt_rows]) if a.dim() == 3 else (a.transpose(1, 2)[prompt_rows],
                                                                              b.transpose(1, 2)[prompt_rows])  # fmt: skip
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", [dict(num_return_sequences=2), dict(eos_token_id=7, length_penalty=0.5)])
def test_beam_search_outputs_equal_transformers(models, settings):
    """num_beams=3 over a left-padded batch of 2: every field of transformers' GenerateBeamDecoderOnlyOutput (the
    fields' names and order too); with an EOS that ends beams early, the per-step tuples run to where search
    stopped."""
    hf, model = models
    ids = torch.tensor([[0, 0, 17, 33, 5], [1, 17, 33, 5, 99]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, pad_token_id=0, **ASK, **settings)
    theirs, ours = hf.generate(ids, **kw), model.generate(ids, **kw)
    assert sorted(ours.keys()) == sorted(k for k in theirs if theirs[k] is not None)
    assert len(ours.to_tuple()) == len(theirs.to_tuple())
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.beam_indices, theirs.beam_indices)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-5, rtol=1e-5)
    assert len(ours.scores) == len(theirs.scores) == len(ours.logits) == len(theirs.hidden_states)
    for a, b in zip(ours.scores + ours.logits, theirs.scores + theirs.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    rows = mask.bool().repeat_interleave(3, 0)
    _same_layers(ours.hidden_states, theirs.hidden_states, rows)
    _same_layers(ours.attentions, theirs.attentions, rows)
    with torch.no_grad():  # what the last step's states are: the running beams' newest tokens, one row each
        assert ours.hidden_states[-1][0].shape == (6, 1, 64) and ours.attentions[-1][0].shape[2] == 1
    assert model.generate(ids, **dict(kw, return_dict_in_generate=False)).shape == ours.sequences.shape


def test_prompt_lookup_outputs_equal_transformers(models, rounds):
    """prompt_lookup_num_tokens: a prompt with no repeated n-gram (transformers' first round proposes nothing)
    whose continuation repeats itself, so later rounds accept candidates: scores, logits, hidden states and
    attentions per token equal transformers' assisted decoding's, and its plain greedy decoding's."""
    hf, model = models
    ids = torch.tensor([[1, 17, 33, 5, 99, 42, 7]])
    kw = dict(max_new_tokens=30, eos_token_id=None, pad_token_id=0, **ASK)
    theirs, plain = hf.generate(ids, prompt_lookup_num_tokens=3, **kw), hf.generate(ids, **kw)
    ours = model.generate(ids, prompt_lookup_num_tokens=3, **kw)
    assert any(n > 0 for n, _ in rounds), rounds  # candidates were accepted: several tokens per forward
    for reference in (theirs, plain):
        assert torch.equal(ours.sequences, reference.sequences)
        assert len(ours.scores) == len(reference.scores) == 30
        for a, b in zip(ours.scores + ours.logits, reference.scores + reference.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        _same_layers(ours.hidden_states, reference.hidden_states)
        _same_layers(ours.attentions, reference.attentions)


def test_assisted_outputs_per_token(models, rounds):
    """assistant_model (a noisy copy: some candidates accepted, some not): the tokens, scores and logits of
    transformers' assisted decoding; hidden states and attentions per token those of transformers' plain greedy
    decoding, and those of its assisted decoding after its first round (see the module docstring)."""
    hf, model = models
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.abs().mean())
    hf_draft = copy.deepcopy(hf)
    hf_draft.load_state_dict(draft.state_dict())
    ids = torch.tensor([[1, 17, 33, 5, 99, 42, 7]])
    kw = dict(max_new_tokens=24, eos_token_id=None, pad_token_id=0, **ASK)
    spec = dict(num_assistant_tokens=3, assistant_confidence_threshold=0.0)
    ours = model.generate(ids, assistant_model=draft, **spec, **kw)
    hf_draft.generation_config.update(**spec)
    theirs, plain = hf.generate(ids, assistant_model=hf_draft, **kw), hf.generate(ids, **kw)
    assert any(n > 0 for n, _ in rounds) and any(n < k for n, k in rounds), rounds
    assert torch.equal(ours.sequences, theirs.sequences) and torch.equal(ours.sequences, plain.sequences)
    for a, b in zip(ours.scores + ours.logits, theirs.scores + theirs.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    _same_layers(ours.hidden_states, plain.hidden_states)
    _same_layers(ours.attentions, plain.attentions)
    # transformers' first round: its accepted candidates' entries hold the prompt's rows 0, 1, ...
    first = next(i for i in range(1, 24) if not torch.equal(theirs.hidden_states[i][1][0, 0],
                                                            theirs.hidden_states[0][1][0, i - 1]))  # fmt: skip
    assert first > 1  # the draft's first candidates were accepted: the case the docstring describes
    _same_layers(ours.hidden_states[first:], theirs.hidden_states[first:])
    _same_layers(ours.attentions[first:], theirs.attentions[first:])


def test_states_are_collected_only_when_asked(models, monkeypatch):
    """Without output_hidden_states / output_attentions no forward is asked for them (beam search, speculation)."""
    _, model = models
    asked = []
    forward = type(model).forward

    def spy(self, *args, **kwargs):
        asked.append(bool(kwargs.get("output_hidden_states")) or bool(kwargs.get("output_attentions")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    ids = torch.tensor([[1, 17, 33, 5, 99, 42, 7]])
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
              output_scores=True)  # fmt: skip
    out = model.generate(ids, num_beams=2, **kw)
    assert out.hidden_states is None and out.attentions is None
    out = model.generate(ids, prompt_lookup_num_tokens=2, **kw)
    assert out.hidden_states is None and out.attentions is None
    assert asked and not any(asked)
