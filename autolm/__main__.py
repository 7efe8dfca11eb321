"""`python -m autolm ...`: the autolm command (as `python -m llama_cpp.server` or `python -m vllm...` users type)."""

import sys

from .cli import main

sys.exit(main())
