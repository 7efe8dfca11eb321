"""Python functions as chat-template tools: the JSON schema transformers' `get_json_schema` builds from a function's
signature (type hints) and its Google-style docstring (description, `Args:`, `Returns:`)."""

from __future__ import annotations

import contextlib
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from ..errors import TokenizerError

_DESCRIPTION = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_ARGS = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
# one "name: description" entry of the Args block; a description runs on over deeper-indented lines
_ARG = re.compile(r"(?:^|\n)([ \t]*)(\w+):\s*(.*?)\s*(?=\n(?!\1[ \t])[ \t]*\w+:|\Z)", re.DOTALL)
_RETURNS = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)
_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_PLAIN = {**{t: {"type": n} for t, n in _SCALARS.items()}, list: {"type": "array"}, tuple: {"type": "array"},
          dict: {"type": "object"}, Any: {}}  # fmt: skip


def _enum(values: list, where: str) -> dict:
    if not values or any(type(v) not in _SCALARS for v in values):
        raise TokenizerError(f"{where}: enum values must be int, float, str, bool or None, got {values!r}")
    kinds = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _union(args: tuple, where: str) -> dict:
    parts = [type_schema(t, where) for t in args if t is not type(None)]
    if len(parts) == 1:
        out = parts[0]
    elif all(p.keys() == {"type"} and isinstance(p["type"], str) for p in parts):
        names = sorted({p["type"] for p in parts})
        out = {"type": names[0] if len(names) == 1 else names}
    else:
        out = {"anyOf": parts}
    if type(None) in args:
        out["nullable"] = True
    return out


def type_schema(hint: Any, where: str) -> dict:
    """The JSON schema of a type hint: basic types, Enum, Literal, Optional/Union, list, tuple, dict."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum([m.value for m in hint], where)
    if origin is None:
        if hint in _PLAIN:
            return dict(_PLAIN[hint])
        raise TokenizerError(
            f"{where}: the type hint {hint!r} has no JSON schema (use int, float, str, bool, Enum, Literal, "
            "or list / tuple / dict / Optional of them; or pass the tool's JSON schema instead of the function)"
        )
    if origin is typing.Union or origin is types.UnionType:
        return _union(args, where)
    if origin is typing.Literal and args:
        return _enum(list(args), where)
    if origin is list:
        return {"type": "array", "items": type_schema(args[0], where)} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise TokenizerError(f"{where}: {hint!r}: use list[...] for a tuple of one or of any length")
        return {"type": "array", "prefixItems": [type_schema(t, where) for t in args]}
    if origin is dict:
        return {
            "type": "object",
            **({"additionalProperties": type_schema(args[1], where)} if len(args) == 2 else {}),
        }
    raise TokenizerError(f"{where}: cannot turn the type hint {hint!r} into a JSON schema")


def _parse_docstring(doc: str) -> tuple[str | None, dict[str, str], str | None]:
    """(description, {argument: description}, returns) of a Google-style docstring."""
    desc, args, returns = _DESCRIPTION.search(doc), _ARGS.search(doc), _RETURNS.search(doc)
    described: dict[str, str] = {}
    if args is not None:
        block = "\n".join(line for line in args.group(1).split("\n") if line.strip())
        described = {m[1]: re.sub(r"\s*\n+\s*", " ", m[2].strip()) for m in _ARG.findall(block)}
    return (
        desc.group(1).strip() if desc else None,
        described,
        returns.group(1).strip() if returns else None,
    )


def _parameters(func: Callable, name: str) -> dict:
    hints = typing.get_type_hints(func)
    params = inspect.signature(func).parameters
    first = next(iter(params), None)
    receiver = (
        first if first in ("self", "cls") and params[first].annotation is inspect.Parameter.empty else None
    )
    required = []
    for pname, p in params.items():
        if pname == receiver:
            continue
        if p.annotation is inspect.Parameter.empty:
            raise TokenizerError(f"tool {name}: argument {pname!r} has no type hint")
        if p.default is inspect.Parameter.empty:
            required.append(pname)
    properties = {}
    for pname, hint in hints.items():
        if pname == receiver:
            continue
        if pname == "return":
            # the model never writes the return value: a return hint without a schema is left out
            with contextlib.suppress(TokenizerError):
                properties[pname] = type_schema(hint, f"tool {name} (return)")
        else:
            properties[pname] = type_schema(hint, f"tool {name}, argument {pname!r}")
    return {"type": "object", "properties": properties, **({"required": required} if required else {})}


def get_json_schema(func: Callable) -> dict:
    """{"type": "function", "function": {name, description, parameters, [return]}} for a typed, documented
    function, as transformers.utils.get_json_schema builds it; a `(choices: [...])` at the end of an argument's
    description becomes its enum."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise TokenizerError(f"tool {name}: a function needs a docstring to become a tool schema")
    description, described, returns = _parse_docstring(doc.strip())
    parameters = _parameters(func, name)
    returned = parameters["properties"].pop("return", None)
    if returned is not None and returns is not None:
        returned["description"] = returns
    for arg, schema in parameters["properties"].items():
        if arg not in described:
            raise TokenizerError(f"tool {name}: the docstring's Args: block does not describe {arg!r}")
        text = described[arg]
        choices = _CHOICES.search(text)
        if choices:
            try:
                values = json.loads(choices.group(1))
            except json.JSONDecodeError as e:
                raise TokenizerError(
                    f"tool {name}, argument {arg!r}: (choices: ...) is not a JSON list ({e})"
                ) from None
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in values]
            text = text[: choices.start()].strip()
        schema["description"] = text
    out = {"name": name, "description": description, "parameters": parameters}
    if returned is not None:
        out["return"] = returned
    return {"type": "function", "function": out}


def tool_schemas(tools: list | None) -> list | None:
    """Tools as chat templates see them: JSON schemas as given, functions and methods converted."""
    if tools is None:
        return None
    out = []
    for tool in tools:
        if isinstance(tool, dict):
            out.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            out.append(get_json_schema(tool))
        else:
            raise TokenizerError(
                f"tools: expected JSON schemas (dicts) or functions with type hints and a docstring, got {tool!r}"
            )
    return out
