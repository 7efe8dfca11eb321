"""The benchmark's measuring child runs for both libraries and reports every metric."""

from __future__ import annotations

import pytest

from autolm.bench import Case, run_child


@pytest.mark.parametrize("lib", ["autolm", "transformers"])
def test_bench_child_reports_all_metrics(checkpoint, lib, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOLM_HOME", str(tmp_path))  # the step compiled ahead of time is cached here
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    # autolm's decode step compiled ahead of time (this run compiles it); its torch.compile'd one (compile_decode,
    # tested in test_generation) is left out: the bench measures both, a second compile here adds only time
    r = run_child(lib, Case("tiny", directory, "float32", compile=False), threads=1, prefill=16, decode=4)
    compiled = {"decode_aot", "aot_load"} if lib == "autolm" else set()
    base = {
        "import",
        "load",
        "load_rss",
        "ttft",
        "load_first",
        "first_token_rss",
        "prefill",
        "decode",
        "decode_n",
    }
    assert set(r) == base | compiled
    assert r["decode_n"] == 4  # the eager decode's tokens
    assert r["prefill"] > 0 and r["decode"] > 0 and r["first_token_rss"] > 0
    assert 0 < r["import"] + r["load"] < r["ttft"]  # the first token comes after import and load
    assert r["load"] < r["load_first"] < r["ttft"] - r["import"]  # ... and the load after the imports


def test_prefill_flops_counts_the_decoder_matrices_and_causal_attention(checkpoint):
    import autolm
    from autolm.bench import matmul_rate, prefill_flops

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    c = model.config
    h, hd, nh, nkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    per_layer = h * nh * hd * 2 + h * nkv * hd * 2 + 3 * h * c.intermediate_size  # q, o; k, v; gate, up, down
    T = 10
    attention = c.num_hidden_layers * nh * hd * 2 * 2 * sum(range(1, T + 1))  # query t sees t keys
    assert (
        prefill_flops(model, T) == 2 * per_layer * c.num_hidden_layers * T + attention + 2 * h * c.vocab_size
    )
    assert matmul_rate(1, "float32", 64, 64, 64) > 1e8


def test_profile_reports_the_kernels_of_a_decode_step(checkpoint):
    from autolm.bench.profile import profile_decode

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    general, fast = profile_decode(directory, configs=(("float32", None),), prompt=8, steps=2)
    assert (general["mode"], fast["mode"]) == ("forward", "eager")
    for row in (general, fast):
        assert row["ms_per_token"] > 0 and any("linear" in k or "mm" in k for k in row["kernels"])
    assert fast["ops_per_token"] < general["ops_per_token"]  # the one-token step's point: no masks
