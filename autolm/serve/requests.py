"""From a validated request to engine Sequences, and from their events to OpenAI's response pieces:
sampling settings, prompts (chat templates with tools, completions as text or token ids), log-probabilities
in OpenAI's two formats, and tool calls."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation import GenerationConfig
from .engine import Sequence
from .protocol import APIError, ChatRequest, CompletionRequest, NamedToolChoice, message_dicts
from .structured import Grammars, parse_tool_calls, tool_call_grammar, tool_format, tool_instructions

SAMPLING_EPS = 1e-5  # temperatures below this decode greedily (as vLLM), instead of dividing by ~0


@dataclass
class Plan:
    """What one request runs: its prompts, the sequences per prompt, and how to shape the answer."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    best_of: int
    sequences: list[Sequence] = field(default_factory=list)
    tools: list[dict] | None = None
    tool_fmt: str = "hermes"


class Requests:
    """Turns requests into Plans for one model and tokenizer."""

    def __init__(self, model, tokenizer, model_name: str, eos: Any):
        self.model, self.tokenizer, self.name = model, tokenizer, model_name
        self.context = model.config.max_position_embeddings
        self.vocab = model.config.vocab_size
        self.eos = eos
        self.grammars = Grammars(tokenizer, self.vocab, GenerationConfig(eos_token_id=eos).eos_ids)

    # ---- prompts -------------------------------------------------------------------------------------

    def chat_prompt(self, req: ChatRequest) -> tuple[list[int], list[dict] | None, str]:
        messages = message_dicts(req.messages)
        tools = (
            [t.model_dump(exclude_none=True) for t in req.tools]
            if req.tools and req.tool_choice != "none"
            else None
        )
        template = self.tokenizer._pick_template(None, tools) if self.tokenizer.chat_template else None
        kwargs = dict(req.chat_template_kwargs or {})
        if tools and template and "tools" not in template:  # the template cannot show them: say it ourselves
            text = tool_instructions(tools)
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + text}
            else:
                messages.insert(0, {"role": "system", "content": text})
        try:
            ids = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                **kwargs,
            )["input_ids"]
        except Exception as e:
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        return list(ids), tools, tool_format(template)

    def completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        prompt = req.prompt
        items = (
            [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        )
        ids_list, texts = [], []
        for item in items:
            if isinstance(item, str):
                try:
                    ids = self.tokenizer.encode(item)
                except Exception as e:
                    raise APIError(400, f"'prompt' cannot be encoded: {e}", param="prompt") from None
                if not ids:
                    raise APIError(400, "'prompt' encodes to no tokens", param="prompt")
                ids_list.append(ids)
                texts.append(item)
            else:
                if any(not 0 <= t < self.vocab for t in item):
                    raise APIError(400, f"'prompt': token ids must be in [0, {self.vocab})", param="prompt")
                ids_list.append(list(item))
                texts.append(self.tokenizer.decode(item))
        return ids_list, texts

    # ---- settings --------------------------------------------------------------------------------------

    def plan(
        self,
        req,
        prompts: list[list[int]],
        texts: list[str],
        tools: list[dict] | None = None,
        tool_fmt: str = "hermes",
        emit_for=None,
    ) -> Plan:
        if req.model not in (None, self.name):
            raise APIError(
                404,
                f"The model '{req.model}' does not exist; this server has '{self.name}'",
                param="model",
                code="model_not_found",
            )
        chat = isinstance(req, ChatRequest)
        max_tokens = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
        longest = max(len(p) for p in prompts)
        room = self.context - longest
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has "
                f"{longest} and {1 if max_tokens is None else max_tokens} more were requested",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = room if chat else 16  # OpenAI's completions default
        temperature = 1.0 if req.temperature is None else req.temperature
        sample = temperature >= SAMPLING_EPS
        stops = [s for s in ([req.stop] if isinstance(req.stop, str) else list(req.stop or [])) if s]
        eos = self.eos
        if req.stop_token_ids:
            eos = sorted(set(GenerationConfig(eos_token_id=eos).eos_ids + req.stop_token_ids))
        cfg = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            top_k=req.top_k if req.top_k and req.top_k > 0 and sample else None,
            top_p=(req.top_p or 1.0) if sample else 1.0,
            min_p=req.min_p if sample else None,
            repetition_penalty=req.repetition_penalty or 1.0,
            min_new_tokens=req.min_tokens or None,
            eos_token_id=eos,
        )
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if not 0 <= int(key) < self.vocab:
                raise APIError(
                    400, f"'logit_bias': token id {key} is not in [0, {self.vocab})", param="logit_bias"
                )
            bias[int(key)] = float(value)
        grammar = self.grammars.for_request(req)
        if tools and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)):
            only = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
            self.grammars.require("tool_choice")
            grammar = tool_call_grammar(tools, tool_fmt, only, req.parallel_tool_calls and only is None)
        logprobs = (req.top_logprobs or 0) if chat and req.logprobs else (None if chat else req.logprobs)
        best_of = req.best_of or req.n
        out = Plan(prompts, texts, req.n, best_of, tools=tools, tool_fmt=tool_fmt)
        for p, prompt in enumerate(prompts):
            for i in range(best_of):
                k = p * best_of + i
                gen = torch.Generator(device=self.model.device)
                gen.manual_seed(
                    (req.seed + k) % 2**64 if req.seed is not None else int(torch.randint(0, 2**62, (1,)))
                )
                out.sequences.append(
                    Sequence(
                        prompt,
                        cfg,
                        stops,
                        emit_for(k),
                        gen,
                        logprobs=logprobs,
                        prompt_logprobs=not chat and req.echo and req.logprobs is not None,
                        rank=best_of > req.n,
                        bias=bias,
                        presence=req.presence_penalty or 0.0,
                        frequency=req.frequency_penalty or 0.0,
                        ignore_eos=req.ignore_eos,
                        constraint=self.grammars.constraint(grammar),
                    )
                )
        return out

    # ---- answers ------------------------------------------------------------------------------------------

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (one Requests per server)
    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat_logprobs(self, entries: list) -> dict:
        def item(token: int, lp: float) -> dict:
            text = self.piece(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in alts]} for t, lp, alts in entries
            ]
        }

    def completion_logprobs(self, entries: list, offset: int = 0) -> dict:
        """OpenAI's completions format; an entry (token, None, None) is a prompt token with no logprob (the first)."""
        tokens, lps, tops, offsets = [], [], [], []
        for t, lp, alts in entries:
            tokens.append(self.piece(t))
            lps.append(lp)
            # vLLM's convention: the top alternatives and the chosen token itself
            tops.append(None if lp is None else {**{self.piece(a): alp for a, alp in alts}, tokens[-1]: lp})
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def tool_message(self, plan: Plan, text: str) -> tuple[dict, str | None]:
        """The assistant message for `text`: tool_calls when the output is a call (and reason 'tool_calls')."""
        if plan.tools:
            content, calls = parse_tool_calls(
                text, plan.tool_fmt, {t["function"]["name"] for t in plan.tools}
            )
            if calls:
                return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": text}, None
