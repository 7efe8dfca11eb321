"""LoRA in peft's own format: LoraConfig, TaskType, get_peft_model, PeftModel (load / save / merge / adapters),
peft's state-dict functions, and transformers' PEFT integration for the models (integration.PeftAdapterMixin)."""

from .config import LoraConfig, PeftConfig, TaskType
from .inject import ModulesToSave
from .layers import LoraEmbedding, LoraLinear
from .model import (
    LoraModel,
    PeftModel,
    PeftModelForCausalLM,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__all__ = [
    "LoraConfig",
    "LoraEmbedding",
    "LoraLinear",
    "LoraModel",
    "ModulesToSave",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]
