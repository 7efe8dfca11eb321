"""Tokenizer: a `tokenizers.Tokenizer` with transformers' calling conventions (encode, call with padding,
truncation, overflow windows and pre-split words, pad, decode) plus its special tokens and chat templates."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import TokenizerError
from ..hub import HUB_KWARGS, resolve_model_dir
from .chat import ChatTemplates
from .encoding import BatchEncoding, pad_rows
from .files import SAVED_FILES, read_tokenizer_dir, write_tokenizer
from .special import SPECIAL, SpecialTokens, token_content

_TRUNCATIONS = ("longest_first", "only_first", "only_second")
# transformers' cleanup of spaces before punctuation, meant for WordPiece vocabularies
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length where a tokenizer's config sets none


class Tokenizer(SpecialTokens, ChatTemplates):
    """Wraps a `tokenizers.Tokenizer` with transformers' calling conventions."""

    saved_files = SAVED_FILES  # what save_pretrained writes (and may replace)
    is_fast = True

    def __init__(
        self,
        backend=None,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | dict[str, str] | None = None,
        padding_side: str = "right",
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
        init_kwargs: dict[str, Any] | None = None,
        *,
        tokenizer_object=None,
        tokenizer_file: str | None = None,
        **tokens: Any,
    ):
        """autolm's own arguments, or transformers' PreTrainedTokenizerFast ones: tokenizer_object= (a `tokenizers`
        Tokenizer) or tokenizer_file= (a tokenizer.json), and the special tokens as keywords (bos_token=...)."""
        unknown = sorted(set(tokens) - set(SPECIAL))
        if unknown:
            raise TokenizerError(
                f"Tokenizer() got unknown arguments {unknown} (special tokens: {', '.join(SPECIAL)})"
            )
        if backend is None and tokenizer_object is None and tokenizer_file is not None:
            import tokenizers

            tokenizer_object = tokenizers.Tokenizer.from_file(os.fspath(tokenizer_file))
        backend = backend if backend is not None else tokenizer_object
        if backend is None:
            raise TokenizerError(
                "Tokenizer() needs a tokenizers.Tokenizer: tokenizer_object= or tokenizer_file="
            )
        self.backend = backend
        special_tokens = {**(special_tokens or {}), **{k: token_content(v) for k, v in tokens.items()}}
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.init_kwargs = init_kwargs or {}
        self.truncation_side = self.init_kwargs.get("truncation_side", "right")
        self.max_length = model_max_length  # None: the tokenizer's config sets none
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path
        names = self.init_kwargs.get("model_input_names")
        self.model_input_names = list(names) if isinstance(names, list) else ["input_ids", "attention_mask"]

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
        from ..sources.gguf_tokenizer import tokenizer_parts

        backend, special, template, init = tokenizer_parts(path)
        return cls(backend, special, template, name_or_path=path, init_kwargs=init)

    @classmethod
    def from_dir(cls, directory: str, padding_side: str | None = None, **kwargs: Any) -> Tokenizer:
        return cls(**read_tokenizer_dir(directory, padding_side, kwargs))

    @property
    def backend_tokenizer(self):
        """transformers' name for the `tokenizers.Tokenizer` inside."""
        return self.backend

    def save_pretrained(self, directory: str | os.PathLike, **_: Any) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and the chat templates (chat_template.jinja, and named
        ones in additional_chat_templates/, as transformers writes them), all or none; the paths written."""
        return tuple(os.path.join(os.fspath(directory), n) for n in write_tokenizer(self, directory))

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, text, text_pair=None, add_special_tokens: bool = True, **kwargs: Any):
        return self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False, **_: Any
    ) -> list[str]:
        return self.backend.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    @property
    def model_max_length(self) -> int:
        """transformers' model_max_length: the config's, else its VERY_LARGE_INTEGER (int(1e30)), so code that
        takes min(tok.model_max_length, n) runs."""
        return self.max_length if self.max_length is not None else VERY_LARGE_INTEGER

    @model_max_length.setter
    def model_max_length(self, value: int | None) -> None:
        self.max_length = None if value is None or value >= VERY_LARGE_INTEGER else int(value)

    def __call__(
        self,
        text: str | Sequence | None = None,
        text_pair: str | Sequence | None = None,
        text_target: str | Sequence | None = None,
        text_pair_target: str | Sequence | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Encode one text (or pair, or pre-split words) or a batch: truncate (with overflow windows of `stride`
        tokens when return_overflowing_tokens), pad, and return lists or tensors, as transformers' fast tokenizer.
        text_target (and text_pair_target): encoded the same way, their ids as `labels` (alone: the targets')."""
        if text_target is not None:
            kwargs = {k: v for k, v in locals().items() if k not in ("self", "text", "text_pair", "text_target",
                                                                       "text_pair_target", "__class__")}  # fmt: skip
            labels = self(text_target, text_pair_target, **kwargs)
            if text is None:
                return labels
            out = self(text, text_pair, **kwargs)
            out["labels"] = labels["input_ids"]
            return out
        if text is None:
            raise TokenizerError("pass `text` or `text_target` to encode")
        batched = (
            isinstance(text, (list, tuple)) and bool(text) and isinstance(text[0], (list, tuple))
            if is_split_into_words
            else isinstance(text, (list, tuple))
        )
        texts = list(text) if batched else [text]
        if text_pair is not None:
            pairs = list(text_pair) if batched else [text_pair]
            if len(pairs) != len(texts):
                raise TokenizerError(f"text_pair has {len(pairs)} entries for {len(texts)} texts")
            texts = list(zip(texts, pairs))
        if truncation is None and max_length is not None and padding in (False, None, "do_not_pad"):
            truncation = True  # transformers: max_length alone truncates (with a warning there)
        encodings = self._encode(texts, add_special_tokens, is_split_into_words, padding, truncation,
                                 max_length, stride, pad_to_multiple_of, padding_side)  # fmt: skip
        rows = [
            e for enc in encodings for e in ([enc, *enc.overflowing] if return_overflowing_tokens else [enc])
        ]
        fields: dict[str, list] = {"input_ids": [e.ids for e in rows]}
        wanted = (
            ("token_type_ids", return_token_type_ids, "type_ids"),
            ("attention_mask", return_attention_mask, "attention_mask"),
            ("special_tokens_mask", return_special_tokens_mask, "special_tokens_mask"),
            ("offset_mapping", return_offsets_mapping, "offsets"),
        )
        for key, flag, attr in wanted:
            if flag or (flag is None and key in self.model_input_names):
                fields[key] = [list(getattr(e, attr)) for e in rows]
        if return_length:
            fields["length"] = [len(e.ids) for e in rows]
        if return_overflowing_tokens:
            fields["overflow_to_sample_mapping"] = [
                i for i, enc in enumerate(encodings) for _ in range(1 + len(enc.overflowing))
            ]
        out = BatchEncoding(fields, rows, tensor_type=return_tensors)
        if not batched and return_tensors is None and not return_overflowing_tokens:
            out = BatchEncoding(
                {k: v[0] if v and isinstance(v[0], list) else v for k, v in out.items()}, rows
            )
        return out

    def _encode(self, inputs, special, split, padding, truncation, max_length, stride, multiple, side):
        """tokenizers' encode_batch with truncation and padding set for this call only (as transformers does)."""
        limit = strategy = pad = None
        if truncation not in (None, False, "do_not_truncate"):
            strategy = "longest_first" if truncation is True else truncation
            if strategy not in _TRUNCATIONS:
                raise TokenizerError(
                    f"truncation={truncation!r} is not supported (True or one of {_TRUNCATIONS})"
                )
            limit = max_length or self.max_length
            if limit is None:
                raise TokenizerError(
                    "truncation=True needs max_length (the tokenizer has no model_max_length)"
                )
        if padding not in (None, False, "do_not_pad"):
            if padding not in (True, "longest", "max_length"):
                raise TokenizerError(
                    f"padding={padding!r} is not supported (True, 'longest' or 'max_length')"
                )
            side = side or self.padding_side
            if side not in ("left", "right"):
                raise TokenizerError(f"padding_side must be 'left' or 'right', got {side!r}")
            length = (max_length or self.max_length) if padding == "max_length" else None
            pad = dict(direction=side, pad_id=self._pad_id(), pad_token=self.pad_token,
                       pad_type_id=self.pad_token_type_id, length=length, pad_to_multiple_of=multiple)  # fmt: skip
        backend = self.backend
        try:
            if strategy is not None:
                backend.enable_truncation(
                    limit, stride=stride, strategy=strategy, direction=self.truncation_side
                )
            if pad is not None:
                backend.enable_padding(**pad)
            return backend.encode_batch(inputs, add_special_tokens=special, is_pretokenized=split)
        except (
            Exception
        ) as e:  # the Rust library raises plain Exceptions (a pair too long to truncate, bad input)
            raise TokenizerError(f"cannot encode the text: {e}") from None
        finally:
            backend.no_truncation()
            backend.no_padding()

    def _pad_id(self) -> int:
        if self.pad_token_id is None:
            raise TokenizerError(
                "padding needs a pad token: set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        return self.pad_token_id

    def pad(
        self,
        encoded_inputs,
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Pad encoded inputs (a dict of rows, or a list of dicts as a DataLoader collates them) as transformers'
        `pad`: input_ids with the pad id, attention_mask, token_type_ids and special_tokens_mask with them."""
        if (
            isinstance(encoded_inputs, (list, tuple))
            and encoded_inputs
            and isinstance(encoded_inputs[0], Mapping)
        ):
            encoded_inputs = {k: [row[k] for row in encoded_inputs] for k in encoded_inputs[0]}
        if not isinstance(encoded_inputs, Mapping) or "input_ids" not in encoded_inputs:
            raise TokenizerError("pad: expected an encoding (or a list of them) with input_ids")
        fields = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in encoded_inputs.items()}
        if return_tensors is None and any(hasattr(v, "tolist") for v in encoded_inputs.values()):
            return_tensors = "pt"  # tensors in, tensors out, as transformers
        single = bool(fields["input_ids"]) and not isinstance(fields["input_ids"][0], (list, tuple))
        if single:
            fields = {k: [v] for k, v in fields.items()}
        keep_mask = (
            return_attention_mask
            if return_attention_mask is not None
            else "attention_mask" in self.model_input_names
        )
        rows = fields["input_ids"]
        target = max((len(r) for r in rows), default=0)
        if padding == "max_length":
            target = max_length or self.max_length or target
        if pad_to_multiple_of and target % pad_to_multiple_of:
            target = (target // pad_to_multiple_of + 1) * pad_to_multiple_of
        side = padding_side or self.padding_side
        if padding not in (False, None, "do_not_pad"):
            fields = pad_rows(
                fields, "input_ids", target, side, self._pad_id(), self.pad_token_type_id, keep_mask
            )
        elif keep_mask and "attention_mask" not in fields:
            fields["attention_mask"] = [[1] * len(r) for r in rows]
        if single:
            fields = {k: v[0] for k, v in fields.items()}
        return BatchEncoding(fields, tensor_type=return_tensors)

    # ---- decoding -----------------------------------------------------------------------------

    def decode(
        self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None, **_
    ):
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
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
        # as transformers 5: the cleanup is skipped for BPE vocabularies, where it removes real spaces
        if clean and (
            type(self.backend.model).__name__ != "BPE"
            or self.init_kwargs.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        ):
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(dir_or_repo_id, gguf_file=None)`."""

    from_pretrained = staticmethod(Tokenizer.from_pretrained)
