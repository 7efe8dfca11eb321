"""The Llama family (llama, mistral, qwen2, qwen3) with Hugging Face's module and parameter names.

The families differ only in biases, q/k norms and which layers use a sliding window; the config
object answers those questions, so one model file serves all of them. The model owns its structure:
its placement blocks, its tensor-parallel plan and its KV cache.

One forward (`LlamaModel.forward`, gpt-fast's `forward(idx, input_pos)`) serves prefill, decode and
the compiled decode step: new keys and values are written into a static cache at `cache_position`,
and attention reads as many key slots as the 2-D attention mask is wide.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import LlamaConfig
from ..generation import GenerationMixin
from ..saving import save_model
from .fused import decode_token, precompile
from .layers import (
    KVCache,
    Linear,
    RMSNorm,
    build_masks,
    default_positions,
    embedding,
    pad_mask_to,
    resized_rows,
)
from .output import CausalLMOutput, causal_lm_loss
from .rope import apply_rotary, cos_sin, inv_freq_and_scale


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd = config.head_dim
        h = config.hidden_size
        self.q_proj = Linear(h, self.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = Linear(h, self.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = Linear(h, self.num_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = Linear(self.num_heads * hd, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.sliding_window = config.layer_window(layer_idx)

    def forward(
        self,
        x,
        cos,
        sin,
        mask,
        cache: KVCache | None,
        cache_position,
        kv_length: int,
        attentions: list | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position, kv_length)  # (B, n_kv, S, hd)
        y = kernels.attention(q, k, v, mask, attentions)  # (B, T, nh, hd)
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, i, bias=config.mlp_bias)
        self.up_proj = Linear(h, i, bias=config.mlp_bias)
        self.down_proj = Linear(i, h, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, cache_position, kv_length, attentions=None):
        x = x + self.self_attn(
            self.input_layernorm(x), cos, sin, mask, cache, cache_position, kv_length, attentions
        )
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.fused_decode = True  # one-token steps on the CPU take fused.decode_token (False: this forward)
        self.compiled_decode = False  # ... compiled ahead of time (set by LlamaForCausalLM.precompile_decode)
        self._rope: tuple[torch.Tensor, float, int] | None = (
            None  # (inv_freq, scale, seq_len it was made for)
        )
        self._fused: tuple | None = None  # fused.decode_token's (plan, what it was built from, its number)

    def __getstate__(self):
        # the fused step's plan holds closures and views; copies and pickles rebuild it on first use
        return {**super().__getstate__(), "_fused": None}

    def rope_tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, 1, T, hd) for these positions; inv_freq is computed once (per length for dynamic RoPE)."""
        cfg = self.config
        seq_len = 0
        if cfg.rope_parameters.get("rope_type") == "dynamic":
            seq_len = max(int(position_ids.max()) + 1, cfg.max_position_embeddings)
        if self._rope is None or self._rope[2] != seq_len or self._rope[0].device != position_ids.device:
            inv_freq, scale = inv_freq_and_scale(
                cfg.rope_parameters, cfg.head_dim, cfg.max_position_embeddings, seq_len or None
            )
            self._rope = (inv_freq.to(position_ids.device), scale, seq_len)
        cos, sin = cos_sin(position_ids, self._rope[0], self._rope[1], dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: KVCache | None,
        cache_position: torch.Tensor,
        kv_length: int,
        hidden_states: list | None = None,
        attentions: list | None = None,
    ) -> torch.Tensor:
        """x: embeddings (B, T, h). The new tokens sit at cache_position (T,) among kv_length key slots;
        attention_mask (B, >= kv_length) marks real tokens, or is None. Returns normed hidden states;
        each layer's input (and the output) are appended to `hidden_states`, attention probabilities
        to `attentions`, when those lists are given."""
        B = x.shape[0]
        cos, sin = self.rope_tables(position_ids, x.dtype)
        masks = build_masks(self.config.windows(), attention_mask, cache_position, B, kv_length)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            mask = masks[layer.self_attn.sliding_window]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer,
                    x,
                    cos,
                    sin,
                    mask,
                    cache,
                    cache_position,
                    kv_length,
                    attentions,
                    use_reentrant=False,
                )
            else:
                x = layer(x, cos, sin, mask, cache, cache_position, kv_length, attentions)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x


class LlamaForCausalLM(nn.Module, GenerationMixin):
    """Decoder with an LM head; `forward` and `generate` follow transformers' signatures."""

    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = None
        self.load_report = None
        self.hf_device_map: dict[str, str] | None = None
        self.decode_step = None  # a compiled one-token step (autolm.compile_decode), else None

    # ---- structure: what loading, placement, tensor parallelism and generation ask of the model ----

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(
            self.lm_head, nn.Linear
        ):  # a quantized head is a copy
            self.lm_head.weight = self.model.embed_tokens.weight

    def blocks(self) -> list[str]:
        """Placement units in forward order: never split across devices."""
        return [
            "model.embed_tokens",
            *(f"model.layers.{i}" for i in range(len(self.model.layers))),
            "model.norm",
            "lm_head",
        ]

    def tp_plan(self) -> dict[str, str]:
        """{module: 'colwise' | 'rowwise' | 'embedding' | 'lm_head'}: how tensor parallelism splits each Linear
        (q/k/v/gate/up by output features, o/down by input features; untied embeddings and head by vocabulary)."""
        plan = {}
        if not self.config.tie_word_embeddings:
            plan.update({"model.embed_tokens": "embedding", "lm_head": "lm_head"})
        for i in range(len(self.model.layers)):
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                plan[f"model.layers.{i}.self_attn.{n}"] = "rowwise" if n == "o_proj" else "colwise"
            for n in ("gate_proj", "up_proj", "down_proj"):
                plan[f"model.layers.{i}.mlp.{n}"] = "rowwise" if n == "down_proj" else "colwise"
        return plan

    def shard_heads(self, world: int) -> None:
        """Under tensor parallelism each rank computes num_heads / world of the heads."""
        for layer in self.model.layers:
            layer.self_attn.num_heads //= world
            layer.self_attn.num_kv_heads //= world

    def layer_devices(self) -> list[torch.device]:
        """Where each decoder layer computes (disk-offloaded layers compute on the CPU)."""
        if self.hf_device_map:
            return [
                torch.device("cpu" if d == "disk" else d)
                for d in (self.hf_device_map[f"model.layers.{i}"] for i in range(len(self.model.layers)))
            ]
        return [self.model.embed_tokens.weight.device] * len(self.model.layers)

    def make_cache(self, batch_size: int, capacity: int) -> KVCache:
        """A KV cache for this model (its dtype, this rank's KV heads, each layer's device). With a compiled
        decode step the capacity rounds up to a multiple of 256 (one graph serves many lengths) and the
        buffers get static addresses."""
        w = self.model.embed_tokens.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        static = self.decode_step is not None
        if static:
            capacity = -(-capacity // 256) * 256
        attn = self.model.layers[0].self_attn
        return KVCache(
            len(self.model.layers),
            batch_size,
            attn.num_kv_heads,
            attn.head_dim,
            capacity,
            dtype,
            self.layer_devices(),
            static,
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Grow or cut the vocabulary of the embeddings (and an untied head) as transformers does."""
        emb = self.model.embed_tokens
        n = emb.weight.shape[0] if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if n == emb.weight.shape[0]:
            return emb
        std = float(self.config.extra.get("initializer_range", 0.02))
        with torch.no_grad():
            new_emb = nn.Embedding(
                n,
                emb.weight.shape[1],
                device=emb.weight.device,
                dtype=emb.weight.dtype,
                _weight=resized_rows(emb.weight, n, mean_resizing, std),
            )
            new_emb.weight.requires_grad_(emb.weight.requires_grad)
            self.model.embed_tokens = new_emb
            if not self.config.tie_word_embeddings:
                head = self.lm_head
                new_head = Linear(
                    head.in_features, n, bias=False, device=head.weight.device, dtype=head.weight.dtype
                )
                new_head.weight = nn.Parameter(
                    resized_rows(head.weight, n, mean_resizing, std), requires_grad=head.weight.requires_grad
                )
                self.lm_head = new_head
        self.config.vocab_size = n
        self.tie_weights()
        return new_emb

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers), as transformers counts them."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.nelement() * t.element_size() for t in tensors)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' device (under a device_map, where the embeddings run)."""
        if self.hf_device_map:
            d = self.hf_device_map["model.embed_tokens"]
            return torch.device("cpu" if d == "disk" else d)
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ---- running ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | None = None,
        **unused,
    ):
        """Logits (B, T, vocab); loss when labels are given (shifted by one, -100 ignored); the cache.

        The loss is the mean over the labelled tokens, or their sum / num_items_in_batch when given (as in
        transformers: the count over a whole batch that is split into micro-batches or across ranks).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.make_cache(B, T)
        past = cache.length if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + T, device=x.device)
        end = past + T if attention_mask is None else max(attention_mask.shape[-1], past + T)
        if position_ids is None:
            position_ids = default_positions(attention_mask, cache_position, B)
        if cache is not None:
            cache.reserve(end)
        hidden = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        if (
            self.decode_step is not None
            and attentions is None
            and T == 1
            and cache is not None
            and not kernels.needs_grad(x)
        ):
            mask = (
                attention_mask
                if attention_mask is not None
                else torch.ones(B, end, dtype=torch.long, device=x.device)
            )
            logits = self.decode_step(
                x, pad_mask_to(mask, cache.capacity), position_ids, cache, cache_position
            )
        else:
            logits = None
            if (
                B == 1
                and T == 1
                and self.model.fused_decode
                and cache is not None
                and hidden is None
                and attentions is None
                and x.device.type == "cpu"
                and not kernels.needs_grad(x)
                and int(cache_position[0]) == end - 1
                and (
                    attention_mask is None
                    or (attention_mask.shape[-1] >= end and bool(attention_mask[:, :end].all()))
                )
            ):
                logits = decode_token(self.model, self.lm_head, x, cache, end - 1, position_ids)
            if logits is None:
                h = self.model(
                    x, attention_mask, position_ids, cache, cache_position, end, hidden, attentions
                )
                logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        if cache is not None:
            cache.length = max(cache.length, end)
        loss = (
            causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)
            if labels is not None
            else None
        )
        out = CausalLMOutput(
            logits=logits,
            loss=loss,
            past_key_values=cache if use_cache or past_key_values is not None else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )
        return out if return_dict is not False else out.to_tuple()

    def precompile_decode(self, progress: bool = False) -> bool:
        """Compile the CPU one-token step (batch 1, see models/fused.py) ahead of time with AOTInductor: a few
        graphs per model shape, dtype and quantization, cached in $AUTOLM_HOME/compiled, so only the first
        run on a machine waits (tens of seconds; `progress` shows a bar) and later processes load them in
        milliseconds. From then on this model's generation uses the compiled step. Returns whether it is
        in use; False (with a warning where compiling failed, e.g. no C++ compiler) leaves the eager step.
        `model.model.compiled_decode = False` turns it off again."""
        if not self.model.fused_decode:
            return False
        self.model.compiled_decode = True
        return precompile(self.model, self.lm_head, progress)

    def step(self, x, attention_mask, position_ids, cache, cache_position) -> torch.Tensor:
        """One token per row over the cache's whole capacity: the function compile_decode compiles."""
        h = self.model(x, attention_mask, position_ids, cache, cache_position, cache.capacity)
        return self.lm_head(h)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad, so checkpointed layers get gradients with a frozen base."""
        self._input_grad_hook = self.model.embed_tokens.register_forward_hook(
            lambda module, args, output: output.requires_grad_(True)
        )

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}.values()
        skip = {id(self.model.embed_tokens.weight)} if exclude_embeddings else set()
        return sum(p.numel() for p in params if (p.requires_grad or not only_trainable) and id(p) not in skip)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        save_model(self, save_directory, **kwargs)
