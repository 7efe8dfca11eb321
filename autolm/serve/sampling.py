"""From a validated request and its prompts to engine Sequences: the length budget, the sampling settings,
logit bias, stop tokens, allowed tokens, log-probabilities and the grammar, each checked against the model
(a 400 naming the field and every bad value)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..generation import GenerationConfig
from .errors import APIError, bad_request
from .protocol import ChatRequest, NamedToolChoice
from .sequence import Sequence
from .structured import Grammars
from .tools import tool_call_grammar

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


class Sampling:
    """Turns requests into Plans for one model."""

    def __init__(self, model, tokenizer, model_name: str, eos):
        self.model, self.name = model, model_name
        self.context = model.config.max_position_embeddings
        self.vocab = model.config.vocab_size
        self.eos_ids = GenerationConfig(eos_token_id=eos).eos_ids
        self.grammars = Grammars(tokenizer, self.vocab, self.eos_ids)

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters, each served by its name (as vLLM's LoRA modules)."""
        return list(getattr(self.model, "peft_config", None) or {})

    def check_model(self, req) -> str | None:
        """The LoRA adapter the request's `model` names, None for the base model (or no name)."""
        if req.model in self.adapters:
            return req.model
        if req.model not in (None, self.name):
            names = ", ".join(repr(n) for n in [self.name, *self.adapters])
            raise APIError(404, f"The model '{req.model}' does not exist; this server has {names}", param="model",
                           code="model_not_found")  # fmt: skip
        return None

    def plan(
        self, req, prompts: list[list[int]], texts: list[str], emit_for, tools=None, fmt="hermes"
    ) -> Plan:
        """The Sequences of a request (best_of per prompt); emit_for(k) is the k-th sequence's event sink."""
        adapter = self.check_model(req)
        cfg = self._config(req, self._max_tokens(req, prompts))
        bias = self._token_ids(req, "logit_bias", [int(k) for k in req.logit_bias or {}])
        bias = dict(zip(bias, (float(v) for v in (req.logit_bias or {}).values())))
        allowed = self._token_ids(req, "allowed_token_ids", req.allowed_token_ids or []) or None
        grammar = self._grammar(req, tools, fmt)
        logprobs, prompt_logprobs = self._logprob_counts(req)
        stop_ids = tuple(self._token_ids(req, "stop_token_ids", req.stop_token_ids or []))
        stops = [s for s in ([req.stop] if isinstance(req.stop, str) else list(req.stop or [])) if s]
        best_of = req.best_of or req.n
        out = Plan(prompts, texts, req.n, best_of, tools=tools, tool_fmt=fmt)
        for p, prompt in enumerate(prompts):
            for i in range(best_of):
                k = p * best_of + i
                out.sequences.append(
                    Sequence(
                        prompt,
                        cfg,
                        stops,
                        emit_for(k),
                        self._generator(req.seed, k),
                        logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs,
                        rank=best_of > req.n,
                        bias=bias,
                        presence=req.presence_penalty or 0.0,
                        frequency=req.frequency_penalty or 0.0,
                        ignore_eos=req.ignore_eos,
                        constraint=self.grammars.constraint(grammar, allowed),
                        stop_token_ids=stop_ids,
                        include_stop=req.include_stop_str_in_output,
                        skip_special=req.skip_special_tokens,
                        adapter=adapter,
                    )
                )
        return out

    def _max_tokens(self, req, prompts: list[list[int]]) -> int:
        chat = isinstance(req, ChatRequest)
        asked = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
        longest = max(len(p) for p in prompts)
        room = self.context - longest
        if room <= 0 or (asked is not None and asked > room):
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has "
                f"{longest} and {1 if asked is None else asked} more were requested",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        if asked is None:  # chat: what the context leaves; completions: OpenAI's default of 16
            return room if chat else min(16, room)
        return asked

    def _config(self, req, max_tokens: int) -> GenerationConfig:
        temperature = 1.0 if req.temperature is None else req.temperature
        sample = temperature >= SAMPLING_EPS
        eos = sorted(set(self.eos_ids + list(req.stop_token_ids or [])))
        return GenerationConfig(
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

    def _token_ids(self, req, param: str, ids: list[int]) -> list[int]:
        """ids, or a 400 naming every one outside the vocabulary."""
        bad = sorted({t for t in ids if not 0 <= t < self.vocab})
        if bad:
            shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
            raise bad_request(
                f"'{param}' has token ids outside this model's vocabulary of {self.vocab} (ids 0 to "
                f"{self.vocab - 1}): {shown}",
                param,
            )
        return ids

    def _grammar(self, req, tools, fmt: str) -> tuple[str, str] | None:
        grammar = self.grammars.for_request(req)
        choice = getattr(req, "tool_choice", None)
        if tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
            only = choice.function.name if isinstance(choice, NamedToolChoice) else None
            self.grammars.require("tool_choice")
            grammar = (tool_call_grammar(tools, fmt, only, req.parallel_tool_calls and only is None), "tools")
        return grammar

    def _logprob_counts(self, req) -> tuple[int | None, int | None]:
        """(alternatives per sampled token, per prompt token); None: none asked; -1 is the whole vocabulary."""
        chat = isinstance(req, ChatRequest)
        sampled = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        prompt = req.prompt_logprobs
        if prompt is None and req.echo:  # vLLM: echo brings the prompt's logprobs (chat's are not streamed)
            prompt = sampled if not chat else None if req.stream else (req.top_logprobs or 0)
        whole = lambda k: self.vocab if k == -1 else k  # noqa: E731
        return (None if sampled is None else whole(sampled)), (None if prompt is None else whole(prompt))

    def _generator(self, seed: int | None, k: int) -> torch.Generator:
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed((seed + k) % 2**64 if seed is not None else int(torch.randint(0, 2**62, (1,))))
        return gen
