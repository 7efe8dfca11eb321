"""The serving engine over families whose learned positions are the cache's slots (the BART-style decoders, Whisper's,
ProphetNet's: transformers counts a left-padded row's padding in its positions), which therefore run their rows
apart (serve/rows.py): two requests of different lengths batched together each get generate()'s greedy tokens on
their prompt alone; XLM, whose generation keeps no KV cache, is refused by name."""

from __future__ import annotations

import queue
import shutil

import pytest
import torch
from conftest import write_char_tokenizer
from test_family_bart import FAMILIES as BART
from test_family_prophetnet import BASE as PROPHETNET
from test_family_whisper import FAMILIES as WHISPER
from test_family_xlm import CAUSAL as XLM

import autolm
from autolm.errors import GenerationError
from autolm.generation import GenerationConfig
from autolm.serve.engine import Engine, Sequence
from autolm.serve.events import Failed, Finished

CASES = {"mbart": BART["mbart"], "whisper": WHISPER["whisper"], "prophetnet": PROPHETNET}
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


def test_a_model_without_a_kv_cache_is_refused_by_name(tmp_path_factory):
    model, tokenizer = served(tmp_path_factory, XLM)
    with pytest.raises(GenerationError, match="xlm cannot be served: its generation recomputes"):
        Engine(model, tokenizer)
