"""The one dispatch point for compute kernels: linear layers, attention and weight-only quantized matmuls.

Each function picks the fastest path for its inputs and falls back to PyTorch's public ops:

- fp32 linear layers on the CPU (eager inference) call oneDNN's matmul
  (`torch.ops.mkldnn._linear_pointwise`): on AMD CPUs PyTorch's F.linear goes to MKL's sgemm at
  under half of oneDNN's speed. Inside a compiler, inputs of up to 4 rows are written as
  multiply-and-sum, which inductor fuses into a matrix-vector loop that streams the weight once.
- attention (attention.py): bf16 prompts on the CPU go to `blocked_attention`; one query per row to
  `grouped_attention`; soft-capping, sinks or returned probabilities to the eager arithmetic; the rest
  to `F.scaled_dot_product_attention`; one token per row over the cache to `decode_attention` (eagerly on the
  CPU autolm's C++ kernel, cpu_ops.cpp, where it is built).
- RMSNorm's normalisation (`rms_norm`) and RoPE (`rotary`): eagerly on the CPU one call of that kernel each,
  else PyTorch's ops (`F.rms_norm` in fp32; nn.rope's rotation).
- int8 / int4 weight-only matmuls (quant.py) use PyTorch's CPU kernels (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`); elsewhere the layers dequantize.
- weights kept in llama.cpp's types (ggml.py, GGUF's Q8_0, Q6_K, Q3_K, ...): eagerly a tile of rows is
  dequantized at a time and multiplied by oneDNN; inside a compiled graph the weights are read in the
  matrix-vector loop itself: Q5_0 to Q8_0 from their exact repacking into int8 quants and per-group scales
  (one vector loop, the scale applied per product), the rest from the packed blocks (per group: a dot product
  with the integer quants, times the group's scale). Q4_0 to Q8_0, Q2_K to Q6_K and IQ4 go, where it is built, to
  autolm's C++ kernel (native.py, ggml_mm.cpp: llama.cpp's integer dot products on the blocks, eagerly and
  inside compiled graphs as torch.ops.autolm.ggml_mm); a mixture-of-experts layer's experts stacked in those
  blocks (experts.py) one expert's rows at a time, or inside compiled graphs each row with its own expert
  (torch.ops.autolm.ggml_mm_id, llama.cpp's mul_mat_id).

Private ops are looked up once, at first use. A missing or failing one (they can be renamed between
torch releases) makes autolm slower, never broken: the public fallback runs and a warning says so.
Checked on torch 2.13.0.
"""

from __future__ import annotations

from .attention import RowALiBi, attention, decode_attention
from .core import PrivateOp, linear, matvec, needs_grad, realize, realized_inputs, rms_norm, rotary
from .experts import expert_linear, ggml_expert_linear, mixture
from .ggml import dequantize as ggml_dequantize
from .ggml import ggml_linear, ggml_rows, group_linear, group_weight, llama_qk_order
from .quant import int4_linear, int4_pack, int4_unpack, int8_linear

__all__ = [
    "PrivateOp",
    "RowALiBi",
    "attention",
    "decode_attention",
    "expert_linear",
    "ggml_dequantize",
    "ggml_expert_linear",
    "ggml_linear",
    "ggml_rows",
    "group_linear",
    "group_weight",
    "int4_linear",
    "int4_pack",
    "int4_unpack",
    "int8_linear",
    "linear",
    "llama_qk_order",
    "matvec",
    "mixture",
    "needs_grad",
    "realize",
    "realized_inputs",
    "rms_norm",
    "rotary",
]
