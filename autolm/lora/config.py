"""peft's LoraConfig (the fields LoRA on Linear layers uses) and TaskType."""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._util import read_json
from ..errors import AdapterError

CONFIG_NAME = "adapter_config.json"
# The rest of the keys peft writes into adapter_config.json, with peft's defaults (autolm does not use them).
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "revision": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # peft's default for llama, mistral, qwen2, qwen3
# peft's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) where they are not DEFAULT_TARGETS; None
# where peft has none for the type (it then refuses a LoraConfig without target_modules)
MODEL_TYPE_TARGETS: dict[str, list[str] | None] = {
    "gpt2": ["c_attn"],
    **dict.fromkeys(("phi3", "olmo2", "granite", "smollm3"), None),
}


def default_targets(model_type: str | None) -> list[str]:
    """The target modules peft picks for a model type when a LoraConfig names none; AdapterError where peft has
    none for the type."""
    targets = MODEL_TYPE_TARGETS.get(model_type, DEFAULT_TARGETS)
    if targets is None:
        raise AdapterError(
            f"LoraConfig: peft has no default target_modules for model_type {model_type!r}: name the Linear "
            "layers to adapt (e.g. target_modules=['qkv_proj', 'o_proj'] for phi3, ['q_proj', 'v_proj'] for the "
            "others) or 'all-linear'"
        )
    return list(targets)


class TaskType(str, enum.Enum):
    """peft's task types; autolm's models are causal LMs."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoraConfig:
    """peft's LoraConfig fields and defaults (the ones LoRA on Linear layers uses)."""

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int] = field(default_factory=dict)
    use_dora: bool = False
    task_type: str | None = "CAUSAL_LM"
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 0 < self.r <= 65536:
            raise AdapterError(f"LoraConfig: r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise AdapterError(f"LoraConfig: lora_alpha must be a number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise AdapterError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        t = self.target_modules
        if (
            t is not None
            and not isinstance(t, str)
            and not (isinstance(t, list) and all(isinstance(x, str) for x in t))
        ):
            raise AdapterError(f"LoraConfig: target_modules must be a string or a list of strings, got {t!r}")

        def strings(v, single_ok=True):
            return (
                v is None
                or (single_ok and isinstance(v, str))
                or (isinstance(v, list) and all(isinstance(x, str) and x for x in v))
            )

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e30

        checks = [
            ("lora_alpha", number(self.lora_alpha), "a finite number"),
            ("exclude_modules", strings(self.exclude_modules), "a string or a list of strings"),
            ("modules_to_save", strings(self.modules_to_save, single_ok=False), "a list of module names"),
            ("layers_pattern", strings(self.layers_pattern), "a string or a list of strings"),
            (
                "layers_to_transform",
                self.layers_to_transform is None
                or (
                    isinstance(self.layers_to_transform, int)
                    and not isinstance(self.layers_to_transform, bool)
                )
                or (
                    isinstance(self.layers_to_transform, list)
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers_to_transform)
                ),
                "an integer or a list of integers",
            ),
            (
                "rank_pattern",
                isinstance(self.rank_pattern, dict)
                and all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65536
                    for v in self.rank_pattern.values()
                ),
                "an object of positive integer ranks",
            ),
            (
                "alpha_pattern",
                isinstance(self.alpha_pattern, dict) and all(number(v) for v in self.alpha_pattern.values()),
                "an object of numbers",
            ),
            (
                "init_lora_weights",
                isinstance(self.init_lora_weights, (bool, str)),
                "true, false or a method name",
            ),
            ("task_type", self.task_type is None or isinstance(self.task_type, str), "a task type name"),
            (
                "base_model_name_or_path",
                self.base_model_name_or_path is None or isinstance(self.base_model_name_or_path, str),
                "a path or repo id",
            ),
        ] + [
            (k, isinstance(getattr(self, k), bool), "true or false")
            for k in ("use_rslora", "fan_in_fan_out", "inference_mode", "use_dora")
        ]
        for name, ok, expected in checks:
            if not ok:
                raise AdapterError(f"LoraConfig: {name} must be {expected}, got {getattr(self, name)!r}")
        for pattern in [
            *(self.rank_pattern or {}),
            *(self.alpha_pattern or {}),
            *([t] if isinstance(t, str) else []),
            *([self.exclude_modules] if isinstance(self.exclude_modules, str) else []),
        ]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterError(
                    f"LoraConfig: {pattern!r} is not a valid regular expression ({e})"
                ) from None
        if self.bias not in ("none", "all", "lora_only"):
            raise AdapterError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.use_dora:
            raise AdapterError("LoraConfig: use_dora=True (DoRA) is not supported by autolm yet")
        if self.peft_type != "LORA":
            raise AdapterError(f"adapter type {self.peft_type!r} is not supported (only LORA)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names}
        )

    @classmethod
    def from_pretrained(cls, directory: str) -> LoraConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise AdapterError(f"{directory}: no {CONFIG_NAME} (not a peft adapter directory)")
        try:
            return cls.from_dict(read_json(path, AdapterError))
        except TypeError as e:
            raise AdapterError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = {**PEFT_DEFAULTS, **self.extra}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return d

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """r and alpha for a module, honouring rank_pattern / alpha_pattern (peft's matching)."""
        r = next((v for p, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.r)
        a = next(
            (v for p, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.lora_alpha
        )
        return r, a

    def matches(self, key: str, module: nn.Module) -> bool:
        """peft's target rule: regex string (full match), exact name or suffix, or 'all-linear'."""
        if not isinstance(module, nn.Linear):
            return False
        if self.exclude_modules:
            ex = self.exclude_modules
            if (
                re.fullmatch(ex, key)
                if isinstance(ex, str)
                else key in ex or any(key.endswith(f".{e}") for e in ex)
            ):
                return False
        targets = self.target_modules if self.target_modules is not None else DEFAULT_TARGETS
        if isinstance(targets, str):
            if targets.lower() == "all-linear":
                found = key.split(".")[-1] != "lm_head"
            else:
                found = re.fullmatch(targets, key) is not None
        else:
            found = key in targets or any(key.endswith(f".{t}") for t in targets)
        if found and self.layers_to_transform is not None:
            # peft's rule: the first numbered name part (model.layers.3, transformer.h.3), or after layers_pattern
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            if patterns:
                m = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key) for p in patterns)), None)
            else:
                m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
            wanted = (
                [self.layers_to_transform]
                if isinstance(self.layers_to_transform, int)
                else self.layers_to_transform
            )
            found = m is not None and int(m.group(1)) in wanted
        return found
