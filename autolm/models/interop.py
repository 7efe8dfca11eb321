"""What the ecosystem calls on a model besides forward and generate: transformers' `model.base_model` (the body,
called with token ids as transformers' LlamaModel is: TRL's fused LM head runs it, then projects the hidden states
itself), `main_input_name`, and transformers' PEFT integration (`model.load_adapter`, ...: autolm.lora.integration)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..lora.integration import PeftAdapterMixin
from .output import ModelOutput

# autolm.load's from_pretrained, registered by autolm.load as it is imported (the load path builds the models, so
# it sits above them): what Family.from_pretrained calls
loader = None


@dataclass
class BaseModelOutput(ModelOutput):
    """transformers' BaseModelOutputWithPast."""

    last_hidden_state: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Backbone:
    """`model.base_model`: the body (embeddings, decoder layers, final norm) called as transformers' base model is,
    with input_ids or inputs_embeds, returning its normed hidden states; its other attributes are the body's."""

    __slots__ = ("_lm",)

    def __init__(self, lm):
        object.__setattr__(self, "_lm", lm)

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.Tensor | None = None,
        **unused,
    ):
        lm = self._lm
        h, cache, hidden, attentions = lm.decoder_states(input_ids, attention_mask, position_ids, past_key_values,
                                                         inputs_embeds, use_cache, cache_position,
                                                         output_hidden_states, output_attentions)  # fmt: skip
        out = BaseModelOutput(h, cache, hidden, attentions)
        keep_dict = lm.config.return_dict if return_dict is None else return_dict
        return out if keep_dict else out.to_tuple()

    forward = __call__

    def __getattr__(self, name: str):
        return getattr(self._lm.model, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._lm.model, name, value)

    def __repr__(self) -> str:
        return repr(self._lm.model)


def device_map_of(model) -> dict[str, str] | None:
    """The model's `hf_device_map`: set (by placement) only under a device_map, as transformers sets it, since
    accelerate and Trainer take its presence to mean the model is spread over devices."""
    return getattr(model, "hf_device_map", None)


class TransformersSurface(PeftAdapterMixin):
    """transformers' PreTrainedModel attributes that trainers and integrations read from a causal LM."""

    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # transformers' name for the loss forward computes: Trainer then counts the labels a causal LM predicts
    # (labels[..., 1:]) when it normalises the loss over a batch (num_items_in_batch)
    loss_type = "ForCausalLM"

    model_tags: list[str] | None = None

    @property
    def base_model(self) -> Backbone:
        return Backbone(self)

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

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers), as transformers counts them."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.nelement() * t.element_size() for t in tensors)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers 5's name for gradient_checkpointing_enable (what Trainer calls): every decoder layer is
        recomputed in the backward pass (non-reentrant checkpointing, which gives the reentrant one's gradients)."""
        if every_n_layers != 1 or offload:
            raise ConfigError(
                f"activation checkpointing with every_n_layers={every_n_layers}, offload={offload}: autolm "
                "checkpoints every layer on its own device (every_n_layers=1, offload=False)"
            )
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `LlamaForCausalLM.from_pretrained(...)`: autolm's load path (AutoModelForCausalLM's
        arguments), for a checkpoint of this family; another family's is refused by name."""
        if loader is None:
            raise ConfigError(f"{cls.__name__}.from_pretrained needs autolm's load path: import autolm.load first "
                              f"(`from autolm import {cls.__name__}` does)")  # fmt: skip
        model = loader(pretrained_model_name_or_path, *args, **kwargs)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not isinstance(base, cls):
            raise ConfigError(f"{pretrained_model_name_or_path}: a {type(base).__name__} checkpoint (model_type "
                              f"{base.config.model_type!r}), not a {cls.__name__} one: load it with "
                              f"AutoModelForCausalLM")  # fmt: skip
        return model

    def get_decoder(self):
        """The body (embeddings, decoder layers, final norm) called as transformers' LlamaModel: base_model."""
        return self.base_model

    def set_decoder(self, decoder) -> None:
        setattr(self, self.base_model_prefix, decoder)

    def set_input_embeddings(self, value) -> None:
        self.model.embed_tokens = value

    def set_output_embeddings(self, value) -> None:
        self.lm_head = value

    def disable_input_require_grads(self) -> None:
        """Undo enable_input_require_grads."""
        hook = getattr(self, "_input_grad_hook", None)
        if hook is not None:
            hook.remove()
            self._input_grad_hook = None

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """transformers 5's switch between attention implementations: recorded (autolm's attention is the same)."""
        if attn_implementation not in ("eager", "sdpa"):
            raise ConfigError(
                f"attn_implementation={attn_implementation!r} is not available: pass 'sdpa' or 'eager'"
            )
        self.config._attn_implementation = attn_implementation

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags a trainer gives the model (transformers writes them into the Hub model card), in model_tags."""
        tags = [tags] if isinstance(tags, str) else list(tags)
        self.model_tags = list(dict.fromkeys([*(self.model_tags or []), *tags]))
