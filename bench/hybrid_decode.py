"""Greedy decode speed of hybrid (recurrent-layer) families, autolm against transformers in one process: a random
checkpoint of 16 layers, hidden 1024, fp32, written by transformers; a 64-token prompt, then 64 new tokens timed
(a generate of 72 minus one of 8), with the eager one-token step, the general forward, and the compiled step (compiled
first, once). `python bench/hybrid_decode.py [qwen3_5|lfm2|granite]`."""

import sys
import tempfile
import time

import torch
import transformers

import autolm


def config(name: str):
    if name == "qwen3_5":  # three Gated DeltaNet layers to one gated attention layer
        return transformers.Qwen3_5TextConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=16,
            num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=8,
            linear_num_value_heads=16, linear_key_head_dim=64, linear_value_head_dim=64,
        )  # fmt: skip
    if name == "lfm2":  # two short convolutions to one attention layer
        return transformers.Lfm2Config(
            vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=8, layer_types=["conv", "conv", "full_attention"] * 5 + ["conv"],
        )  # fmt: skip
    return transformers.GraniteMoeHybridConfig(  # three Mamba-2 layers to one attention layer, no experts
        vocab_size=32000, hidden_size=1024, intermediate_size=2048, shared_intermediate_size=2048,
        num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2, num_local_experts=0,
        layer_types=(["mamba"] * 3 + ["attention"]) * 4, mamba_n_heads=32, mamba_d_head=64, mamba_n_groups=1,
        mamba_d_state=128,
    )  # fmt: skip


def decode_rate(model, ids) -> tuple[float, torch.Tensor]:
    def run(n):
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, out

    run(4)  # warm-up
    t8, _ = run(8)
    t72, out = run(72)
    return 64 / (t72 - t8), out


def main(name: str) -> None:
    torch.manual_seed(0)
    d = tempfile.mkdtemp()
    transformers.AutoModelForCausalLM.from_config(config(name)).save_pretrained(d)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ours = autolm.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
    hf_rate, hf_out = decode_rate(theirs, ids)
    rate, out = decode_rate(ours, ids)
    ours.decode_mode = "forward"
    forward_rate, _ = decode_rate(ours, ids)
    ours.decode_mode = "auto"
    assert ours.precompile_decode(), "the compiled step failed (see the warning)"
    compiled_rate, compiled_out = decode_rate(ours, ids)
    print(f"{name}: transformers {hf_rate:.1f} tok/s, autolm eager {rate:.1f} tok/s ({rate / hf_rate:.2f}x), "
          f"compiled {compiled_rate:.1f} tok/s ({compiled_rate / hf_rate:.2f}x; the general forward each token "
          f"{forward_rate:.1f}), same tokens: {torch.equal(out, hf_out)} / {torch.equal(compiled_out, hf_out)}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "qwen3_5")
