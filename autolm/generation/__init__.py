"""Generation in three layers: a token iterator, a text stream with statistics, a plain string; `generate`
with transformers' arguments on top of the iterator, and beam search. Models are reached only through
`model(...)` and `model.make_cache()`."""

from .config import GenerationConfig
from .decode import Step, compile_decode, generate_tokens
from .mixin import GenerateOutput, GenerationMixin
from .sampling import choose, process_logits
from .streaming import (
    Detokenizer,
    GenerationChunk,
    TextIteratorStreamer,
    TextStreamer,
    generate_text,
    stream_generate,
)

__all__ = [
    "Detokenizer",
    "GenerateOutput",
    "GenerationChunk",
    "GenerationConfig",
    "GenerationMixin",
    "Step",
    "TextIteratorStreamer",
    "TextStreamer",
    "choose",
    "compile_decode",
    "generate_text",
    "generate_tokens",
    "process_logits",
    "stream_generate",
]
