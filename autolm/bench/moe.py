"""The mixture-of-experts row of `autolm bench`: a Qwen3-MoE-shaped checkpoint (8 experts, 2 used per token,
~240 M parameters, ~480 MB in bf16) written by transformers itself, and what one decode step of it reads."""

from __future__ import annotations

import os
import subprocess
import sys

MOE_LABEL = "Qwen3-MoE-shaped 8 experts top-2 bf16"


def write_moe_checkpoint(path: str) -> None:
    """A random Qwen3-MoE model written by transformers (it must be installed): 8 layers of hidden 1024, 16 heads
    (4 KV heads), 8 experts of 768 per layer, 2 used per token."""
    code = (
        "import sys, torch, transformers\n"
        "cfg = transformers.Qwen3MoeConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3072,"
        " moe_intermediate_size=768, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,"
        " head_dim=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096)\n"
        "torch.manual_seed(0)\n"
        "with torch.device('meta'):\n    m = transformers.AutoModelForCausalLM.from_config(cfg)\n"
        "m = m.to_empty(device='cpu').to(torch.bfloat16)\n"
        "with torch.no_grad():\n"
        "    for n, p in m.named_parameters():\n"
        "        p.fill_(1.0) if 'norm' in n else torch.nn.init.normal_(p, std=0.02)\n"
        "m.save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, path], check=True)


def moe_checkpoint(root: str) -> str:
    """The benchmark's MoE checkpoint under `root`, written once."""
    path = os.path.join(root, "qwen3-moe-8x2-bf16")
    if not os.path.isdir(path):
        write_moe_checkpoint(path)
    return path


def unused_expert_bytes(model) -> int:
    """Bytes of the experts a token does not use: a decode step does not read them."""
    from ..nn.moe import SparseMoeBlock

    total = 0
    for block in (m for m in model.modules() if isinstance(m, SparseMoeBlock)):
        e = block.experts
        share = 1 - getattr(block, block.router_name).top_k / e.num_experts
        weights = [t for n, t in [*e.named_parameters(), *e.named_buffers()] if not n.endswith("bias")]
        total += int(share * sum(t.numel() * t.element_size() for t in weights))
    return total


def active_expert_weights(model) -> int:
    """Parameters of the experts one token uses (what prefill_flops counts for them)."""
    from ..nn.moe import SparseMoeBlock

    total = 0
    for block in (m for m in model.modules() if isinstance(m, SparseMoeBlock)):
        e = block.experts
        total += 3 * getattr(block, block.router_name).top_k * e.hidden_size * e.intermediate_size
    return total
