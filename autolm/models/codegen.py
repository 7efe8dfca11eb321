"""CodeGen (Salesforce's CodeGen 350M ... 16B, mono / multi / nl, and CodeGen2 1B ... 16B): GPT-J's layer (gptj.py:
one LayerNorm feeding attention and the MLP in parallel, RoPE on the first rotary_dim dimensions of each head over
interleaved pairs, a GELU fc_in -> fc_out MLP with biases, an LM head with a bias) with q/k/v packed in one Linear
without bias, `qkv_proj`, in the layout of the TPU-v4 training code, which transformers keeps: its 3 * n_embd
outputs are mp_num = 4 blocks, one per model-parallel shard, each holding that shard's n_head / 4 heads as all their
queries, then all their values, then all their keys:

    qkv_proj rows = [shard 0: q (n_head / 4 heads) | v | k] [shard 1: q | v | k] [shard 2: ...] [shard 3: ...]

so the heads are numbered shard by shard, and n_head must divide by 4. transformers adds the attention mask before
dividing the scores by sqrt(head_dim), and gives the rotary tables in float32 whatever the model's dtype: the same
numbers at the real positions (in float32). `n_ctx` changes nothing (transformers keeps it; so does autolm).

llama.cpp has no CodeGen architecture: no GGUF. Tensor parallelism splits qkv_proj's rows by whole shards (over 2
or 4 ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Linear
from .gptj import GPTJAttention, GPTJBlock, GPTJConfig, GPTJForCausalLM, GPTJModel, config_json_names

MP_NUM = 4  # the model-parallel shards qkv_proj's rows are laid out for (transformers' mp_num)


@dataclass(repr=False)
class CodeGenConfig(GPTJConfig):
    """transformers' CodeGenConfig: GPT-J's fields (config.json's n_embd, n_layer, n_head, ... names) and n_ctx,
    which changes nothing. transformers' config has no pad_token_id: written where set."""

    model_type: ClassVar[str] = "codegen"
    absent_keys: ClassVar[tuple[str, ...]] = ("pad_token_id",)

    n_ctx: int = 2048

    def validate(self) -> None:
        super().validate()
        if self.num_attention_heads % MP_NUM:
            raise ConfigError(
                f"{self.source}: n_head must be a multiple of {MP_NUM} (qkv_proj holds the heads in {MP_NUM} "
                f"model-parallel blocks), found {self.num_attention_heads}"
            )
        if not (_is_int(self.n_ctx) and self.n_ctx > 0):
            raise ConfigError(f"{self.source}: n_ctx must be a positive integer, found {self.n_ctx!r}")


config_json_names(CodeGenConfig)


class CodeGenAttention(GPTJAttention):
    """GPT-J's attention with q/k/v in one `qkv_proj` (mp_num blocks of [q | v | k], see the module docstring) and
    out_proj."""

    def __init__(self, config: CodeGenConfig, layer_idx: int):
        self.shard_width = config.hidden_size // MP_NUM  # the width of q, v or k in one block
        super().__init__(config, layer_idx)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.qkv_proj = Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = Linear(hidden, hidden, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        # (B, T, blocks, [q, v, k], width): the blocks this rank holds (all 4 in one process)
        qkv = self.qkv_proj(x).view(B, T, -1, 3, self.shard_width)
        q, v, k = (t.reshape(B, T, -1) for t in qkv.unbind(3))
        return q, k, v


class CodeGenBlock(GPTJBlock):
    attention_cls = CodeGenAttention


class CodeGenModel(GPTJModel):
    block_cls = CodeGenBlock


class CodeGenForCausalLM(GPTJForCausalLM):
    """transformers' CodeGenForCausalLM: GPT-J's with CodeGen's attention."""

    config_class = CodeGenConfig
    model_cls = CodeGenModel
    # transformers declares no plan for CodeGen; qkv_proj's rows split in whole model-parallel blocks
    tp_patterns: ClassVar[dict[str, str]] = {
        "h.*.attn.qkv_proj": "colwise",
        "h.*.attn.out_proj": "rowwise",
        "h.*.mlp.fc_in": "colwise",
        "h.*.mlp.fc_out": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["CodeGenBlock"]

    def shard_heads(self, world: int) -> None:
        """Each rank holds MP_NUM / world of qkv_proj's blocks: world must divide MP_NUM."""
        if MP_NUM % world:
            raise ConfigError(
                f"tensor parallel over {world} ranks: CodeGen's qkv_proj holds its heads in {MP_NUM} blocks, "
                f"which split over 1, 2 or {MP_NUM} ranks only"
            )
        super().shard_heads(world)
