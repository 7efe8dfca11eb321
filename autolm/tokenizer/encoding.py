"""BatchEncoding, what a tokenizer call returns (transformers' class: a dict with attribute access, tensors on
request, and the `tokenizers` encodings behind it for tokens() / word_ids() / char_to_token()), and the padding
of already encoded inputs that `Tokenizer.pad` does."""

from __future__ import annotations

from typing import Any

from ..errors import TokenizerError


class BatchEncoding(dict):
    """input_ids / attention_mask / ... by key or attribute; `encodings` holds the `tokenizers.Encoding` of each
    row when the batch came from encoding text (None when built from ids, e.g. by `pad`)."""

    def __init__(
        self, data: dict | None = None, encodings: list | None = None, tensor_type: str | None = None
    ):
        super().__init__(data or {})
        self._encodings = encodings
        if tensor_type is not None:
            self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        if isinstance(key, int):  # transformers: an int picks the row's tokenizers.Encoding
            return self._encoding(key)
        return super().__getitem__(key)

    @property
    def data(self) -> dict:
        return dict(self)

    @property
    def encodings(self) -> list | None:
        return self.__dict__.get("_encodings")

    @property
    def is_fast(self) -> bool:
        return self.encodings is not None

    def _encoding(self, batch_index: int):
        if self.encodings is None:
            raise TokenizerError(
                "this BatchEncoding holds ids only (it was not made by encoding text): tokens(), word_ids() "
                "and char_to_token() need the tokenizer's encodings"
            )
        if not -len(self.encodings) <= batch_index < len(self.encodings):
            raise TokenizerError(f"batch_index {batch_index} is out of range for {len(self.encodings)} rows")
        return self.encodings[batch_index]

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The tokens of a row (padding included), as strings."""
        return self._encoding(batch_index).tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """Which word of the input each token comes from (None for special and padding tokens)."""
        return self._encoding(batch_index).word_ids

    words = word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """Which sequence of a pair each token belongs to (0 or 1; None for special and padding tokens)."""
        return self._encoding(batch_index).sequence_ids

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0):
        """The token holding a character: char_to_token(char) for row 0, or char_to_token(row, char)."""
        batch, char = (0, batch_or_char_index) if char_index is None else (batch_or_char_index, char_index)
        return self._encoding(batch).char_to_token(char, sequence_index)

    def token_to_word(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        batch, tok = (0, batch_or_token_index) if token_index is None else (batch_or_token_index, token_index)
        return self._encoding(batch).token_to_word(tok)

    def convert_to_tensors(self, tensor_type: str | None = None) -> BatchEncoding:
        """Every value as a tensor ('pt') or array ('np'), in place; rows must have one length."""
        if tensor_type is None:
            return self
        if tensor_type not in ("pt", "np"):
            raise TokenizerError(f"return_tensors={tensor_type!r} is not supported (use 'pt', 'np' or None)")
        import numpy as np
        import torch

        for key, value in self.items():
            if isinstance(value, (torch.Tensor, np.ndarray)):
                continue
            rows = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(r, (list, tuple)) for r in rows) and len({len(r) for r in rows}) > 1:
                raise TokenizerError(
                    f"{key}: rows have different lengths ({sorted({len(r) for r in rows})}): pass padding=True "
                    "(and truncation=True) to return tensors"
                )
            array = np.asarray(value)
            if array.dtype == object:
                raise TokenizerError(f"{key}: cannot be made a tensor (values of mixed kinds)")
            self[key] = torch.from_numpy(array).long() if tensor_type == "pt" else array
        return self

    def to(self, device) -> BatchEncoding:
        """Tensors moved to a device (other values kept), as transformers' BatchEncoding.to."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


def pad_rows(
    fields: dict[str, list],
    main: str,
    target: int,
    side: str,
    pad_id: int,
    pad_type_id: int,
    return_attention_mask: bool,
) -> dict[str, list]:
    """transformers' _pad over a batch of rows: each row of `main` (input_ids) to `target` ids on `side`, and the
    attention mask, token type ids and special-tokens mask with it; other keys are left as they are."""
    rows = fields[main]
    if return_attention_mask and "attention_mask" not in fields:
        fields["attention_mask"] = [[1] * len(r) for r in rows]
    fill = {main: pad_id, "attention_mask": 0, "token_type_ids": pad_type_id, "special_tokens_mask": 1}
    out = dict(fields)
    for key, value in fill.items():
        if key not in fields or (key == "attention_mask" and not return_attention_mask):
            continue
        padded = []
        for row, ids in zip(fields[key], rows):
            extra = [value] * max(target - len(ids), 0)
            padded.append(extra + list(row) if side == "left" else list(row) + extra)
        out[key] = padded
    return out
