"""Tool calls: how the model is told about tools, the grammar of a forced call, and calls parsed from its text.

Calls follow the model's chat template: templates that emit `<tool_call>{json}</tool_call>` (Hermes, Qwen) or
a bare `{"name": ..., "parameters": ...}` object (Llama 3). A forced call (tool_choice "required" or a named
function) is a grammar in that format, so the output is always a valid call to a declared function.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

# Keywords whose values are data, not schemas: a "$ref" key inside them is not a reference.
_DATA_KEYWORDS = {"const", "enum", "default", "examples"}


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
    """A Lark grammar (llguidance's dialect, with %json) for one call, or several, to the given tools.

    Each tool's parameters schema moves under the grammar's root `$defs` (as `tool<i>`) with its local
    references rewritten to point there: nested under a new root, `#/$defs/...` (what pydantic emits for
    any nested model) would no longer resolve."""
    key = "parameters" if fmt == "llama3" else "arguments"
    defs, options = {}, []
    for i, t in enumerate(tools):
        if only is not None and t["function"]["name"] != only:
            continue
        defs[f"tool{i}"] = _relocate(_closed(t["function"].get("parameters")), f"#/$defs/tool{i}")
        options.append(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", key],
                "properties": {"name": {"const": t["function"]["name"]}, key: {"$ref": f"#/$defs/tool{i}"}},
            }
        )
    obj = "obj: %json " + json.dumps({"$defs": defs, "anyOf": options})
    if fmt == "llama3":
        return ('start: obj (";" obj)*\n' if several else "start: obj\n") + obj
    call = 'call: "<tool_call>\\n" obj "\\n</tool_call>"\n'
    return ('start: call ("\\n" call)*\n' if several else "start: call\n") + call + obj


def _relocate(schema: Any, base: str) -> Any:
    """The schema with every local reference ("#", "#/...") made relative to `base` instead of the root."""
    if isinstance(schema, list):
        return [_relocate(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = base + v[1:]
        elif k in _DATA_KEYWORDS:
            out[k] = v
        else:
            out[k] = _relocate(v, base)
    return out


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
