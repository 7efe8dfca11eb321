"""The pooling endpoints, as vLLM serves pooling models. POST /v1/embeddings (`autolm serve --task embed`, the
body alone): each input's final normed hidden states pooled (the last token's by default, or as the checkpoint's
sentence-transformers pooling config says: mean or first token) and L2-normalised; `dimensions` cuts a
Matryoshka model's vector and normalises it again; floats or base64 (little-endian float32, what OpenAI's
clients ask for by default). POST /classify (`--task classify`, a sequence classifier or reward model): the
`score` head at each input's last token, as probabilities (softmax; sigmoid for a single label) with the
likeliest label."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F

from .errors import APIError, bad_request
from .protocol import ClassificationChatRequest, ClassificationRequest, EmbeddingChatRequest, EmbeddingRequest
from .responses import (
    ClassificationData,
    ClassificationResponse,
    EmbeddingData,
    EmbeddingResponse,
    EmbeddingUsage,
)
from .serving import Serving

BATCH = 16  # inputs per forward


def _running(model, adapter: str | None):
    """The context in which `adapter` alone runs (None: no adapter) on a model with LoRA adapters."""
    if not getattr(model, "peft_config", None):
        return contextlib.nullcontext()
    if adapter is None:
        return model.disable_adapter()
    return _switched(model, adapter)


@contextlib.contextmanager
def _switched(model, adapter: str):
    before = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(before)


def pooling_mode(directory: str | None) -> str:
    """ "last", "mean" or "cls": sentence-transformers' 1_Pooling/config.json where the checkpoint has one, else
    the last token (vLLM's default for a decoder)."""
    path = os.path.join(directory or "", "1_Pooling", "config.json")
    if not directory or not os.path.isfile(path):
        return "last"
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    modes = {
        "pooling_mode_lasttoken": "last",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_cls_token": "cls",
    }
    return next((mode for key, mode in modes.items() if config.get(key)), "last")


class ServingPooled(Serving):
    """What the pooling endpoints share: the inputs as token ids, and the body's forward over them."""

    tasks: tuple[str, ...] = ()
    api = ""

    def __init__(self, state):
        super().__init__(state)
        model = state.model
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def compute(self, adapter: str | None, fn, *args):
        """fn(*args) with the model to itself (one forward at a time, whichever endpoint) and the request's LoRA
        adapter running (None: the base model)."""
        with self.state.forward_lock, _running(self.state.model, adapter), torch.no_grad():
            return fn(*args)

    def check(self, req) -> str | None:
        """The request's LoRA adapter (None: the base model), once the server can answer it."""
        s = self.state
        adapter = s.sampling.check_model(req)
        if s.closing:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if s.task not in self.tasks:
            wanted = " or ".join(f"--task {t}" for t in self.tasks)
            raise bad_request(f"The model does not support {self.api} API: this server runs --task {s.task} "
                              f"(start one with {wanted})", "model")  # fmt: skip
        return adapter

    def inputs(self, req) -> list[list[int]]:
        """Token ids per input (texts encoded, or the one conversation the chat template renders), truncated as
        asked and checked against the context."""
        s = self.state
        if getattr(req, "messages", None):
            rows, param = [s.prompts.chat(req).ids], "messages"
        else:
            rows, param = self._ids(req), "input"
        keep = req.truncate_prompt_tokens
        if keep is not None:
            keep = s.sampling.context if keep == -1 else keep
            rows = [r[len(r) - keep :] if len(r) > keep else r for r in rows]
        return self.checked(rows, param)

    def _ids(self, req) -> list[list[int]]:
        s, x = self.state, req.input
        if isinstance(x, str) or isinstance(x[0], str):
            return s.prompts.encode([x] if isinstance(x, str) else list(x), req.add_special_tokens, "input")
        rows = [list(x)] if isinstance(x[0], int) else [list(r) for r in x]
        bad = sorted({t for r in rows for t in r if t >= s.sampling.vocab})
        if bad:
            raise bad_request(f"'input' has ids outside this model's vocabulary of {s.sampling.vocab}: {bad[:20]}",
                              "input")  # fmt: skip
        return rows

    def checked(self, rows: list[list[int]], param: str) -> list[list[int]]:
        """The rows, refused (naming `param`) when there are too many, one is empty or over the context, or they
        are over the server's total."""
        s = self.state
        if len(rows) > s.limits.max_prompts:
            raise bad_request(f"'{param}' has {len(rows)} items, over this server's limit of {s.limits.max_prompts}",
                              param)  # fmt: skip
        for r in rows:
            if not r:
                raise bad_request(f"'{param}' has an item with no tokens", param)
            if len(r) > s.sampling.context:
                raise bad_request(
                    f"This model's maximum context length is {s.sampling.context} tokens. However, you requested "
                    f"{len(r)} tokens in the input for embedding generation. Please reduce the length of the input.",
                    param,
                )
        s.prompts.check_total(rows, param)
        return rows

    def hidden(self, rows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """(final normed hidden states (B, T, h) in fp32, mask, lengths) per batch of BATCH inputs, left-padded."""
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), BATCH):
                part = rows[i : i + BATCH]
                width = max(len(r) for r in part)
                ids = torch.zeros(len(part), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, r in enumerate(part):
                    ids[j, width - len(r) :], mask[j, width - len(r) :] = torch.tensor(r), 1
                device = self.base.device
                h = self.base.decoder_states(ids.to(device), mask.to(device), None, None, None, False, None, None,
                                             None)[0]  # fmt: skip
                out.append((h.float().cpu(), mask, [len(r) for r in part]))
        return out

    def usage(self, rows: list[list[int]]) -> EmbeddingUsage:
        n = sum(len(r) for r in rows)
        return EmbeddingUsage(prompt_tokens=n, total_tokens=n)


class ServingEmbedding(ServingPooled):
    prefix, tasks, api = "embd-", ("embed",), "Embeddings"

    def __init__(self, state):
        super().__init__(state)
        self.pooling = pooling_mode(getattr(getattr(self.base, "load_report", None), "directory", None))

    async def create(self, req: EmbeddingRequest | EmbeddingChatRequest) -> EmbeddingResponse:
        adapter = self.check(req)
        rows = await self.state.off_loop(self.inputs, req)
        vectors = await asyncio.to_thread(self.compute, adapter, self.vectors, rows, req.dimensions)
        data = [
            EmbeddingData(index=i, embedding=encoded(v, req.encoding_format)) for i, v in enumerate(vectors)
        ]
        return EmbeddingResponse(id=self.response_id(req), created=int(time.time()), model=self.state.name,
                                 data=data, usage=self.usage(rows))  # fmt: skip

    def vectors(self, rows: list[list[int]], dimensions: int | None) -> torch.Tensor:
        """The rows' normalised vectors, cut to a Matryoshka model's `dimensions` and normalised again."""
        size = self.base.config.embedding_width
        cut = size if dimensions is None else self._dimensions(dimensions, size)
        vectors = self.embed(rows)
        return vectors if cut == size else F.normalize(vectors[:, :cut], dim=-1)

    def embed(self, rows: list[list[int]]) -> torch.Tensor:
        """(inputs, hidden) pooled, normalised vectors."""
        return F.normalize(torch.cat([self._pool(*batch) for batch in self.hidden(rows)]), dim=-1)

    def _pool(self, h: torch.Tensor, mask: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        if self.pooling == "mean":
            return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        if self.pooling == "cls":  # the first real token of each left-padded row
            return torch.stack([h[j, h.shape[1] - n] for j, n in enumerate(lengths)])
        return h[:, -1]

    def _dimensions(self, dimensions: int, size: int) -> int:
        config = self.state.model.config
        sizes = config.extra.get("matryoshka_dimensions")
        if not (config.extra.get("is_matryoshka") or sizes):
            raise bad_request(f'Model "{self.state.name}" does not support matryoshka representation, changing '
                              "output dimensions will lead to poor results.", "dimensions")  # fmt: skip
        if dimensions > size or (sizes and dimensions not in sizes):
            raise bad_request(f"'dimensions' {dimensions} is not one this model was trained for "
                              f"({sizes or f'at most {size}'})", "dimensions")  # fmt: skip
        return dimensions


def encoded(v: torch.Tensor, encoding: str) -> list | str:
    """Floats (nested as the tensor is), or base64 of its float32 values, little-endian and flattened."""
    if encoding == "base64":
        return base64.b64encode(v.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


def activated(logits: torch.Tensor, on: bool = True) -> torch.Tensor:
    """A classifier's (rows, labels) logits as vLLM's pooler gives them: probabilities (softmax; sigmoid for a
    single label), or the logits themselves when the request turns the activation off."""
    if not on:
        return logits
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(-1)


class ServingClassification(ServingPooled):
    prefix, tasks, api = "classify-", ("classify",), "Classification"

    async def create(self, req: ClassificationRequest | ClassificationChatRequest) -> ClassificationResponse:
        adapter = self.check(req)
        rows = await self.state.off_loop(self.inputs, req)
        logits = await asyncio.to_thread(self.compute, adapter, self.logits, rows)
        probs = activated(logits, req.activated())
        names = self.base.config.id2label or {}
        data = [ClassificationData(index=i, label=names.get(int(p.argmax()), f"LABEL_{int(p.argmax())}"),
                                   probs=p.tolist(), num_classes=p.shape[0]) for i, p in enumerate(probs)]  # fmt: skip
        return ClassificationResponse(id=self.response_id(req), created=int(time.time()), model=self.state.name,
                                      data=data, usage=self.usage(rows))  # fmt: skip

    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """The score head at each input's last token (the rows are left-padded)."""
        score = self.base.score
        with torch.no_grad():
            return torch.cat(
                [score(h[:, -1].to(score.weight.dtype)).float() for h, _, _ in self.hidden(rows)]
            )
