"""autolm: load, run, adapt and serve open decoder language models.

Names mirror transformers and peft. Heavy modules (torch, the model code) are imported on first
use, so `import autolm` costs almost nothing beyond Python itself.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AutoConfig": "autolm.load",
    "LlamaConfig": "autolm.models",
    "MistralConfig": "autolm.models",
    "Qwen2Config": "autolm.models",
    "Qwen3Config": "autolm.models",
    "Phi3Config": "autolm.models",
    "Olmo2Config": "autolm.models",
    "GraniteConfig": "autolm.models",
    "SmolLM3Config": "autolm.models",
    "GPT2Config": "autolm.models",
    "Gemma2Config": "autolm.models",
    "Gemma3Config": "autolm.models",
    "Gemma3TextConfig": "autolm.models",
    "MixtralConfig": "autolm.models",
    "Qwen2MoeConfig": "autolm.models",
    "Qwen3MoeConfig": "autolm.models",
    "GptOssConfig": "autolm.models",
    "GemmaConfig": "autolm.models",
    "Starcoder2Config": "autolm.models",
    "PhiConfig": "autolm.models",
    "GPTNeoXConfig": "autolm.models",
    "OlmoConfig": "autolm.models",
    "StableLmConfig": "autolm.models",
    "CohereConfig": "autolm.models",
    "GraniteMoeConfig": "autolm.models",
    "OlmoeConfig": "autolm.models",
    "Glm4Config": "autolm.models",
    "Olmo3Config": "autolm.models",
    "Exaone4Config": "autolm.models",
    "Ernie4_5Config": "autolm.models",
    "NemotronConfig": "autolm.models",
    "ArceeConfig": "autolm.models",
    "Glm4MoeConfig": "autolm.models",
    "Dots1Config": "autolm.models",
    "DeepseekV3Config": "autolm.models",
    "Ernie4_5_MoeConfig": "autolm.models",
    "SeedOssConfig": "autolm.models",
    "HunYuanDenseV1Config": "autolm.models",
    "GPTBigCodeConfig": "autolm.models",
    "FalconConfig": "autolm.models",
    "AutoModel": "autolm.load",
    "AutoModelForCausalLM": "autolm.load",
    "AutoModelForSequenceClassification": "autolm.load",
    "from_pretrained": "autolm.load",
    "LoadReport": "autolm.load",
    "AutoTokenizer": "autolm.tokenizer",
    "Tokenizer": "autolm.tokenizer",
    "BatchEncoding": "autolm.tokenizer",
    "get_json_schema": "autolm.tokenizer",
    "pipeline": "autolm.pipelines",
    "GenerationConfig": "autolm.generation",
    "TextStreamer": "autolm.generation",
    "TextIteratorStreamer": "autolm.generation",
    "stream_generate": "autolm.generation",
    "generate_text": "autolm.generation",
    "compile_decode": "autolm.generation",
    "GenerateOutput": "autolm.generation",
    # transformers' logits processors, warpers and stopping criteria (autolm.generation's __all__)
    **dict.fromkeys(
        [
            "EosTokenCriteria",
            "EpsilonLogitsWarper",
            "EtaLogitsWarper",
            "ExponentialDecayLengthPenalty",
            "ForcedBOSTokenLogitsProcessor",
            "ForcedEOSTokenLogitsProcessor",
            "InfNanRemoveLogitsProcessor",
            "LogitBiasLogitsProcessor",
            "LogitNormalization",
            "LogitsProcessor",
            "LogitsProcessorList",
            "MaxLengthCriteria",
            "MaxTimeCriteria",
            "MinLengthLogitsProcessor",
            "MinNewTokensLengthLogitsProcessor",
            "MinPLogitsWarper",
            "NoBadWordsLogitsProcessor",
            "NoRepeatNGramLogitsProcessor",
            "PrefixConstrainedLogitsProcessor",
            "PresenceFrequencyPenaltyLogitsProcessor",
            "RepetitionPenaltyLogitsProcessor",
            "SequenceBiasLogitsProcessor",
            "StopStringCriteria",
            "StoppingCriteria",
            "StoppingCriteriaList",
            "SuppressTokensAtBeginLogitsProcessor",
            "SuppressTokensLogitsProcessor",
            "TemperatureLogitsWarper",
            "TopHLogitsWarper",
            "TopKLogitsWarper",
            "TopPLogitsWarper",
            "TypicalLogitsWarper",
            "UnbatchedClassifierFreeGuidanceLogitsProcessor",
        ],
        "autolm.generation",
    ),
    "KVCache": "autolm.models",
    "PretrainedConfig": "autolm.config",
    "LlamaForCausalLM": "autolm.models",
    "MistralForCausalLM": "autolm.models",
    "Qwen2ForCausalLM": "autolm.models",
    "Qwen3ForCausalLM": "autolm.models",
    "Phi3ForCausalLM": "autolm.models",
    "Olmo2ForCausalLM": "autolm.models",
    "GraniteForCausalLM": "autolm.models",
    "SmolLM3ForCausalLM": "autolm.models",
    "GPT2LMHeadModel": "autolm.models",
    "Gemma2ForCausalLM": "autolm.models",
    "Gemma3ForCausalLM": "autolm.models",
    "MixtralForCausalLM": "autolm.models",
    "Qwen2MoeForCausalLM": "autolm.models",
    "Qwen3MoeForCausalLM": "autolm.models",
    "GptOssForCausalLM": "autolm.models",
    "GemmaForCausalLM": "autolm.models",
    "Starcoder2ForCausalLM": "autolm.models",
    "PhiForCausalLM": "autolm.models",
    "GPTNeoXForCausalLM": "autolm.models",
    "OlmoForCausalLM": "autolm.models",
    "StableLmForCausalLM": "autolm.models",
    "CohereForCausalLM": "autolm.models",
    "GraniteMoeForCausalLM": "autolm.models",
    "OlmoeForCausalLM": "autolm.models",
    "Glm4ForCausalLM": "autolm.models",
    "Olmo3ForCausalLM": "autolm.models",
    "Exaone4ForCausalLM": "autolm.models",
    "Ernie4_5ForCausalLM": "autolm.models",
    "NemotronForCausalLM": "autolm.models",
    "ArceeForCausalLM": "autolm.models",
    "Glm4MoeForCausalLM": "autolm.models",
    "Dots1ForCausalLM": "autolm.models",
    "DeepseekV3ForCausalLM": "autolm.models",
    "Ernie4_5_MoeForCausalLM": "autolm.models",
    "SeedOssForCausalLM": "autolm.models",
    "HunYuanDenseV1ForCausalLM": "autolm.models",
    "GPTBigCodeForCausalLM": "autolm.models",
    "FalconForCausalLM": "autolm.models",
    "register": "autolm.models",
    "LoraConfig": "autolm.lora",
    "TaskType": "autolm.lora",
    "get_peft_model": "autolm.lora",
    "PeftModel": "autolm.lora",
    "PeftConfig": "autolm.lora",
    "get_peft_model_state_dict": "autolm.lora",
    "set_peft_model_state_dict": "autolm.lora",
    "prepare_model_for_kbit_training": "autolm.lora",
    "BitsAndBytesConfig": "autolm.quant",
    "StaticCache": "autolm.nn.cache",
    "set_seed": "autolm._util",
    "CausalLM": "autolm.models",
    "GenerationMixin": "autolm.generation",
    "AutoPeftModelForCausalLM": "autolm.load",
    "AutoPeftModelForSequenceClassification": "autolm.load",
    "QuantConfig": "autolm.quant",
    "AutolmError": "autolm.errors",
    "ConfigError": "autolm.errors",
    "CheckpointError": "autolm.errors",
    "ResolveError": "autolm.errors",
    "TokenizerError": "autolm.errors",
    "GenerationError": "autolm.errors",
    "AdapterError": "autolm.errors",
    "GGUFError": "autolm.errors",
}

# transformers' names for autolm objects: the name users import -> the _EXPORTS entry it stands for.
_ALIASES = {  # transformers' names for autolm's classes
    "DynamicCache": "KVCache",
    "Cache": "KVCache",
    "PreTrainedModel": "CausalLM",
    "PreTrainedTokenizerFast": "Tokenizer",
    "PreTrainedTokenizer": "Tokenizer",
}

__all__ = sorted([*_EXPORTS, *_ALIASES])  # noqa: PLE0605 - a list, built from the tables


def __getattr__(name: str) -> Any:
    target = _ALIASES.get(name, name)
    module = _EXPORTS.get(target)
    if module is None:
        raise AttributeError(f"module 'autolm' has no attribute {name!r}")
    from .malloc import collector_paused

    with collector_paused():  # the first use imports torch and the model code: no collections meanwhile
        if module == "autolm.models":  # a family's class: with the load path its from_pretrained calls
            importlib.import_module("autolm.load")
        value = getattr(importlib.import_module(module), target)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
