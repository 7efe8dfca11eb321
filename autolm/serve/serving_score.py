"""POST /score and /rerank, as vLLM serves them for a pooling model: each text_1 (a query) against each text_2 (a
document), 1:1, 1:N or N:N. A cross-encoder (`--task classify`, a classifier with one label) reads each pair
encoded together as the tokenizer encodes a text pair and gives its score (through a sigmoid unless the request
turns the activation off); an embedding model (`--task embed`) gives the cosine of the two texts' embeddings.
/rerank orders the documents by that score, best first, and keeps the top_n."""

from __future__ import annotations

import asyncio
import time

import torch.nn.functional as F

from .errors import bad_request
from .protocol import RerankRequest, ScoreRequest
from .responses import (
    EmbeddingUsage,
    RerankDocument,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreResponse,
)
from .serving_embedding import ServingClassification, ServingEmbedding, ServingPooled, activated


class ServingScores(ServingPooled):
    tasks, api = ("classify", "embed"), "Score"

    def __init__(self, state, embedding: ServingEmbedding, classification: ServingClassification):
        super().__init__(state)
        self.embedding, self.classification = embedding, classification

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        scores, tokens = await self._run(req.text_1, req.text_2, req, ("text_1", "text_2"))
        return ScoreResponse(id=self.response_id(req, "score-"), created=int(time.time()), model=self.state.name,
                             data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))  # fmt: skip

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        scores, tokens = await self._run(req.query, req.documents, req, ("query", "documents"))
        results = [
            RerankResult(index=i, document=RerankDocument(text=d), relevance_score=s)
            for i, (d, s) in enumerate(zip(req.documents, scores))
        ]
        results.sort(key=lambda r: r.relevance_score, reverse=True)  # stable: ties keep the documents' order
        return RerankResponse(id=self.response_id(req, "rerank-"), model=self.state.name,
                              results=results[: req.top_n or len(results)],
                              usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens))  # fmt: skip

    async def _run(self, first, second, req, names: tuple[str, str]) -> tuple[list[float], int]:
        """(a score per pair, the pairs' tokens): `first` broadcast over `second` where it is one text."""
        adapter = self.check(req)
        first = [first] if isinstance(first, str) else list(first)
        second = [second] if isinstance(second, str) else list(second)
        if len(first) > 1 and len(first) != len(second):
            raise bad_request(f"'{names[0]}' has {len(first)} texts and '{names[1]}' {len(second)}: the lengths "
                              "must be 1:1, 1:N or N:N", names[0])  # fmt: skip
        if self.state.task == "embed":
            return await self._cosines(first, second, req, names, adapter)
        pairs = first * len(second) if len(first) == 1 else first
        return await self._cross_encoded(pairs, second, req, names, adapter)

    def _encoded(self, texts: list[str], pairs: list[str] | None, req, param: str) -> list[list[int]]:
        """Token ids as the tokenizer encodes the texts (or text pairs), truncated by it to
        truncate_prompt_tokens (-1: the context) as vLLM asks it to, then checked."""
        s, keep = self.state, req.truncate_prompt_tokens
        keep = s.sampling.context if keep == -1 else keep
        kwargs = {} if keep is None else {"truncation": True, "max_length": keep}
        if pairs is not None:
            kwargs["text_pair"] = pairs
        return self.checked(s.prompts.encode(texts, True, param, **kwargs), param)

    async def _cosines(self, first, second, req, names, adapter) -> tuple[list[float], int]:
        """Each text embedded once (a single text_1 against all of text_2); the tokens counted per pair, with
        the pad token between the two where the tokenizer has one, as vLLM counts them."""
        rows = await self.state.off_loop(self._encoded, first + second, None, req, names[1])
        vectors = await asyncio.to_thread(self.compute, adapter, self.embedding.embed, rows)
        n, m = len(first), len(second)
        pick = [0] * m if n == 1 else list(range(n))
        pad = int(self.state.prompts.tokenizer.pad_token_id is not None)
        tokens = sum(len(rows[pick[i]]) + pad + len(rows[n + i]) for i in range(m))
        return F.cosine_similarity(vectors[pick], vectors[n:], dim=-1).tolist(), tokens

    async def _cross_encoded(self, first, second, req, names, adapter) -> tuple[list[float], int]:
        labels = self.base.config.num_labels
        if labels != 1:
            raise bad_request(f"The model's classifier has {labels} labels: scoring pairs needs a cross-encoder "
                              "with one (num_labels=1); /classify gives each label's probability", "model")  # fmt: skip
        rows = await self.state.off_loop(self._encoded, first, second, req, names[1])
        logits = await asyncio.to_thread(self.compute, adapter, self.classification.logits, rows)
        return activated(logits, req.activated())[:, 0].tolist(), sum(len(r) for r in rows)
