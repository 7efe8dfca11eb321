"""The serving engine over families whose rows run apart (serve/rows.py): learned positions at the cache's slots (the
BART-style decoders, Whisper's, ProphetNet's: transformers counts a left-padded row's padding in its positions),
DeepSeek-V4's compressors pooling windows of slots, a state-space mixer's in_proj bias reaching its conv at padding
positions (Mamba's, Mamba-2's use_bias), Doge's mixture routing a token by other tokens of the batch, LongRoPE's
tables following a batch's longest row (Phi-3's, MiniCPM3's): two requests of different lengths batched together
each get generate()'s greedy tokens on their prompt alone; XLM and XLNet, whose generation keeps no KV cache,
Gemma 4's assistant, a draft model only, and MusicGen's decoders are refused by name."""

from __future__ import annotations

import queue
import shutil

import pytest
import torch
from conftest import write_char_tokenizer
from test_family_bart import FAMILIES as BART
from test_family_bigbird_pegasus import FAMILIES as BIGBIRD_PEGASUS
from test_family_deepseek_v4 import BASE as DEEPSEEK_V4
from test_family_doge import MOE as DOGE_MOE
from test_family_gemma4_assistant import _assistant
from test_family_mamba import MAMBA
from test_family_mamba import PLAIN as MAMBA_PLAIN
from test_family_mamba2 import MAMBA2
from test_family_minicpm3 import LONGROPE as MINICPM3
from test_family_musicgen import checkpoint as musicgen_checkpoint
from test_family_phi3 import PHI3
from test_family_prophetnet import BASE as PROPHETNET
from test_family_whisper import FAMILIES as WHISPER
from test_family_xlm import CAUSAL as XLM
from test_family_xlnet import BI as XLNET

import autolm
from autolm.errors import GenerationError
from autolm.generation import GenerationConfig
from autolm.serve.engine import Engine, Sequence
from autolm.serve.events import Failed, Finished
from autolm.serve.rows import apart

CASES = {"mbart": BART["mbart"], "whisper": WHISPER["whisper"], "prophetnet": PROPHETNET,
         "bigbird_pegasus": BIGBIRD_PEGASUS["bigbird_pegasus"], "deepseek_v4": DEEPSEEK_V4, "mamba_bias": MAMBA,
         "mamba2_bias": MAMBA2, "doge_moe": DOGE_MOE, "phi3_longrope": PHI3, "minicpm3_longrope": MINICPM3}  # fmt: skip
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def served(tmp_path_factory, family):
    directory, _ = family.checkpoint(tmp_path_factory)
    d = tmp_path_factory.mktemp("rows_apart") / "model"
    shutil.copytree(directory, d)
    write_char_tokenizer(str(d))
    model = autolm.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return model, autolm.AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("name", CASES)
def test_batched_requests_get_their_tokens_alone(tmp_path_factory, name):
    model, tokenizer = served(tmp_path_factory, CASES[name])
    alone = [
        model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, forced_eos_token_id=None)[
            0, len(p) :
        ]
        for p in PROMPTS
    ]
    engine = Engine(model, tokenizer)
    events: queue.Queue = queue.Queue()
    try:
        for k, p in enumerate(PROMPTS):
            cfg = GenerationConfig(max_new_tokens=6, eos_token_id=2)
            engine.submit(Sequence(p, cfg, [], lambda ev, k=k: events.put((k, ev)), ignore_eos=True))
        tokens: dict[int, list[int]] = {0: [], 1: []}
        done = set()
        while len(done) < len(PROMPTS):
            k, ev = events.get(timeout=300)
            assert not isinstance(ev, Failed), ev.message
            tokens[k] += ev.token_ids
            if isinstance(ev, Finished):
                done.add(k)
    finally:
        engine.stop()
    assert [tokens[0], tokens[1]] == [a.tolist() for a in alone]


def test_a_mamba_without_an_in_proj_bias_keeps_its_rows_together(tmp_path_factory):
    """Its padding is zeroed before and after the conv: nothing of it reaches a row, which batches as usual."""
    assert apart(served(tmp_path_factory, MAMBA)[0])
    assert not apart(served(tmp_path_factory, MAMBA_PLAIN)[0])


def test_longrope_rows_run_apart_only_across_the_switch(tmp_path_factory):
    """Rows on one side of LongRoPE's switch (a forward over more than original_max_position_embeddings, 8, tokens
    takes the long factors) share a batch's tables."""
    model = served(tmp_path_factory, PHI3)[0]
    assert not apart(model, [3, 8]) and not apart(model, [9, 12])
    assert apart(model, [4, 9]) and apart(model, [8, 9])


@pytest.mark.parametrize(("family", "reason"), [(XLM, "xlm cannot be served: its generation recomputes"),
                                                (XLNET, "xlnet cannot be served: its generation reruns")])  # fmt: skip
def test_a_model_without_a_kv_cache_is_refused_by_name(tmp_path_factory, family, reason):
    model, tokenizer = served(tmp_path_factory, family)
    with pytest.raises(GenerationError, match=reason):
        Engine(model, tokenizer)


def test_a_draft_model_alone_is_refused_by_name(tmp_path):
    """Gemma 4's assistant drafts from its target's keys and values: no language model on its own."""
    _assistant(False, 2).save_pretrained(tmp_path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(
        GenerationError, match="gemma4_assistant cannot be served: it drafts from its target's"
    ):
        Engine(model, None)


def test_an_audio_code_decoder_is_refused_by_name(tmp_path_factory):
    """MusicGen's decoder reads num_codebooks rows of codes per sequence: no text prompt to serve."""
    model = autolm.AutoModelForCausalLM.from_pretrained(musicgen_checkpoint(tmp_path_factory, "melody")[0])
    with pytest.raises(
        GenerationError, match="musicgen_melody_decoder cannot be served: its input is num_codebooks"
    ):
        Engine(model, None)
