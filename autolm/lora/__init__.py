"""LoRA in peft's own format: LoraConfig, TaskType, get_peft_model, PeftModel (load / save / merge / adapters)."""

from .config import LoraConfig, TaskType
from .layers import LoraLinear, ModulesToSave
from .model import LoraModel, PeftModel, get_peft_model

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "ModulesToSave",
    "PeftModel",
    "TaskType",
    "get_peft_model",
]
