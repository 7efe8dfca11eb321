"""peft's LoraConfig (the fields LoRA on Linear layers uses) and TaskType."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._util import atomic_write_text, read_json
from ..errors import AdapterError
from ..hub import resolve_model_dir
from ..nn.ggml import GGMLLinear
from ..quant import Int4Linear, Int8Linear

# the layers LoRA adapts: nn.Linear (autolm's Linear, transformers' Conv1D) and the quantized linear layers, whose
# weights stay as they are while training (QLoRA: gradients reach the input through the dequantized weight);
# merging quantizes an int8 / int4 / GGUF-block layer's merged weight again (to its own type)
LINEAR = (nn.Linear, Int8Linear, Int4Linear, GGMLLinear)
# the heads peft trains with a SEQ_CLS / TOKEN_CLS / QUESTION_ANS adapter (its modules_to_save), by task type
HEAD_NAMES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

# the model types peft has no default LoRA targets for (it then refuses a LoraConfig without target_modules)
NO_PEFT_DEFAULT = """
phi3 olmo2 granite smollm3 qwen2_moe qwen3_moe gpt_oss starcoder2 olmo granitemoe cohere olmoe glm4 olmo3
exaone4 ernie4_5 nemotron arcee glm4_moe dots1 deepseek_v3 ernie4_5_moe seed_oss hunyuan_v1_dense deepseek_v2
glm4_moe_lite ministral ministral3 apertus helium nanochat exaone_moe hunyuan_v1_moe minimax_m2 minicpm3
granitemoe_swa granitemoeshared vaultgemma granite_swa internlm3 bitnet gemma3n_text mamba2 glm cohere2_moe
cohere2 jamba falcon_mamba mamba falcon_h1 qwen3_5_moe_text qwen3_5_text qwen3_next granitemoehybrid lfm2_moe
lfm2 dbrx phimoe afmoe gemma4_text llama4_text jais2 cwm solar_open youtu hyperclovax bamba flex_olmo hy_v3 mimo_v2_flash
lfm3 laguna step3p5 mellum olmo_hybrid iquestcoder kolibri1 flint axk1 axk2 beam cohere_compass_text qwen4_exp_text hunyuan_vl_text
ernie4_5_vl_moe_text
diffllama jetmoe zamba2 minimax zamba deepseek_v32 glm_moe_dsa dots3_note_text dots3_note longcat_flash mistral4 kimi_linear hy_v4 deepseek_v4 bailing_hybrid
minimax_m3_vl_text glm5_next_text glm5_next hrm_text gemma4_unified_text zaya recurrent_gemma persimmon xglm biogpt openai-gpt ctrl doge
inkling_text inkling2_text xlstm modernbert-decoder mllama_text_model emu3_text_model chameleon aria_text gpt_neox_japanese blt cpmant muse_glimmer_text
deepseek_ocr2_text unlimited_ocr_text molmo2_text mistral_large4_text mistral_large4
muse_glimmer muse_spark_text muse_spark
paddleocr_vl_text cosmos3_edge_text idefics
kosmos_2_text_model kosmos_2_5_text_model
mbart marian pegasus blenderbot blenderbot-small plbart mvp trocr whisper bigbird_pegasus prophetnet reformer
camembert data2vec-text ernie
roformer rembert xmod big_bird roc_bert
roberta-prelayernorm xlm-roberta-xl megatron-bert bert-generation
xlm xlnet
moshi musicgen_decoder musicgen_melody_decoder musicgen musicgen_melody
""".split()  # noqa: SIM905 - names, kept compact

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
# Those of them that switch on a peft feature autolm does not implement: a config that sets one is refused by name
# (training or loading without it would silently give another model).
UNIMPLEMENTED = ("alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication", "lora_ga_config",
                 "monteclora_config", "target_parameters", "use_bdlora", "use_qalora",
                 "velora_config")  # fmt: skip
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # peft's default for llama, mistral, qwen2, qwen3
# peft's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) where they are not DEFAULT_TARGETS; None
# where peft has none for the type (it then refuses a LoraConfig without target_modules)
MODEL_TYPE_TARGETS: dict[str, list[str] | None] = {
    "gpt2": ["c_attn"],
    "gpt-sw3": ["c_attn"],  # transformers reads it as GPT2Config: peft sees model_type "gpt2"
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "mpt": ["Wqkv"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "codegen": ["qkv_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    **dict.fromkeys(NO_PEFT_DEFAULT, None),
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


def _strings(v: Any, single_ok: bool = True) -> bool:
    return (
        v is None
        or (single_ok and isinstance(v, str))
        or (isinstance(v, list) and all(isinstance(x, str) and x for x in v))
    )


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e30


def _token_indices(v: Any) -> bool:
    """A list of token ids, or {layer name: list of token ids} (trainable_token_indices)."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _token_indices(x) and not isinstance(x, dict) for k, x in v.items())
    return isinstance(v, list) and all(_int(x) and x >= 0 for x in v)


def _rank(v: Any) -> bool:
    return _int(v) and 0 < v <= 65536


# field -> (check, what it must be): each LoraConfig field autolm reads, checked as it is read from a file
_CHECKS: dict[str, tuple[Any, str]] = {
    "r": (_rank, "a positive integer (at most 65536)"),
    "lora_alpha": (_number, "a finite number"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (_strings, "a string or a list of strings"),
    "exclude_modules": (_strings, "a string or a list of strings"),
    "modules_to_save": (lambda v: _strings(v, single_ok=False), "a list of module names"),
    "layers_pattern": (_strings, "a string or a list of strings"),
    "layers_to_transform": (
        lambda v: v is None or _int(v) or (isinstance(v, list) and all(_int(x) for x in v)),
        "an integer or a list of integers",
    ),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(_rank(x) for x in v.values()),
        "an object of positive integer ranks",
    ),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(_number(x) for x in v.values()), "an object of numbers"),
    "init_lora_weights": (
        lambda v: isinstance(v, bool) or v in ("default", "gaussian", "pissa", "olora")
        or (isinstance(v, str) and re.fullmatch(r"pissa_niter_\d+", v) is not None),
        "true, false, 'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora' (autolm has no eva, corda, loftq or "
        "orthogonal initialisation)",
    ),
    "task_type": (lambda v: v is None or isinstance(v, str), "a task type name"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a path or repo id"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    **{k: (lambda v: isinstance(v, bool), "true or false")
       for k in ("use_rslora", "fan_in_fan_out", "inference_mode", "use_dora", "lora_bias")},
}  # fmt: skip


class PeftConfig:
    """peft's PeftConfig: `PeftConfig.from_pretrained(adapter)` reads adapter_config.json into the config class of
    its peft_type (LoraConfig: the only adapter type autolm runs)."""

    peft_type: str
    base_model_name_or_path: str | None
    task_type: str | None
    inference_mode: bool

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub: Any) -> LoraConfig:
        """adapter_config.json of a folder or repo id (with the hub's revision, subfolder, ...)."""
        directory = resolve_model_dir(os.fspath(pretrained_model_name_or_path), **hub)
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise AdapterError(f"{directory}: no {CONFIG_NAME} (not a peft adapter directory)")
        try:
            return LoraConfig.from_dict(read_json(path, AdapterError))
        except TypeError as e:
            raise AdapterError(f"{path}: {e}") from None

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:
        """Write adapter_config.json."""
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps({**self.to_dict(), "inference_mode": self.inference_mode}, indent=2, sort_keys=True)
        atomic_write_text(os.path.join(os.fspath(save_directory), CONFIG_NAME), text)


def _takes_peft_keys(cls):
    """LoraConfig(...) also takes peft's other keys (PEFT_DEFAULTS), kept in `extra` as from adapter_config.json: the
    harmless ones round-trip, the ones that switch on a feature autolm lacks are refused by name (UNIMPLEMENTED)."""
    init = cls.__init__

    def __init__(self, *args, extra: dict[str, Any] | None = None, **kwargs):
        more = {k: kwargs.pop(k) for k in list(kwargs) if k in PEFT_DEFAULTS}
        init(self, *args, extra={**(extra or {}), **more}, **kwargs)

    __init__.__doc__, __init__.__signature__ = init.__doc__, inspect.signature(init)
    cls.__init__ = __init__
    return cls


@_takes_peft_keys
@dataclass
class LoraConfig(PeftConfig):
    """peft's LoraConfig fields and defaults (the ones LoRA on Linear layers uses); peft's other keys go to
    `extra`."""

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
    lora_bias: bool = False  # a bias in lora_B, scaled with it (merging adds it to the base layer's bias)
    task_type: str | None = None  # peft's default (its PeftModel, no pipeline in the card)
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Normalise peft's accepted spellings (a set of targets, a TaskType) and check every field, naming it."""
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.peft_type != "LORA":
            raise AdapterError(f"adapter type {self.peft_type!r} is not supported (only LORA)")
        used = [
            k for k in UNIMPLEMENTED if self.extra.get(k, PEFT_DEFAULTS[k])
        ]  # set: not None, False or empty
        if used:
            raise AdapterError(f"LoraConfig: {', '.join(used)} is a peft feature autolm does not implement "
                               f"(got {', '.join(repr(self.extra[k]) for k in used)})")  # fmt: skip
        for name, (check, expected) in _CHECKS.items():
            if not check(getattr(self, name)):
                raise AdapterError(f"LoraConfig: {name} must be {expected}, got {getattr(self, name)!r}")
        tokens = self.extra.get("trainable_token_indices")
        if tokens is not None and not _token_indices(tokens):
            raise AdapterError("LoraConfig: trainable_token_indices must be a list of token ids or an object of "
                               f"layer name -> token ids, got {tokens!r}")  # fmt: skip
        if self.lora_bias and (self.use_dora or self.init_lora_weights not in (True, False)):
            raise AdapterError("LoraConfig: lora_bias=True works with init_lora_weights True or False and without DoRA, "
                               f"as peft (got init_lora_weights={self.init_lora_weights!r}, use_dora={self.use_dora})")  # fmt: skip
        patterns = [*self.rank_pattern, *self.alpha_pattern]
        patterns += [p for p in (self.target_modules, self.exclude_modules) if isinstance(p, str)]
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterError(
                    f"LoraConfig: {pattern!r} is not a valid regular expression ({e})"
                ) from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names}
        )

    def to_dict(self) -> dict[str, Any]:
        """adapter_config.json's keys: peft's defaults for the ones autolm does not use, then these fields."""
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
        """peft's target rule: regex string (full match), exact name or suffix, or 'all-linear' (Linear layers
        alone); Linear layers and Embeddings."""
        if not isinstance(module, (*LINEAR, nn.Embedding)):  # an Embedding: named targets only
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
                found = isinstance(module, LINEAR) and key.split(".")[-1] != "lm_head"
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


def as_lora_config(config: Any, where: str) -> LoraConfig:
    """autolm's LoraConfig for a LoraConfig of autolm's or of peft's (read through its to_dict: user code that
    still imports peft's config works unchanged)."""
    if isinstance(config, LoraConfig):
        return config
    if str(getattr(config, "peft_type", "")) in ("LORA", "PeftType.LORA") and hasattr(config, "to_dict"):
        d = {k: v.value if isinstance(v, enum.Enum) else v for k, v in config.to_dict().items()}
        return LoraConfig.from_dict({k: sorted(v) if isinstance(v, set) else v for k, v in d.items()})
    raise AdapterError(f"{where}: expected a LoraConfig, got {type(config).__name__}")
