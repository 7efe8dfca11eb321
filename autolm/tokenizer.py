"""Tokenizer: tokenizer.json through `tokenizers`, special tokens and settings from the HF config files,
and chat templates rendered by jinja2 with transformers' semantics."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from ._util import atomic_directory, read_json
from .chat_template import MAX_TEMPLATE_OUTPUT, render_chat_template
from .errors import TokenizerError
from .hub import HUB_KWARGS, resolve_model_dir

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what save_pretrained writes


class BatchEncoding(dict):
    """A dict of input_ids / attention_mask that also allows attribute access, as transformers' does."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
    """An optional JSON config file: {} when absent."""
    return read_json(path, TokenizerError) if os.path.isfile(path) else {}


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with transformers' calling conventions."""

    saved_files = TOKENIZER_FILES  # what save_pretrained writes (and may replace)

    def __init__(
        self,
        backend,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | dict[str, str] | None = None,
        padding_side: str = "right",
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
        init_kwargs: dict[str, Any] | None = None,
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.truncation_side = (init_kwargs or {}).get("truncation_side", "right")
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path
        self.init_kwargs = init_kwargs or {}

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, gguf_file: str | None = None, **kwargs: Any) -> Tokenizer:
        directory = resolve_model_dir(
            path_or_repo_id, **{k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        )
        if gguf_file is not None:
            return cls.from_gguf(os.path.join(directory, gguf_file))
        return cls.from_dir(directory, **kwargs)

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """The tokenizer stored inside a GGUF file."""
        from .sources.gguf_tokenizer import tokenizer_parts

        backend, special, template, init = tokenizer_parts(path)
        return cls(backend, special, template, name_or_path=path, init_kwargs=init)

    @classmethod
    def from_dir(cls, directory: str, padding_side: str | None = None, **kwargs: Any) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        for k in ("use_fast", "trust_remote_code", "legacy", "add_prefix_space"):
            kwargs.pop(k, None)  # transformers' switches: autolm always runs the fast `tokenizers` backend
        if kwargs:
            raise TokenizerError(
                f"AutoTokenizer.from_pretrained got unsupported arguments: {', '.join(sorted(kwargs))}"
            )
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(
                f"{directory}: no tokenizer.json (autolm reads tokenizers in the tokenizer.json format)"
            )
        try:
            backend = Backend.from_file(path)
        except Exception as e:  # the Rust library raises plain Exceptions for every parse error
            raise TokenizerError(f"{path}: cannot be parsed as a tokenizer ({e})") from None
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
        special: dict[str, Any] = {k: _token_content(config.get(k, special_map.get(k))) for k in _SPECIAL}
        extra = config.get("additional_special_tokens", special_map.get("additional_special_tokens"))
        if isinstance(extra, list) and all(_token_content(t) for t in extra):
            special["additional_special_tokens"] = [_token_content(t) for t in extra]
        template: Any = config.get("chat_template")
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            try:
                with open(jinja_path, encoding="utf-8") as f:
                    template = f.read(MAX_TEMPLATE_OUTPUT + 1)
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{jinja_path}: cannot be read as UTF-8 text ({e})") from None
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            if not all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                for t in template
            ):
                raise TokenizerError(
                    f"{directory}/tokenizer_config.json: chat_template list entries must be "
                    '{"name": ..., "template": ...} objects'
                )
            template = {t["name"]: t["template"] for t in template}
        elif template is not None and not isinstance(template, str):
            raise TokenizerError(
                f"{directory}/tokenizer_config.json: chat_template must be a string or a list, "
                f"found {type(template).__name__}"
            )
        side = padding_side or config.get("padding_side", "right")
        if side not in ("left", "right"):
            raise TokenizerError(
                f"{directory}/tokenizer_config.json: padding_side must be 'left' or 'right', found {side!r}"
            )
        max_len = config.get("model_max_length")
        return cls(
            backend,
            special,
            template,
            side,
            int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
            bool(config.get("clean_up_tokenization_spaces", False)),
            directory,
            config,
        )

    # ---- special tokens -----------------------------------------------------------------------

    def _special_id(self, key: str) -> int | None:
        tok = self.special_tokens.get(key)
        return None if tok is None else self.backend.token_to_id(tok)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @pad_token.setter
    def pad_token(self, value: str | None) -> None:
        self.special_tokens["pad_token"] = value

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens (bos, eos, unk, ...) then the additional ones, without repeats."""
        named = [self.special_tokens[k] for k in _SPECIAL if self.special_tokens.get(k)]
        return list(dict.fromkeys(named + self.additional_special_tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.all_special_tokens]

    @property
    def additional_special_tokens(self) -> list[str]:
        return list(self.special_tokens.get("additional_special_tokens") or [])

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (strings or tokenizers.AddedToken); the number actually added."""
        from tokenizers import AddedToken

        items = [new_tokens] if isinstance(new_tokens, (str, AddedToken)) else list(new_tokens)
        tokens = [
            t
            if isinstance(t, AddedToken)
            else AddedToken(t, special=special_tokens, normalized=not special_tokens)
            for t in items
        ]
        return self.backend.add_special_tokens(tokens) if special_tokens else self.backend.add_tokens(tokens)

    def add_special_tokens(
        self, special_tokens_dict: dict[str, Any], replace_additional_special_tokens: bool = True
    ) -> int:
        """Set bos/eos/unk/pad/... and `additional_special_tokens`, adding the ones not yet in the vocabulary."""
        added = 0
        for key, value in sorted(
            special_tokens_dict.items(), key=lambda kv: kv[0] == "additional_special_tokens"
        ):
            if key == "additional_special_tokens":
                extra = [_token_content(v) for v in value]
                added += self.add_tokens(extra, special_tokens=True)
                old = [] if replace_additional_special_tokens else self.additional_special_tokens
                self.special_tokens[key] = old + [t for t in extra if t not in old]
            elif key in _SPECIAL:
                token = _token_content(value)
                added += self.add_tokens([token], special_tokens=True)
                self.special_tokens[key] = token
            else:
                raise TokenizerError(
                    f"add_special_tokens: unknown key {key!r} (expected one of {_SPECIAL} "
                    "or 'additional_special_tokens')"
                )
        return added

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    # ---- encoding / decoding ------------------------------------------------------------------

    def encode(
        self, text: str, text_pair: str | None = None, add_special_tokens: bool = True, **kwargs: Any
    ) -> list[int]:
        return self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        enc = self.backend.encode(text, pair, add_special_tokens=add_special_tokens)
        return enc.tokens

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool = True,
        return_offsets_mapping: bool = False,
        return_token_type_ids: bool = False,
        return_length: bool = False,
        pad_to_multiple_of: int | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Encode one text (or pair) or a batch; truncate (from `truncation_side`), pad (left or right),
        and return lists or tensors, with offsets and token type ids when asked."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise TokenizerError(f"text_pair has {len(pairs)} entries for {len(texts)} texts")
            inputs: list = list(zip(texts, pairs))
        else:
            inputs = texts
        if truncation and truncation != "do_not_truncate":
            limit = max_length or self.model_max_length
            if limit is None:
                raise TokenizerError(
                    "truncation=True needs max_length (the tokenizer has no model_max_length)"
                )
            strategy = "longest_first" if truncation is True else truncation
            if strategy not in ("longest_first", "only_first", "only_second"):
                raise TokenizerError(
                    f"truncation={truncation!r} is not supported (True, 'longest_first', "
                    "'only_first' or 'only_second')"
                )
            self.backend.enable_truncation(limit, strategy=strategy, direction=self.truncation_side)
        try:
            encs = self.backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as e:  # the Rust library raises plain Exceptions (e.g. a pair too long to truncate)
            raise TokenizerError(f"cannot encode the text: {e}") from None
        finally:
            self.backend.no_truncation()
        fields = {"input_ids": [e.ids for e in encs]}
        if return_token_type_ids:
            fields["token_type_ids"] = [e.type_ids for e in encs]
        if return_attention_mask:
            fields["attention_mask"] = [[1] * len(e.ids) for e in encs]
        if return_offsets_mapping:
            fields["offset_mapping"] = [list(e.offsets) for e in encs]
        if padding and padding != "do_not_pad":
            self._pad(fields, padding, max_length, padding_side or self.padding_side, pad_to_multiple_of)
        if return_length:
            fields["length"] = [len(x) for x in fields["input_ids"]]
        if return_tensors == "pt":
            import torch

            if len({len(x) for x in fields["input_ids"]}) > 1:
                raise TokenizerError("sequences have different lengths: pass padding=True to return tensors")
            return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in fields.items()})
        if return_tensors is not None:
            raise TokenizerError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        return BatchEncoding({k: v[0] if single else v for k, v in fields.items()})

    def _pad(
        self,
        fields: dict[str, list],
        padding: bool | str,
        max_length: int | None,
        side: str,
        multiple: int | None,
    ) -> None:
        if self.pad_token_id is None:
            raise TokenizerError("padding needs a pad token: set tokenizer.pad_token (e.g. to the eos token)")
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {side!r}")
        ids = fields["input_ids"]
        target = max_length if padding == "max_length" and max_length else max(len(x) for x in ids)
        if multiple:
            target = -(-target // multiple) * multiple
        fill = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": 0,
            "offset_mapping": (0, 0),
        }
        for key, rows in fields.items():
            for r, x in enumerate(rows):
                pad = [fill[key]] * max(target - len(x), 0)
                rows[r] = pad + x if side == "left" else x + pad

    def decode(
        self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        return _clean_up(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    # ---- chat templates -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_tensors: str | None = None,
        return_dict: bool = True,
        chat_template: str | None = None,
        tools: list | None = None,
        documents: list | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ):
        """Render messages with the model's chat template; token ids (in a BatchEncoding) when tokenize."""
        template = self.get_chat_template(chat_template, tools)
        text = render_chat_template(
            template,
            conversation,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **self.special_tokens,
            **template_kwargs,
        )
        if continue_final_message:
            final = conversation[-1]["content"]
            if isinstance(final, str) and final.strip() in text:
                text = text[: text.rindex(final.strip()) + len(final.strip())]
        if not tokenize:
            return text
        enc = self(text, add_special_tokens=False, return_tensors=return_tensors)
        return enc if return_dict else enc["input_ids"]

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template apply_chat_template uses: this one, or the named one (with tools, "tool_use")."""
        template = chat_template if chat_template is not None else self.chat_template
        if isinstance(template, dict):
            name = (
                chat_template
                if isinstance(chat_template, str) and chat_template in template
                else ("tool_use" if tools and "tool_use" in template else "default")
            )
            template = template.get(name)
        if not template:
            raise TokenizerError(
                f"{self.name_or_path or 'tokenizer'}: no chat template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja)"
            )
        return template

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template), both or neither."""
        cfg = {k: v for k, v in self.init_kwargs.items() if k not in _SPECIAL and k != "chat_template"}
        cfg.update(self.special_tokens)
        cfg["padding_side"] = self.padding_side
        cfg["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.model_max_length:
            cfg["model_max_length"] = self.model_max_length
        if self.chat_template:
            cfg["chat_template"] = (
                self.chat_template
                if isinstance(self.chat_template, str)
                else [{"name": k, "template": v} for k, v in self.chat_template.items()]
            )
        texts = (self.backend.to_str(), json.dumps(cfg, indent=2, ensure_ascii=False))
        with atomic_directory(directory, owned=TOKENIZER_FILES.__contains__) as tmp:
            for name, text in zip(TOKENIZER_FILES, texts):
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)


def _clean_up(text: str) -> str:
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(dir_or_repo_id, gguf_file=None)`."""

    from_pretrained = staticmethod(Tokenizer.from_pretrained)
