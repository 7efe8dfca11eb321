"""lm-evaluation-harness integration (the optional `eval` extra, imported only here): an LM class
registered with lm-eval as "autolm", and `evaluate()` behind `autolm eval`.

Scoring follows lm-eval's `hf` backend exactly (same tokenisation of context and continuation, the
same left truncation to the context window, log-softmax in float32), so on the same weights the
per-item loglikelihoods and the scores equal that backend's.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import AutolmError


class _AutolmLM:
    """`lm_eval --model autolm --model_args pretrained=DIR,dtype=float32` or AutolmLM(model=, tokenizer=)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model=None,
        tokenizer=None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = False,
        device: str | None = None,
        adapter: str | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        from . import AutoModelForCausalLM, AutoTokenizer

        if model is None:
            if pretrained is None:
                raise AutolmError("AutolmLM needs pretrained=<model dir or repo id> or model=")
            model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype, device=device, **kwargs)
            if adapter:
                from .lora import PeftModel

                model = PeftModel.from_pretrained(model, adapter)
        self.model = model
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(
            pretrained, gguf_file=kwargs.get("gguf_file")
        )
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token

    # ---- what lm-eval asks of a model ----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = self.tokenizer.chat_template
        return (
            template.get(chat_template if isinstance(chat_template, str) else "default")
            if isinstance(template, dict)
            else template
        )

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer.encode(string, add_special_tokens=special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives the continuation."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for start in range(0, len(order), self.batch_size_per_gpu):
            chunk = order[start : start + self.batch_size_per_gpu]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in chunk]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self.model.device)
            logits = self.model(ids, use_cache=False).logits
            for row, i, n in zip(logits, chunk, (len(r) for r in rows)):
                cont = requests[i][2]
                logp = F.log_softmax(row[n - len(cont) : n].float(), dim=-1)
                target = torch.tensor(cont, device=logp.device)
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (float(logp.gather(-1, target[:, None]).sum()), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="rolling loglikelihood"):
            windows = [
                (None,) + w
                for w in map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate"):
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            if eos not in until:
                until.append(eos)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            if temperature == 0.0:
                do_sample = False
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            settings = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
            for k in ("top_p", "top_k"):
                if k in kw and do_sample:
                    settings[k] = kw.pop(k)
            seq = self.model.generate(
                torch.tensor([ids], device=self.model.device),
                max_new_tokens=max_new,
                stop_strings=until,
                tokenizer=self.tokenizer,
                pad_token_id=self.eot_token_id,
                **settings,
            )
            text = self.tok_decode(seq[0, len(ids) :].tolist())
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


@functools.lru_cache(maxsize=1)
def lm_class() -> type:
    """AutolmLM: lm-eval's TemplateLM with autolm's methods, defined and registered with lm-eval on first use."""
    try:
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise AutolmError("evaluation needs lm-evaluation-harness: pip install 'autolm[eval]'") from None
    cls = type("AutolmLM", (_AutolmLM, TemplateLM), {"__doc__": _AutolmLM.__doc__, "__module__": __name__})
    return register_model("autolm")(cls)


def evaluate(
    model: str,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    dtype: str = "auto",
    adapter: str | None = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    seed: int = 0,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval tasks on an autolm model; lm-eval's results dict."""
    if limit is not None and limit >= 1:
        limit = int(limit)
    lm = lm_class()(pretrained=model, dtype=dtype, batch_size=batch_size, adapter=adapter, **model_kwargs)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        task_manager=TaskManager(include_path=include_path),
        apply_chat_template=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
