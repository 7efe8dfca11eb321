"""POST /pooling, vLLM's generic pooling endpoint: per input (texts, token ids, or one conversation through the
chat template) what its `task` asks of the served model. An embedding server (--task embed): "embed", the
pooled normalised vector as /v1/embeddings gives it, or "token_embed", every token's normalised hidden state. A
classifier (--task classify): "classify", its probabilities as /classify gives them (the logits with
use_activation false), or "token_classify", the score head at every token. The server's own task by default."""

from __future__ import annotations

import asyncio
import time

import torch
import torch.nn.functional as F

from .errors import bad_request
from .protocol import PoolingChatRequest, PoolingRequest
from .responses import PoolingData, PoolingResponse
from .serving_embedding import ServingClassification, ServingEmbedding, ServingPooled, activated, encoded

TASKS = {"embed": ("embed", "token_embed"), "classify": ("classify", "token_classify")}  # server task -> asks


class ServingPooling(ServingPooled):
    prefix, tasks, api = "pool-", ("classify", "embed"), "Pooling"

    def __init__(self, state, embedding: ServingEmbedding, classification: ServingClassification):
        super().__init__(state)
        self.embedding, self.classification = embedding, classification

    async def create(self, req: PoolingRequest | PoolingChatRequest) -> PoolingResponse:
        adapter = self.check(req)
        task = req.task or self.state.task
        if task not in TASKS[self.state.task]:
            raise bad_request(f"Task {task} is not supported by this server (--task {self.state.task}): it does "
                              f"{' and '.join(TASKS[self.state.task])}", "task")  # fmt: skip
        if req.dimensions is not None and task != "embed":
            raise bad_request(f"'dimensions' is for the embed task, not {task}", "dimensions")
        rows = await self.state.off_loop(self.inputs, req)
        outputs = await asyncio.to_thread(self.compute, adapter, self._pool, task, rows, req)
        data = [PoolingData(index=i, data=encoded(t, req.encoding_format)) for i, t in enumerate(outputs)]
        return PoolingResponse(id=self.response_id(req), created=int(time.time()),
                               model=self.state.name, data=data, usage=self.usage(rows))  # fmt: skip

    def _pool(self, task: str, rows: list[list[int]], req) -> list[torch.Tensor]:
        if task == "embed":
            return list(self.embedding.vectors(rows, req.dimensions))
        if task == "classify":
            return list(activated(self.classification.logits(rows), req.activated()))
        tokens = [
            h[j, h.shape[1] - n :] for h, _, lengths in self.hidden(rows) for j, n in enumerate(lengths)
        ]
        if task == "token_embed":
            return [F.normalize(t, dim=-1) for t in tokens]
        score = self.base.score
        with torch.no_grad():
            return [activated(score(t.to(score.weight.dtype)).float(), req.activated()) for t in tokens]
