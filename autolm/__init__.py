"""autolm: load, run, adapt and serve open decoder language models.

Names mirror transformers and peft. Heavy modules (torch, the model code) are imported on first
use, so `import autolm` costs almost nothing beyond Python itself.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AutoConfig": "autolm.load.auto",
    "AutoModel": "autolm.load.auto",
    "AutoModelForCausalLM": "autolm.load.auto",
    "AutoModelForQuestionAnswering": "autolm.load.auto",
    "AutoModelForSequenceClassification": "autolm.load.auto",
    "AutoModelForTokenClassification": "autolm.load.auto",
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
            "WatermarkingConfig",
            "SynthIDTextWatermarkingConfig",
            "WatermarkLogitsProcessor",
            "SynthIDTextWatermarkLogitsProcessor",
            "WatermarkDetector",
            "WatermarkDetectorOutput",
        ],
        "autolm.generation",
    ),
    "KVCache": "autolm.models",
    "PretrainedConfig": "autolm.config",
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
    "QuantizedCache": "autolm.nn.quantized_cache",
    "set_seed": "autolm._util",
    "CausalLM": "autolm.models",
    "GenerationMixin": "autolm.generation",
    "AutoPeftModelForCausalLM": "autolm.load.auto",
    "AutoPeftModelForQuestionAnswering": "autolm.load.auto",
    "AutoPeftModelForSequenceClassification": "autolm.load.auto",
    "AutoPeftModelForTokenClassification": "autolm.load.auto",
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


def _names() -> list[str]:
    """Everything autolm exports: the tables' names and every family's config and model class (autolm.models
    lists them; importing it imports torch)."""
    return sorted({*_EXPORTS, *_ALIASES, *importlib.import_module("autolm.models")._MODULES})


def __getattr__(name: str) -> Any:
    if name == "__all__":  # `from autolm import *`
        return _names()
    target = _ALIASES.get(name, name)
    module = _EXPORTS.get(target)
    # a family's class, by autolm.models' table (never a submodule: their names are lower case)
    if module is None and not name[:2].islower():
        module = "autolm.models" if target in importlib.import_module("autolm.models")._MODULES else None
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
    return _names()
