"""apply_chat_template with transformers' semantics: one conversation or a batch of them (one row each), tools as
JSON schemas or Python functions, documents, continue_final_message, and tokenizing with padding/truncation."""

from __future__ import annotations

from typing import Any

from ..chat_template import render_tracked
from ..errors import TokenizerError
from .tool_schema import tool_schemas


def _conversations(conversation: Any) -> tuple[list[list[dict]], bool]:
    """(the conversations, whether a batch was given); messages lose their None-valued keys, as transformers
    drops them (OpenAI clients send content=None / tool_calls=None, which many templates render as "None")."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise TokenizerError("apply_chat_template: a conversation is a non-empty list of messages")
    first = conversation[0]
    batched = isinstance(first, (list, tuple)) or hasattr(first, "messages")
    chats = [getattr(c, "messages", c) for c in conversation] if batched else [conversation]
    out = []
    for chat in chats:
        if not isinstance(chat, (list, tuple)) or not all(isinstance(m, dict) for m in chat):
            raise TokenizerError(
                "apply_chat_template: each message must be a dict such as {'role': ..., 'content': ...}"
            )
        out.append([{k: v for k, v in m.items() if v is not None} for m in chat])
    return out, batched


def _continue_final(text: str, chat: list[dict]) -> str:
    """Cut the rendering after the final message's text, so the model continues it."""
    final = chat[-1].get("content")
    if isinstance(final, list):  # content parts: the last text part
        final = next((p.get("text") for p in reversed(final) if isinstance(p, dict) and "text" in p), None)
    if not isinstance(final, str):
        raise TokenizerError("continue_final_message: the final message has no text content to continue")
    if final.strip() in text:
        text = text[: text.rindex(final.strip()) + len(final.strip())]
    return text


def _assistant_masks(enc, spans: list[list[tuple[int, int]]], batched: bool, return_tensors) -> None:
    """enc["assistant_masks"]: 1 for the tokens of each {% generation %} block's characters, as transformers
    marks them (the tokens from the one holding the block's first character to the one holding its last)."""
    rows = enc["input_ids"] if batched or return_tensors else [enc["input_ids"]]
    masks = []
    for i, row in enumerate(rows):
        mask = [0] * len(row)
        for start, end in spans[i]:
            first, last = enc.char_to_token(i, start), enc.char_to_token(i, end - 1)
            if first is None:  # truncated away
                break
            for t in range(first, last + 1 if last else len(row)):
                mask[t] = 1
        masks.append(mask)
    enc["assistant_masks"] = masks if batched or return_tensors else masks[0]
    if return_tensors:
        enc.convert_to_tensors(return_tensors)


class ChatTemplates:
    """The chat-template half of Tokenizer."""

    chat_template: str | dict[str, str] | None
    name_or_path: str

    def apply_chat_template(
        self,
        conversation: list,
        tools: list | None = None,
        documents: list | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ):
        """Render messages (or a batch of conversations) with the chat template: the text, or token ids in a
        BatchEncoding (return_dict=False: the ids alone) when tokenize."""
        if return_assistant_tokens_mask and not (return_dict and tokenize):
            raise TokenizerError("return_assistant_tokens_mask=True needs return_dict=True and tokenize=True")
        if return_assistant_tokens_mask and continue_final_message:
            raise TokenizerError("continue_final_message is not compatible with return_assistant_tokens_mask")
        if continue_final_message and add_generation_prompt:
            raise TokenizerError(
                "continue_final_message and add_generation_prompt cannot both be set: the first continues the "
                "last message, the second starts a new assistant message"
            )
        chats, batched = _conversations(conversation)
        template = self.get_chat_template(chat_template, tools)
        context = {**self.special_tokens_map, **template_kwargs}
        schemas = tool_schemas(tools)
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise TokenizerError("documents must be a list of dicts (with 'title' and 'text' keys)")
        texts, spans = [], []
        for chat in chats:
            text, blocks = render_tracked(
                template,
                chat,
                add_generation_prompt=add_generation_prompt,
                tools=schemas,
                documents=documents,
                **context,
            )
            texts.append(_continue_final(text, chat) if continue_final_message else text)
            spans.append(blocks)
        if not tokenize:
            return texts if batched else texts[0]
        enc = self(
            texts if batched else texts[0],
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        if return_assistant_tokens_mask:
            _assistant_masks(enc, spans, batched, return_tensors)
        return enc if return_dict else enc["input_ids"]

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template apply_chat_template uses: this one, or the named one (with tools, "tool_use")."""
        template = chat_template if chat_template is not None else self.chat_template
        if isinstance(self.chat_template, dict) and (
            chat_template is None or chat_template in self.chat_template
        ):
            name = chat_template or ("tool_use" if tools and "tool_use" in self.chat_template else "default")
            template = self.chat_template.get(name)
        if not template:
            raise TokenizerError(
                f"{self.name_or_path or 'tokenizer'}: no chat template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja)"
            )
        return template
