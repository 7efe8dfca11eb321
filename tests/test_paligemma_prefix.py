"""PaliGemma's attention on text, against transformers' PaliGemmaForConditionalGeneration: token_type_ids (type 0
the prefix, attended both ways in the prompt's forward; later tokens causal) in forward and generate (the one-token
step, the general forward for every token, beam search) over a left-padded batch, on PaliGemma 1 (a Gemma whose
use_bidirectional_attention its files leave unset) and PaliGemma 2's Gemma 2 (a sliding window narrower than the
prefix); PaliGemma 1 without token_type_ids (an unpadded batch's prompt attended both ways, a padded one causally);
HRM-Text's prefix_lm (type 1 the prefix) against transformers' HrmTextForCausalLM. Each prefix is checked to change
the logits."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, randomize, write_char_tokenizer
from test_family_hrm_text import HRM
from test_family_image_text import SIGLIP, TEXT
from test_family_image_text_more import _checkpoint

import autolm
from autolm.errors import GenerationError

# PaliGemma 1 as the Hub's files hold it: text_config leaves use_bidirectional_attention out
PALIGEMMA1 = dict(
    text_config=dict(TEXT, model_type="gemma", head_dim=16), vision_config=SIGLIP, projection_dim=64
)
_BUILT = {}


def _paligemma(tmp_path_factory, name: str):
    """(autolm's model, transformers' PaliGemmaForConditionalGeneration) of the checkpoint, made once:
    test_family_image_text_more's "paligemma2", or PaliGemma 1's ("paligemma1")."""
    if name not in _BUILT:
        if name == "paligemma1":
            import transformers

            directory = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            hf = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(**PALIGEMMA1))
            randomize(hf)
            hf.tie_weights()
            hf.save_pretrained(directory)
            directory, hf = str(directory), hf.eval()
        else:
            directory, hf = _checkpoint(tmp_path_factory, name)
        _BUILT[name] = (autolm.AutoModelForCausalLM.from_pretrained(directory), hf)
    return _BUILT[name]


def _inputs(prefix_type: int = 0):
    """A left-padded batch (13, 9 and 4 tokens) and its token_type_ids: each row's first 6 real tokens are the
    prefix (the 4-token row all prefix), and row 1's ninth real token too (a prefix block need not be contiguous);
    the padding typed as the prefix (the padding mask keeps it out)."""
    ids, mask = padded_batch()
    types = torch.full_like(ids, 1 - prefix_type)
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        types[row, : start + 6] = prefix_type
    types[1, -1] = prefix_type
    return ids, mask, types


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _greedy(model, **inputs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("name", ["paligemma1", "paligemma2"])
def test_token_type_ids_as_transformers(name, tmp_path_factory):
    """With token_type_ids, forward's logits over a left-padded batch and one unpadded row, and generate's greedy
    tokens over the batch, are transformers'; the prefix changes the logits from the causal model's."""
    model, hf = _paligemma(tmp_path_factory, name)
    ids, mask, types = _inputs()
    real = mask.bool()
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ours = _logits(model, **batch)[real]
    torch.testing.assert_close(ours, _logits(hf, **batch)[real], atol=1e-4, rtol=1e-4)
    assert (ours - _logits(model, input_ids=ids, attention_mask=mask)[real]).abs().max() > 1e-2
    row = dict(input_ids=ids[:1], token_type_ids=types[:1])
    torch.testing.assert_close(_logits(model, **row), _logits(hf, **row), atol=1e-4, rtol=1e-4)
    assert torch.equal(_greedy(model, **batch), _greedy(hf, **batch))


def test_token_type_ids_in_every_decode_path(tmp_path_factory):
    """The prefix's prompt then causal tokens through the general forward for every token (not the one-token step),
    and in beam search, as transformers' greedy tokens."""
    model, hf = _paligemma(tmp_path_factory, "paligemma1")
    ids, mask, types = _inputs()
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    model.decode_mode = "forward"
    try:
        assert torch.equal(_greedy(model, **batch), _greedy(hf, **batch))
    finally:
        model.decode_mode = "auto"
    beams = dict(input_ids=ids[:1], token_type_ids=types[:1], num_beams=2)
    assert torch.equal(_greedy(model, **beams), _greedy(hf, **beams))


def test_paligemma1_attends_both_ways_without_padding(tmp_path_factory, tmp_path):
    """PaliGemma 1 without token_type_ids: an unpadded batch's prompt attends both ways, a padded batch's causally,
    each as transformers (logits and greedy tokens). The text model autolm saves (use_bidirectional_attention
    false) is the causal model: its logits differ on the unpadded batch and agree on the padded one."""
    model, hf = _paligemma(tmp_path_factory, "paligemma1")
    model.save_pretrained(tmp_path)
    text = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = padded_batch()
    real, unpadded = mask.bool(), ids[:, -4:]
    ours = _logits(model, input_ids=unpadded)
    torch.testing.assert_close(ours, _logits(hf, input_ids=unpadded), atol=1e-4, rtol=1e-4)
    assert (ours - _logits(text, input_ids=unpadded)).abs().max() > 1e-2
    padded = _logits(model, input_ids=ids, attention_mask=mask)[real]
    torch.testing.assert_close(
        padded, _logits(hf, input_ids=ids, attention_mask=mask)[real], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(padded, _logits(text, input_ids=ids, attention_mask=mask)[real])
    for inputs in (dict(input_ids=unpadded), dict(input_ids=ids, attention_mask=mask)):
        assert torch.equal(_greedy(model, **inputs), _greedy(hf, **inputs))


def test_hrm_text_prefix_lm_as_transformers(tmp_path_factory):
    """HRM-Text's prefix_lm: token_type_ids == 1 the prefix, in forward (a left-padded batch) and generate, as
    transformers' HrmTextForCausalLM; the prefix changes the logits."""
    directory, hf = HRM.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask, types = _inputs(prefix_type=1)
    real = mask.bool()
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ours = _logits(model, **inputs)[real]
    torch.testing.assert_close(ours, _logits(hf, **inputs)[real], atol=1e-4, rtol=1e-4)
    assert (ours - _logits(model, input_ids=ids, attention_mask=mask)[real]).abs().max() > 1e-2
    assert torch.equal(_greedy(model, **inputs), _greedy(hf, **inputs))


def test_token_type_ids_refused_by_shape(tmp_path_factory):
    """token_type_ids of another shape than the input's are refused by name, in forward and generate; a model
    without a prefix (a Gemma loaded as itself) takes none in generate, as before."""
    model, _ = _paligemma(tmp_path_factory, "paligemma1")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(GenerationError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(GenerationError, match="token_type_ids"):
        model.generate(ids, token_type_ids=[[0, 0, 1]], max_new_tokens=2)


def test_served_prompts_attend_both_ways_alone(tmp_path_factory, tmp_path):
    """The serving engine reads a PaliGemma 1 prompt alone, whole and from scratch: prompts of three lengths
    submitted together twice, with prefix caching on and a 3-token prefill chunk, each get transformers' greedy
    tokens for the unpadded prompt alone (read in one padded batch, or in chunks after cached blocks, they would
    attend causally)."""
    from test_prefix_cache import run

    from autolm.serve.engine import Engine

    model, hf = _paligemma(tmp_path_factory, "paligemma1")
    write_char_tokenizer(str(tmp_path))
    ids, mask = padded_batch()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)] * 2
    engine = Engine(
        model, autolm.AutoTokenizer.from_pretrained(tmp_path), prefix_cache=1 << 20, prefill_chunk=3
    )
    try:
        got = run(engine, prompts)
    finally:
        engine.stop()
    for prompt, finished in zip(prompts, got):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2)
        assert finished.all_token_ids == want[0, len(prompt) :].tolist()
