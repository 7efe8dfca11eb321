"""Tokenizer: tokenizer.json through `tokenizers`, special tokens and settings from the HF config files, and chat
templates rendered by jinja2, all with transformers' calling conventions.

core.py: the Tokenizer (encode, pad, decode); special.py: special tokens and the vocabulary; chat.py:
apply_chat_template; tool_schema.py: Python functions as tools; encoding.py: BatchEncoding; files.py: reading
and writing the files.
"""

from .core import AutoTokenizer, Tokenizer
from .encoding import BatchEncoding
from .files import TOKENIZER_FILES
from .tool_schema import get_json_schema

__all__ = ["TOKENIZER_FILES", "AutoTokenizer", "BatchEncoding", "Tokenizer", "get_json_schema"]
