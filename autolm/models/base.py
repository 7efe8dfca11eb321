"""What every causal LM shares, so a family file holds only its architecture.

`DecoderModel` is the body (embeddings -> decoder layers -> final norm) and `CausalLM` the model with its LM head:
transformers' forward and generate, the KV cache, placement blocks, the tensor-parallel plan, resizing, saving.
A family subclasses them with its config, its decoder layer (`layer(x, ctx) -> x`, built from autolm.nn), and
where it differs: how inputs are embedded (`DecoderModel.embed`), how logits are finished
(`CausalLM.finish_logits`), how its checkpoint names tensors (`checkpoint_rules`) and how tensor parallelism
splits it (`tp_patterns`). The fast decode steps (autolm.step) are derived from these same modules.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any, ClassVar

import torch
from torch import nn

from ..generation import GenerationMixin
from ..nn import Forward, KVCache, Linear, OneToken, Rotary, default_positions, embedding, resized_rows
from ..nn.checkpoint import CheckpointRules, GGUFLayout
from ..saving import save_model, unique_state_dict
from ..step import compiled_step, precompile
from .image_text import IMAGE_TEXT_RULES, prompt_blocks, refuse_media
from .interop import TransformersSurface, device_map_of
from .output import CausalLMOutput, causal_lm_loss

# transformers' base_model_tp_plan for Llama-shaped layers: q/k/v/gate/up split by output features, o/down by input.
LLAMA_TP = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}


class DecoderModel(nn.Module):
    """Embeddings, `layer_cls(config, i)` for each layer, a final norm; RoPE tables for the layers' attention.
    A family whose body names these modules otherwise (transformers' `wte`, `h`, `ln_f`, ...) maps autolm's names
    to its own in `_ALIASES`: they read and assign the family's modules."""

    _ALIASES: ClassVar[dict[str, str]] = {}  # autolm's name -> the family's module name

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for alias, name in cls.__dict__.get("_ALIASES", {}).items():
            setattr(cls, alias, property(lambda self, name=name: getattr(self, name)))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(self._ALIASES.get(name, name), value)

    def __init__(self, config, layer_cls: type[nn.Module], norm: nn.Module):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm
        self.gradient_checkpointing = False
        self.rotary = Rotary(config.rope_kinds(), config.head_dim, config.max_position_embeddings,
                             getattr(config, "partial_rotary_default", False))  # fmt: skip

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> input vectors (B, T, h)."""
        return self.embed_tokens(input_ids)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """What the body does to input vectors (embedded or given) before the first layer: nothing here;
        families scale them (Gemma, Granite) or add position embeddings (GPT-2)."""
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def shown(self, x: torch.Tensor) -> torch.Tensor:
        """A layer's input as hidden_states gives it (transformers' shape for it): as it is here."""
        return x

    def run(
        self, x: torch.Tensor, ctx: Forward | OneToken, hidden_states: list | None = None
    ) -> torch.Tensor:
        """The decoder layers and the final norm over input vectors x (B, T, h) in a forward context; each
        layer's input (and the output) are appended to `hidden_states` when given."""
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(self.shown(x))
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        x = self.final_norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

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
        block_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: input vectors (B, T, h). The new tokens sit at cache_position (T,) among kv_length key slots;
        attention_mask (B, >= kv_length) marks real tokens, or is None (block_ids: Forward's). Normed states out."""
        x = self.scale_inputs(x, position_ids)
        rope = self.rotary.slot_tables(position_ids, cache_position, x.dtype)
        ctx = Forward(rope, cache, cache_position, kv_length, attention_mask, len(x), attentions, block_ids)
        return self.run(x, ctx, hidden_states)


class CausalLM(TransformersSurface, nn.Module, GenerationMixin):
    """A decoder with an LM head; `forward` and `generate` follow transformers' signatures."""

    config_class: ClassVar[type]
    # image-text checkpoints' language model names (models.image_text); a family with rules of its own adds them
    checkpoint_rules: ClassVar[CheckpointRules] = CheckpointRules(IMAGE_TEXT_RULES)
    gguf: ClassVar[GGUFLayout | None] = None  # how llama.cpp writes this family, where it does
    # the further llama.cpp architectures the family's files come in (Nemotron-H's MoE layout, "nemotron_h_moe"):
    # read by their architecture; written where an instance's `gguf` is one (a model of that layout)
    gguf_more: ClassVar[tuple[GGUFLayout, ...]] = ()
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP
    # the config's counts tensor parallelism must divide by the number of ranks (a family that runs its attention
    # whole on every rank names its MLP's alone)
    tp_divides: ClassVar[tuple] = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    _no_split_modules: ClassVar[list[str]] = []
    base_model_prefix: ClassVar[str] = "model"  # the body's attribute (GPT-2: "transformer", with a `model`
    # property returning it: autolm's code reaches the body as `self.model` in every family)
    layers_prefix: ClassVar[str] = "model.layers"  # the decoder layers' module name (GPT-2: transformer.h)
    embeddings_name: ClassVar[str] = "model.embed_tokens"  # the token embeddings' module name
    # whether the layers form a plain stack that autolm.step's one-token steps may run (False: the general
    # forward decodes every token)
    one_token_step: ClassVar[bool] = True
    # whether some layers keep a recurrent state in the cache (which cannot go back a token: speculative decoding
    # goes back to a mark of the cache; prefix reuse only from a whole earlier prompt's snapshot)
    recurrent: ClassVar[bool] = False
    # quantized by autolm (int4 / int8: set on the loaded model), where transformers' users look for bitsandbytes
    is_quantized: ClassVar[bool] = False
    is_loaded_in_4bit: ClassVar[bool] = False
    is_loaded_in_8bit: ClassVar[bool] = False

    def __init__(self, config, model: DecoderModel):
        super().__init__()
        self.config = config
        setattr(self, self.base_model_prefix, model)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = None
        self.load_report = None
        self._no_split_modules = set(
            type(self)._no_split_modules
        )  # a set on the instance, as transformers 5's
        self.decode_step = None  # a torch.compile'd one-token step (autolm.compile_decode), else None
        # how generation decodes (autolm.step): "auto" (the one-token step, compiled where cached), "eager"
        # (never compiled graphs) or "forward" (the general forward for every token)
        self.decode_mode = "auto"
        # the KV cache's dtype; None: the model's (a GGUF model kept in its blocks: float16, llama.cpp's cache)
        self.kv_cache_dtype: torch.dtype | None = None

    # ---- structure: what loading, placement, tensor parallelism and generation ask of the model ----

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(
            self.lm_head, nn.Linear
        ):  # a quantized head is a copy
            self.lm_head.weight = self.model.embed_tokens.weight

    def blocks(self) -> list[str]:
        """Placement units in forward order (the body's modules in the order they were made, each decoder layer
        on its own, then the head): never split across devices."""
        body = self.layers_prefix.rpartition(".")[0]
        out = []
        for name, m in self.model.named_children():
            if m is self.model.layers:
                out += [f"{self.layers_prefix}.{i}" for i in range(len(m))]
            elif any(True for _ in m.parameters()):
                out.append(f"{body}.{name}")
        return [*out, "lm_head"]

    def tp_plan(self) -> dict[str, str]:
        """{module: 'colwise' | 'rowwise' | 'embedding' | 'lm_head'}: how tensor parallelism splits each Linear
        (the family's patterns over the body's module names; untied embeddings and head by vocabulary)."""
        plan = {}
        if not self.config.tie_word_embeddings:
            plan.update({self.embeddings_name: "embedding", "lm_head": "lm_head"})
        body = self.layers_prefix.rpartition(".")[0]
        for name, _ in self.model.named_modules():
            style = next((s for p, s in self.tp_patterns.items() if fnmatch.fnmatchcase(name, p)), None)
            if style is not None:
                plan[f"{body}.{name}"] = style
        return plan

    def shard_heads(self, world: int) -> None:
        """Under tensor parallelism each rank computes num_heads / world of the heads."""
        for m in self.modules():
            if hasattr(m, "num_kv_heads") and hasattr(m, "num_heads"):
                m.num_heads //= world
                m.num_kv_heads //= world

    def layer_devices(self) -> list[torch.device]:
        """Where each decoder layer computes (disk-offloaded layers compute on the CPU)."""
        device_map = device_map_of(self)
        if device_map:
            return [
                torch.device("cpu" if d == "disk" else d)
                for d in (device_map[f"{self.layers_prefix}.{i}"] for i in range(len(self.model.layers)))
            ]
        return [self.model.embed_tokens.weight.device] * len(self.model.layers)

    def attention_shapes(self) -> list[tuple[int, int]]:
        """Per decoder layer, (KV heads on this rank, head dim) of its attention; (1, 0) for a layer without one
        (a recurrent layer: its state is kept beside the cache's zero-wide buffers)."""
        shapes = []
        for layer in self.model.layers:
            attn = next((m for m in layer.modules() if hasattr(m, "num_kv_heads")), None)
            shapes.append((1, 0) if attn is None else (attn.num_kv_heads, attn.head_dim))
        return shapes

    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: `kv_cache_dtype` where set, else the model's (float32 for integer weights)."""
        if self.kv_cache_dtype is not None:
            return self.kv_cache_dtype
        w = self.model.embed_tokens.weight
        return w.dtype if w.dtype.is_floating_point else torch.float32

    def make_cache(self, batch_size: int, capacity: int) -> KVCache:
        """A KV cache for this model (cache_dtype(), this rank's KV heads, each layer's device). With a compiled
        decode step the capacity rounds up to a multiple of 256 (one graph serves many lengths) and the
        buffers get static addresses."""
        static = self.decode_step is not None
        if static:
            capacity = -(-capacity // 256) * 256
        shapes, devices = self.attention_shapes(), self.layer_devices()
        return KVCache.of_shapes(batch_size, shapes, capacity, self.cache_dtype(), devices, static)

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
            new_emb = copy.copy(emb)  # the family's embedding class and settings (Gemma's scale) stay
            new_emb._parameters = dict(emb._parameters)
            new_emb.weight = nn.Parameter(resized_rows(emb.weight, n, mean_resizing, std),
                                          requires_grad=emb.weight.requires_grad)  # fmt: skip
            new_emb.num_embeddings = n
            self.model.embed_tokens = new_emb
            if not self.config.tie_word_embeddings and self.lm_head is not None:
                head = self.lm_head
                new_head = Linear(
                    head.in_features, n, bias=False, device=head.weight.device, dtype=head.weight.dtype
                )
                new_head.weight = nn.Parameter(resized_rows(head.weight, n, mean_resizing, std),
                                               requires_grad=head.weight.requires_grad)  # fmt: skip
                self.lm_head = new_head
        self.config.vocab_size = n
        self.tie_weights()
        return new_emb

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' device (under a device_map, where the embeddings run)."""
        if device_map_of(self):
            d = device_map_of(self)[self.embeddings_name]
            return torch.device("cpu" if d == "disk" else d)
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ---- running ---------------------------------------------------------------------------------

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family does to the LM head's output (Gemma's soft-capping, Granite's scaling): nothing here."""
        return logits

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden states -> logits."""
        return self.finish_logits(self.lm_head(h))

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
        refuse_media(self, unused)
        h, cache, hidden, attentions = self.decoder_states(input_ids, attention_mask, position_ids, past_key_values,
                                                           inputs_embeds, use_cache, cache_position,
                                                           output_hidden_states, output_attentions, unused.get("token_type_ids"))  # fmt: skip
        logits = self.logits(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = (
            causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)
            if labels is not None
            else None
        )
        out = CausalLMOutput(loss, logits, cache, hidden, attentions)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def decoder_states(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                       cache_position, output_hidden_states, output_attentions, token_type_ids=None):  # fmt: skip
        """The body's part of forward: (normed hidden states (B, T, h), the cache when kept, every layer's input
        and attention weights when asked, by argument or by config.output_hidden_states / output_attentions)."""
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        cache = self.forward_cache(past_key_values, use_cache, B, T)
        past = cache.length if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + T, device=x.device)
        end = past + T if attention_mask is None else max(attention_mask.shape[-1], past + T)
        if position_ids is None:
            position_ids = default_positions(attention_mask, cache_position, B)
        if cache is not None:
            cache.reserve(end)
            cache.prefill = past + T if cache.prefill is None else cache.prefill  # reference windows' prompt
        cfg = self.config
        hidden, attentions = self.layer_lists(output_hidden_states, output_attentions)
        ids = prompt_blocks(cfg, token_type_ids, attention_mask, past, (B, T), end)  # a prefix: block_ids
        h = self.model(x, attention_mask, position_ids, cache, cache_position, end, hidden, attentions, **ids)
        if cache is not None:
            cache.length = max(cache.length, end)
        hidden, attentions = (tuple(a) if a is not None else None for a in (hidden, attentions))
        return h, cache, hidden, attentions

    def forward_cache(self, past_key_values, use_cache, B: int, T: int):
        """The cache a forward over B rows of T new tokens writes and returns: the one given (grown where needed),
        else a new one where use_cache asks (None: config.use_cache outside training), else None."""
        if past_key_values is not None:
            past_key_values.ensure_for(self, B, T)
            return past_key_values
        keep = self.config.use_cache and not self.training if use_cache is None else use_cache
        return self.make_cache(B, T) if keep else None

    def layer_lists(self, output_hidden_states, output_attentions) -> tuple[list | None, list | None]:
        """Lists for every layer's input and attention weights where asked (by argument, else by config)."""
        cfg = self.config
        hidden = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        attentions = cfg.output_attentions if output_attentions is None else output_attentions
        return ([] if hidden else None), ([] if attentions else None)

    def precompile_decode(self, progress: bool = False, batched: bool = False) -> bool:
        """Compile the CPU one-token step (batch 1, see autolm.step) ahead of time with AOTInductor: a few graphs
        per model shape, dtype and quantization, cached in $AUTOLM_HOME/compiled, so only the first run on a
        machine waits (tens of seconds; `progress` shows a bar) and later processes load them in milliseconds.
        generate() then uses the compiled step; it also picks up packages compiled earlier by any process.
        Returns whether the step is available; False (with a warning where compiling failed, e.g. no C++
        compiler) leaves the eager step. `batched`: also the graphs for decoding several rows at once (a padded
        batch, the server)."""
        return precompile(self, progress, batched)

    def step(self, x, attention_mask, position_ids, cache, cache_position) -> torch.Tensor:
        """One token per row over the cache's whole capacity: the function compile_decode compiles."""
        return compiled_step(self, x, attention_mask, position_ids, cache, cache_position)

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs) -> None:
        """Weights in the checkpoint's own names and layout (see checkpoint_rules), config, generation config; with
        adapters loaded through load_adapter / add_adapter, the active adapter in peft's format (as transformers)."""
        if self._hf_peft_config_loaded:
            return self.save_adapter(save_directory, kwargs.get("safe_serialization", True))
        sd = unique_state_dict(self) if state_dict is None else state_dict
        save_model(self, save_directory, state_dict=self.checkpoint_rules.to_checkpoint(sd), **kwargs)
