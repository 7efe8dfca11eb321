"""The benchmark's measuring child runs for both libraries and reports every metric."""

from __future__ import annotations

import pytest

from autolm.bench import Case, run_child


@pytest.mark.parametrize("lib", ["autolm", "transformers"])
def test_bench_child_reports_all_metrics(checkpoint, lib):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    r = run_child(lib, Case("tiny", directory, "float32"), threads=1, prefill=16, decode=4)
    compiled = {"decode_compiled"} if lib == "autolm" else set()  # autolm's opt-in compiled decode step
    assert set(r) == {"import", "load", "load_rss", "ttft", "first_token_rss", "prefill", "decode"} | compiled
    assert r["prefill"] > 0 and r["decode"] > 0 and r["first_token_rss"] > 0
    assert 0 < r["import"] + r["load"] < r["ttft"]  # the first token comes after import and load
