"""Structured output and tool calls.

Constrained decoding uses llguidance (the serve extra): a request's JSON schema, regex, choice list or
Lark grammar becomes a matcher; before each token its bitmask removes every token the grammar forbids,
and the chosen token advances it. Chosen over xgrammar (needs transformers and triton) and
outlines-core (~40x slower per token here): see the README for the measurements.

Tool calls follow the model's chat template: templates that emit `<tool_call>{json}</tool_call>` (Hermes,
Qwen) or a bare `{"name": ..., "parameters": ...}` object (Llama 3). A forced call (tool_choice
"required" or a named function) is a grammar in that format, so the output is always a valid call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import torch

from .protocol import APIError

try:
    import llguidance
    import llguidance.torch as llguidance_torch
except ImportError:  # structured output is refused with a clear error
    llguidance = None


_SHIFTS = torch.arange(32, dtype=torch.int32)


class Constraint:
    """One request's grammar state: `mask(scores)` before choosing, `advance(token)` after."""

    def __init__(self, tokenizer, grammar: str):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise APIError(
                400, f"the grammar cannot be used: {self.matcher.get_error()}", param="response_format"
            )
        self.bitmask = llguidance_torch.allocate_token_bitmask(1, tokenizer.vocab_size)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (1, V) with every token the grammar forbids at -inf. The bitmask is unpacked with plain
        tensor ops (llguidance's own helper compiles a kernel with torch.compile on first use: seconds)."""
        llguidance_torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = (self.bitmask.unsqueeze(-1) >> _SHIFTS) & 1  # (1, words, 32), bit i of word w: token 32w + i
        allowed = bits.reshape(1, -1)[:, : scores.shape[-1]].to(device=scores.device, dtype=torch.bool)
        return scores.masked_fill(~allowed, -float("inf"))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()


class Grammars:
    """Grammars for one tokenizer (the llguidance tokenizer is built once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._ll = None

    @staticmethod
    def require(param: str) -> None:
        if llguidance is None:
            raise APIError(
                400,
                "structured output needs llguidance on the server: pip install 'autolm[serve]'",
                param=param,
            )

    def _lltokenizer(self):
        self.require("response_format")
        if self._ll is None:
            self._ll = llguidance.LLTokenizer(
                self.tokenizer.backend.to_str(),
                n_vocab=self.vocab_size,
                eos_token=self.eos_ids[0] if self.eos_ids else None,
            )
        return self._ll

    def constraint(self, grammar: str | None) -> Constraint | None:
        return None if grammar is None else Constraint(self._lltokenizer(), grammar)

    def for_request(self, req) -> str | None:
        """The grammar a request asks for through response_format or vLLM's guided_* fields, or None."""
        if llguidance is None and _wants_grammar(req):
            self._lltokenizer()  # raises the clear error
        M = llguidance.LLMatcher if llguidance is not None else None
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            return M.grammar_from_json_schema({"type": "object"})
        if rf is not None and rf.type == "json_schema":
            return _schema_grammar(rf.json_schema.schema_ or {"type": "object"}, "response_format")
        if req.guided_json is not None:
            return _schema_grammar(req.guided_json, "guided_json")
        if req.guided_regex is not None:
            return _checked(M.grammar_from_regex, req.guided_regex, "guided_regex")
        if req.guided_choice is not None:
            return M.grammar_from_regex("|".join(re.escape(c) for c in req.guided_choice))
        if req.guided_grammar is not None:
            return _checked(M.grammar_from_lark, req.guided_grammar, "guided_grammar")
        return None


def _wants_grammar(req) -> bool:
    rf = req.response_format
    return (rf is not None and rf.type != "text") or any(
        getattr(req, k) is not None
        for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
    )


def _checked(make, text: str, param: str) -> str:
    try:
        grammar = make(text)
    except (ValueError, RuntimeError) as e:
        raise APIError(400, f"'{param}' is not a usable grammar: {e}", param=param) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise APIError(400, f"'{param}' is not a usable grammar: {error}", param=param)
    return grammar


def _schema_grammar(schema: Any, param: str) -> str:
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"'{param}' must be a JSON schema object", param=param)
    return _checked(llguidance.LLMatcher.grammar_from_json_schema, schema, param)


# ---- tools ---------------------------------------------------------------------------------------------


def tool_format(template: str | None) -> str:
    """'hermes' (<tool_call> tags) or 'llama3' (a bare JSON object with "parameters")."""
    if (
        template
        and "<tool_call>" not in template
        and ("<|python_tag|>" in template or '"parameters"' in template)
    ):
        return "llama3"
    return "hermes"


def tool_instructions(tools: list[dict]) -> str:
    """A system message for chat templates that do not render `tools` themselves."""
    return (
        "You can call functions. To call one, answer with nothing but\n<tool_call>\n"
        '{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>\n'
        "Available functions:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    )


def tool_call_grammar(tools: list[dict], fmt: str, only: str | None, several: bool) -> str:
    """A Lark grammar (llguidance's dialect, with %json) for one call, or several, to the given tools."""
    key = "parameters" if fmt == "llama3" else "arguments"
    options = [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", key],
            "properties": {
                "name": {"const": t["function"]["name"]},
                key: _closed(t["function"].get("parameters")),
            },
        }
        for t in tools
        if only is None or t["function"]["name"] == only
    ]
    obj = "obj: %json " + json.dumps({"anyOf": options})
    if fmt == "llama3":
        return ('start: obj (";" obj)*\n' if several else "start: obj\n") + obj
    call = 'call: "<tool_call>\\n" obj "\\n</tool_call>"\n'
    return ('start: call ("\\n" call)*\n' if several else "start: call\n") + call + obj


def _closed(schema: dict | None) -> dict:
    """A function's parameters with no properties beyond the declared ones (as OpenAI's strict mode)."""
    schema = dict(schema or {"type": "object"})
    if schema.get("type") == "object" and "properties" in schema:
        schema.setdefault("additionalProperties", False)
    return schema


def parse_tool_calls(text: str, fmt: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(the text before the calls or None, OpenAI tool_calls) from a model's output; no calls: (text, [])."""
    found, content = [], text
    if fmt == "hermes":
        blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
        if blocks:
            content = text[: text.index("<tool_call>")].strip() or None
        candidates = blocks
    else:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        candidates = list(re.split(r"\s*;\s*(?=\{)", body)) if body.startswith("{") else []
        if candidates:
            content = None
    for raw in candidates:
        try:
            call = json.loads(raw)
        except ValueError:
            return text, []
        args = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(args, dict):
            return text, []
        found.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    return (content, found) if found else (text, [])
