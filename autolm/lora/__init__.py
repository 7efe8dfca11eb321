"""LoRA in peft's own format: LoraConfig, TaskType, get_peft_model, PeftModel (load / save / merge / adapters),
peft's state-dict functions and inject_adapter_in_model, and transformers' PEFT integration for the models (integration.PeftAdapterMixin)."""

from .config import LoraConfig, PeftConfig, TaskType
from .functions import (
    get_peft_model_state_dict,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from .inject import ModulesToSave
from .layers import AdapterLayer as LoraLayer
from .layers import LoraEmbedding, LoraLinear
from .model import LoraModel, PeftModel, PeftModelForCausalLM, get_peft_model
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__all__ = [
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
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
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]
