"""The small endpoints, as vLLM's OpenAIServingModels and OpenAIServingTokenization: the model list, the
version, health, and /tokenize and /detokenize (a prompt, or chat messages through the chat template)."""

from __future__ import annotations

import asyncio

from .. import __version__
from ..errors import AutolmError, ResolveError
from .errors import APIError, bad_request
from .protocol import (
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    UnloadLoRAAdapterRequest,
)
from .responses import (
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)
from .serving import Serving


class ServingModels(Serving):
    def models(self) -> ModelList:
        s = self.state
        cards = [ModelCard(id=s.name, created=s.created, root=s.name, max_model_len=s.sampling.context)]
        cards += [  # the LoRA adapters, each served by its name, as vLLM lists them
            ModelCard(id=a, created=s.created, root=a, parent=s.name, max_model_len=s.sampling.context)
            for a in s.sampling.adapters
        ]
        return ModelList(data=cards)

    def health(self) -> HealthResponse:
        engine = self.state.engine
        if engine is None:  # an embedding server: forwards run per request
            return HealthResponse(status="ok", running=0, waiting=0, steps=0)
        return HealthResponse(
            status="ok" if engine.error is None else f"degraded: {type(engine.error).__name__}",
            running=len(engine.active),
            waiting=engine.pending.qsize(),
            steps=engine.steps,
        )

    @staticmethod
    def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    async def load_adapter(self, req: LoadLoRAAdapterRequest) -> str:
        """vLLM's /v1/load_lora_adapter: a peft adapter folder (or repo id) loaded beside the others on the
        engine's thread, served by its name from the next request on."""
        s, name = self.state, req.lora_name
        if not name or not req.lora_path:
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided.")
        if name in s.sampling.adapters or name == s.name:
            raise bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        try:
            await asyncio.wrap_future(
                s.engine.call(lambda: s.model.load_adapter(req.lora_path, adapter_name=name))
            )
        except (
            AutolmError
        ) as e:  # no such folder or repo: 404, as vLLM's "No adapter found"; one that does not fit: 400
            missing = isinstance(e, ResolveError) or "adapter_config.json" in str(e)
            raise APIError(404 if missing else 400, s.prompts.scrub(str(e)), param="lora_path") from None
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, req: UnloadLoRAAdapterRequest) -> str:
        """vLLM's /v1/unload_lora_adapter: the requests running with it end ('abort'), then it goes."""
        s, name = self.state, req.lora_name
        if name not in s.sampling.adapters:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")

        def remove() -> None:
            s.engine.drop_adapter(name)
            s.model.delete_adapter(name)

        await asyncio.wrap_future(s.engine.call(remove))
        return f"Success: LoRA adapter '{name}' removed successfully."


class ServingTokens(Serving):
    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.state.sampling.check_model(req)
        prompts = self.state.prompts
        if isinstance(req, TokenizeChatRequest):
            ids = (await self.state.off_loop(prompts.chat, req)).ids
        else:
            ids = (await self.state.off_loop(prompts.encode, [req.prompt], req.add_special_tokens, "prompt"))[
                0
            ]
        strs = None
        if req.return_token_strs:
            strs = self.state.tokenizer.convert_ids_to_tokens(ids)
        return TokenizeResponse(
            count=len(ids), max_model_len=self.state.sampling.context, tokens=ids, token_strs=strs
        )

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.state.sampling.check_model(req)
        vocab = self.state.sampling.vocab
        bad = sorted({t for t in req.tokens if t >= vocab})
        if bad:
            raise bad_request(
                f"'tokens' has ids outside this model's vocabulary of {vocab}: {bad[:20]}", "tokens"
            )
        return DetokenizeResponse(prompt=await self.state.off_loop(self.state.tokenizer.decode, req.tokens))
