"""X-MOD run as a decoder (transformers' XmodForCausalLM with `is_decoder=True`): XLM-R's body and head
(models/bert.py's RoBERTa family: positions counted over the non-pad ids from pad_token_id + 1, the `lm_head`)
with a bottleneck adapter per language after every layer's feed-forward.

- each layer's output: dense(intermediate) + the attention's output, then the language adapter: the sum normed by
  `adapter_layer_norm` (where the config has one) or by the output's own LayerNorm (`adapter_reuse_layer_norm`),
  `adapter_modules[language]` (dense1 -> hidden_act -> dense2, hidden_size // adapter_reduction_factor wide) over
  it, plus the residual (the normed sum where `ln_before_adapter`, else the sum); then, post-LN, the LayerNorm;
- `pre_norm`: each sub-block's LayerNorm before it instead (attention: x + dense(attn(LN(x))); feed-forward
  from LN(a), its residual a), and a final `encoder.LayerNorm`;
- the language: config.default_language (set_default_language checks it is one of config.languages), or the
  forward's `lang_ids` (indices into config.languages, one per row (B,) or per token (B, T)), as transformers.
  Without either, transformers raises; autolm raises GenerationError naming default_language. generate() runs
  the default language only: lang_ids given to generate are refused by name (use set_default_language).

`is_decoder=False` runs bidirectionally without a cache and refuses generate, as BERT's; cross-attention weights
load and never run (encoder_hidden_states refused). llama.cpp has no X-MOD: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError, GenerationError
from ..nn import ACTIVATIONS, CheckpointRules, Linear, Rename
from .bert import BertLayer, BertLMHeadModel, BertModel, _rules
from .bert_config import XLMRobertaConfig, _named_init


@dataclass(repr=False)
class XmodConfig(XLMRobertaConfig):
    """transformers' XmodConfig: XLM-R's fields with pre_norm and the language adapters'."""

    model_type: ClassVar[str] = "xmod"
    bool_fields: ClassVar[tuple[str, ...]] = (*XLMRobertaConfig.bool_fields, "pre_norm", "adapter_layer_norm",
                                              "adapter_reuse_layer_norm", "ln_before_adapter")  # fmt: skip

    pre_norm: bool = False
    adapter_reduction_factor: int = 2
    adapter_layer_norm: bool = False
    adapter_reuse_layer_norm: bool = True
    ln_before_adapter: bool = True
    languages: Any = ("en_XX",)
    default_language: str | None = None

    def validate(self) -> None:
        super().validate()
        f = self.adapter_reduction_factor
        if not (_is_int(f) and 0 < f <= self.hidden_size):
            raise ConfigError(f"{self.source}: adapter_reduction_factor must be a positive integer up to "
                              f"hidden_size, found {f!r}")  # fmt: skip
        if not (isinstance(self.languages, (list, tuple)) and self.languages):
            raise ConfigError(f"{self.source}: languages must be a non-empty list, found {self.languages!r}")
        if self.default_language is not None and self.default_language not in self.languages:
            raise ConfigError(f"{self.source}: default_language {self.default_language!r} is not one of "
                              f"languages {list(self.languages)}")  # fmt: skip


_named_init(XmodConfig)


class XmodAdapter(nn.Module):
    def __init__(self, config: XmodConfig):
        super().__init__()
        width = config.hidden_size // config.adapter_reduction_factor
        self.dense1 = Linear(config.hidden_size, width, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dense2 = Linear(width, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.act(self.dense1(x)))


class XmodOutput(nn.Module):
    """dense, LayerNorm, the optional adapter_layer_norm and adapter_modules (one per language). `language`: the
    default language's index (XmodForCausalLM.forward keeps it to config.default_language); `selection`: one
    forward's lang_ids, else None."""

    def __init__(self, config: XmodConfig):
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.adapter_layer_norm:
            self.adapter_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.reuse, self.ln_before = config.adapter_reuse_layer_norm, config.ln_before_adapter
        self.adapter_modules = nn.ModuleDict({str(lang): XmodAdapter(config) for lang in config.languages})
        default = config.default_language
        self.language = None if default is None else list(config.languages).index(default)
        self._selection = None

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' lang_adapter over the sum x (B, T, h)."""
        residual = x
        if hasattr(self, "adapter_layer_norm"):
            x = self.adapter_layer_norm(x)
        elif self.reuse:
            x = self.LayerNorm(x)
        if self.ln_before:
            residual = x
        adapters = list(self.adapter_modules.values())
        if self._selection is None:
            if self.language is None:
                raise GenerationError("Xmod: no lang_ids given and config.default_language is None: call "
                                      "set_default_language() (as transformers asks) or pass lang_ids")  # fmt: skip
            return adapters[self.language](x) + residual
        sel = self._selection.to(x.device)
        sel = sel[:, None, None] if sel.dim() == 1 else sel[..., None]
        out = torch.zeros_like(x)
        for i, adapter in enumerate(adapters):
            out = torch.where(sel == i, adapter(x), out)
        return out + residual


class XmodLayer(BertLayer):
    """BERT's layer with X-MOD's output (the language adapter) and, where pre_norm, the norms before."""

    def __init__(self, config: XmodConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.output = XmodOutput(config)
        self.pre_norm = config.pre_norm

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        att = self.attention
        if self.pre_norm:
            a = x + att.output.dense(att.self(att.output.LayerNorm(x), ctx))
            y = self.output.dense(self.intermediate(self.output.LayerNorm(a))) + a
            return self.output.adapt(y)
        a = att(x, ctx)
        return self.output.LayerNorm(self.output.adapt(self.output.dense(self.intermediate(a)) + a))


class XmodModel(BertModel):
    """XLM-R's body with X-MOD's layers and, where pre_norm, the final `norm` (encoder.LayerNorm)."""

    def __init__(self, config: XmodConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(XmodLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps) if config.pre_norm else None

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm is None else self.norm(x)


def _xmod_rules(tied: bool) -> CheckpointRules:
    return CheckpointRules([
        *_rules("roberta", "lm_head", tied).rules,
        Rename(r"^roberta\.encoder\.LayerNorm\.", "model.norm.", r"^model\.norm\.", "roberta.encoder.LayerNorm."),
    ])  # fmt: skip


class XmodForCausalLM(BertLMHeadModel):
    """transformers' XmodForCausalLM."""

    config_class = XmodConfig
    hf_prefix: ClassVar[str] = "roberta"
    hf_head: ClassVar[str] = "lm_head"
    checkpoint_rules = _xmod_rules(True)
    _no_split_modules: ClassVar[list[str]] = ["XmodLayer"]

    def __init__(self, config: XmodConfig):
        super().__init__(config)
        self.model = XmodModel(config)
        self._modules = {k: self._modules[k] for k in ("model", "head", "lm_head")}
        if not config.tie_word_embeddings:
            self.checkpoint_rules = _xmod_rules(False)

    def set_default_language(self, language: str) -> None:
        """transformers' set_default_language: the adapters used where no lang_ids are given."""
        if language not in self.config.languages:
            raise ConfigError(f"{type(self).__name__} does not have an adapter for {language!r}; its languages "
                              f"(config.languages): {list(self.config.languages)}")  # fmt: skip
        self.config.default_language = language
        self._sync_language()

    def forward(self, *args, lang_ids=None, **kwargs):
        """BertLMHeadModel's forward with the language adapters of `lang_ids` (B,) or (B, T), else of
        config.default_language."""
        self._sync_language()
        outputs = [layer.output for layer in self.model.layers]
        if lang_ids is not None:
            lang_ids = torch.as_tensor(lang_ids)
            if lang_ids.dim() not in (1, 2):
                raise GenerationError(
                    f"lang_ids must be (batch,) or (batch, length), got {tuple(lang_ids.shape)}"
                )
        for out in outputs:
            out._selection = lang_ids
        try:
            return super().forward(*args, **kwargs)
        finally:
            for out in outputs:
                out._selection = None

    def generate(self, *args, **kwargs):
        """BertLMHeadModel's; the default language only (lang_ids refused by name)."""
        if kwargs.get("lang_ids") is not None:
            raise GenerationError(f"{type(self).__name__}.generate: lang_ids are not supported here; autolm "
                                  "generates in config.default_language: call set_default_language() first")  # fmt: skip
        kwargs.pop("lang_ids", None)
        self._sync_language()
        return super().generate(*args, **kwargs)

    def _sync_language(self) -> None:
        """Each layer's adapter index from config.default_language (which users may set directly)."""
        default = self.config.default_language
        index = (
            None
            if default is None or default not in self.config.languages
            else (list(self.config.languages).index(default))
        )
        for layer in self.model.layers:
            layer.output.language = index
