"""autolm's exceptions: every error a user can cause is one of these, naming the file, key or tensor."""

from __future__ import annotations


class AutolmError(Exception):
    """Base class of every error autolm raises on purpose."""


class ConfigError(AutolmError, ValueError):
    """config.json (or GGUF metadata) is missing, malformed or inconsistent."""


class CheckpointError(AutolmError):
    """A weight file is missing, corrupt, hostile, or does not fit the model."""


class ResolveError(AutolmError, FileNotFoundError):
    """A model path or repo id could not be turned into local files."""


class TokenizerError(AutolmError, ValueError):
    """Tokenizer files are missing or corrupt, a chat template fails, or a call's arguments are wrong (a ValueError,
    as transformers raises for those)."""


class GenerationError(AutolmError, ValueError):
    """Bad arguments to generate()."""


class AdapterError(AutolmError, ValueError):
    """A LoRA adapter does not fit its base model, its files are malformed, or an adapter name or config is wrong
    (a ValueError, as peft raises)."""


class GGUFError(CheckpointError):
    """A GGUF file is truncated, corrupt or of an unsupported architecture."""


class SaveError(AutolmError, OSError):
    """A save could not be completed (full disk, read-only file system, no permission, ...); `errno`
    says which. Nothing of it was written and the folder it targeted is as it was."""
