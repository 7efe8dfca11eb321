"""Structured output: constraints on which tokens may come next.

Constrained decoding uses llguidance (the serve extra): a request's JSON schema, regex, choice list, Lark
grammar or structural tags become a matcher; before each token its bitmask removes every token the grammar
forbids, and the chosen token advances it. Chosen over xgrammar (needs transformers and triton) and
outlines-core (~40x slower per token here): see the README for the measurements. `allowed_token_ids` is a
fixed mask of the same shape. The grammar requests ask for through OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` fields all come from `Grammars.for_request`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from .errors import bad_request

try:
    import llguidance
    import llguidance.torch as llguidance_torch
except ImportError:  # structured output is refused with a clear error
    llguidance = None


_SHIFTS = torch.arange(32, dtype=torch.int32)


class Constraint:
    """One request's grammar state: `mask(scores)` before choosing, `advance(token)` after."""

    def __init__(self, tokenizer, grammar: str, param: str):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise bad_request(f"'{param}' cannot be used as a grammar: {self.matcher.get_error()}", param)
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


class AllowedTokens:
    """vLLM's `allowed_token_ids`: every other token masked, all along; with a grammar, both apply."""

    def __init__(self, ids: list[int], then: Constraint | None = None):
        self.ids, self.then, self._keep = ids, then, None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self._keep is None or self._keep.device != scores.device:
            self._keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            self._keep[torch.tensor(self.ids, device=scores.device)] = True
        scores = scores.masked_fill(~self._keep, -float("inf"))
        return scores if self.then is None else self.then.mask(scores)

    def advance(self, token: int) -> None:
        if self.then is not None:
            self.then.advance(token)

    @property
    def finished(self) -> bool:
        return self.then is not None and self.then.finished


class Grammars:
    """Grammars for one tokenizer (the llguidance tokenizer is built once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._ll = None

    @staticmethod
    def require(param: str) -> None:
        if llguidance is None:
            raise bad_request(
                "structured output needs llguidance on the server: pip install 'autolm[serve]'", param
            )

    def _lltokenizer(self, param: str):
        self.require(param)
        if self._ll is None:
            try:
                self._ll = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=self.eos_ids[0] if self.eos_ids else None,
                )
            except (ValueError, RuntimeError) as e:  # a tokenizer llguidance cannot read (e.g. its decoder)
                raise bad_request(
                    f"'{param}': structured output is not available for this model ({e})", param
                ) from None
        return self._ll

    def constraint(self, grammar: tuple[str, str] | None, allowed: list[int] | None = None):
        """The constraint for (grammar, the request field it came from), and allowed_token_ids; or None."""
        c = None if grammar is None else Constraint(self._lltokenizer(grammar[1]), *grammar)
        return c if allowed is None else AllowedTokens(allowed, c)

    def for_request(self, req) -> tuple[str, str] | None:
        """(grammar, field) for what a request asks through response_format, structured_outputs or vLLM's
        older guided_* fields; None when it asks for none."""
        asked = _asked(req)
        if asked is None:
            return None
        kind, value, options, param = asked
        self.require(param)
        if kind == "structural_tag":  # a trigger that is one of the tokenizer's own tokens is matched as one
            options["specials"] = {
                t.content for t in self.tokenizer.backend.get_added_tokens_decoder().values()
            }
        return _build(kind, value, options, param), param


def _asked(req) -> tuple[str, Any, dict, str] | None:
    """(kind, value, JSON options, field) of the constraint a request asks for."""
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        return "json", {"type": "object"}, {}, "response_format"
    if rf is not None and rf.type == "json_schema":
        return "json", rf.json_schema.schema_ or {"type": "object"}, {}, "response_format"
    if rf is not None and rf.type == "structural_tag":
        return "structural_tag", rf.model_dump(), {}, "response_format"
    so = req.structured_outputs
    if so is not None:
        options = {"whitespace_pattern": so.whitespace_pattern, "flexible": not so.disable_any_whitespace}
        if so.disable_additional_properties:
            options["closed"] = True
        for kind in ("json_", "regex", "choice", "grammar", "structural_tag"):
            if getattr(so, kind) is not None:
                return kind.rstrip("_"), getattr(so, kind), options, "structured_outputs"
        return "json", {"type": "object"}, options, "structured_outputs"  # json_object
    options = {"whitespace_pattern": req.guided_whitespace_pattern, "flexible": True}
    for kind in ("json", "regex", "choice", "grammar"):
        if getattr(req, "guided_" + kind) is not None:
            return kind, getattr(req, "guided_" + kind), options, "guided_" + kind
    return None


def _build(kind: str, value: Any, options: dict, param: str) -> str:
    M = llguidance.LLMatcher
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad_request(f"'{param}': the JSON schema is not valid JSON", param) from None
        if not isinstance(value, (dict, bool)):
            raise bad_request(f"'{param}' must be a JSON schema object", param)
        if options.get("closed") and isinstance(value, dict):
            value = close_objects(value)
        compile_options = {"whitespace_flexible": options.get("flexible", True)}
        if options.get("whitespace_pattern"):
            compile_options["whitespace_pattern"] = options["whitespace_pattern"]
        return _checked(lambda v: M.grammar_from_json_schema(v, overrides=compile_options), value, param)
    if kind == "regex":
        return _checked(M.grammar_from_regex, value, param)
    if kind == "choice":
        return _checked(M.grammar_from_regex, "|".join(re.escape(c) for c in value), param)
    if kind == "grammar":
        return _checked(M.grammar_from_lark, value, param)
    return _checked(lambda v: _structural_tags(v, options.get("specials", set())), value, param)


def _structural_tags(value: Any, specials: set[str]) -> str:
    """vLLM's structural tags ({"structures": [{"begin", "schema", "end"}], "triggers": [...]}) as llguidance
    StructTags: free text, and where a trigger starts a tag, its begin, a JSON value of its schema, its end."""
    spec = json.loads(value) if isinstance(value, str) else value
    if not isinstance(spec, dict) or not isinstance(spec.get("structures"), list) or "format" in spec:
        raise ValueError("only the structures-and-triggers form of structural tags is supported")
    triggers = [t for t in spec.get("triggers") or [] if isinstance(t, str) and t]
    tags = []
    for s in spec["structures"]:
        begin = s.get("begin") if isinstance(s, dict) else None
        trigger = next((t for t in triggers if isinstance(begin, str) and begin.startswith(t)), None)
        if trigger is None or not isinstance(s.get("end"), str):
            raise ValueError(
                f"structure {s!r} needs a 'begin' that starts with one of the triggers, and an 'end'"
            )
        tags.append(
            llguidance.StructTag(trigger=trigger, begin=begin, grammar=s.get("schema") or {}, end=s["end"])
        )
    if not tags:
        raise ValueError("no structures given")
    return llguidance.StructTag.to_grammar(tags, assume_special=all(t.trigger in specials for t in tags))


def _checked(make, value: Any, param: str) -> str:
    try:
        grammar = make(value)
    except (ValueError, RuntimeError, TypeError, AssertionError) as e:
        raise bad_request(f"'{param}' is not a usable grammar: {e}", param) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise bad_request(f"'{param}' is not a usable grammar: {error}", param)
    return grammar


def close_objects(schema: Any) -> Any:
    """The schema with additionalProperties false on every object that does not set it."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    if out.get("type") == "object":
        out.setdefault("additionalProperties", False)
    return out
