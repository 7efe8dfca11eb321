"""Special tokens and the vocabulary, with transformers' names: `bos_token` / `bos_token_id` (settable, ids too),
`special_tokens_map`, `all_special_tokens`, `add_special_tokens`, `add_tokens`, `convert_*`."""

from __future__ import annotations

from typing import Any

from ..errors import TokenizerError

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order
SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def token_content(value: Any) -> str | None:
    """A token as a string: a serialized AddedToken ({"content": ...}) or an AddedToken gives its content."""
    if isinstance(value, dict):
        value = value.get("content")
    elif hasattr(value, "content") and not isinstance(value, str):
        value = value.content
    return value if isinstance(value, str) else None


def _token_property(key: str) -> property:
    def get(self) -> str | None:
        return self.special_tokens.get(key)

    def set_(self, value: Any) -> None:
        if value is not None and token_content(value) is None:
            raise TokenizerError(f"{key} must be a string (or an AddedToken), got {value!r}")
        self.special_tokens[key] = token_content(value)

    return property(get, set_, doc=f"transformers' `{key}`: the token's text, or None; settable.")


def _id_property(key: str) -> property:
    def get(self) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    def set_(self, value: int | None) -> None:
        # as transformers: setting the id sets the token that id stands for
        token = None if value is None else self.backend.id_to_token(int(value))
        if value is not None and token is None:
            raise TokenizerError(f"{key}_id={value!r} is not in the vocabulary (size {len(self)})")
        self.special_tokens[key] = token

    return property(get, set_, doc=f"transformers' `{key}_id`: the token's id, or None; settable.")


class SpecialTokens:
    """The special-token and vocabulary half of Tokenizer; `self.backend` is a `tokenizers.Tokenizer` and
    `self.special_tokens` maps bos_token, ... and additional_special_tokens to strings."""

    backend: Any
    special_tokens: dict[str, Any]

    bos_token, bos_token_id = _token_property("bos_token"), _id_property("bos_token")
    eos_token, eos_token_id = _token_property("eos_token"), _id_property("eos_token")
    unk_token, unk_token_id = _token_property("unk_token"), _id_property("unk_token")
    sep_token, sep_token_id = _token_property("sep_token"), _id_property("sep_token")
    pad_token, pad_token_id = _token_property("pad_token"), _id_property("pad_token")
    cls_token, cls_token_id = _token_property("cls_token"), _id_property("cls_token")
    mask_token, mask_token_id = _token_property("mask_token"), _id_property("mask_token")
    pad_token_type_id = 0

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set (transformers 5: without the additional ones)."""
        return {k: self.special_tokens[k] for k in SPECIAL if self.special_tokens.get(k) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens (bos, eos, unk, ...) then the additional ones, without repeats."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.additional_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.all_special_tokens]

    @property
    def additional_special_tokens(self) -> list[str]:
        return list(self.special_tokens.get("additional_special_tokens") or [])

    extra_special_tokens = additional_special_tokens  # transformers 5's name for them

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where an id is a special token's (ids that already hold their special tokens, as transformers)."""
        if not already_has_special_tokens:
            raise TokenizerError(
                "get_special_tokens_mask needs already_has_special_tokens=True (autolm's tokenizer adds special "
                "tokens through tokenizer.json's post-processor: use return_special_tokens_mask=True when encoding)"
            )
        special = set(self.all_special_ids)
        return [1 if int(t) in special else 0 for t in token_ids_0]

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
            if key in ("additional_special_tokens", "extra_special_tokens"):
                extra = [token_content(v) for v in value]
                added += self.add_tokens(extra, special_tokens=True)
                old = [] if replace_additional_special_tokens else self.additional_special_tokens
                self.special_tokens["additional_special_tokens"] = old + [t for t in extra if t not in old]
            elif key in SPECIAL:
                token = token_content(value)
                added += self.add_tokens([token], special_tokens=True)
                self.special_tokens[key] = token
            else:
                raise TokenizerError(
                    f"add_special_tokens: unknown key {key!r} (expected one of {SPECIAL} "
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

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return dict(self.backend.get_added_tokens_decoder())

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(i) for i in ids if i not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Tokens back to text through tokenizer.json's decoder (joined by spaces without one), as transformers."""
        decoder = self.backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)
