"""A tokenizer's files: tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, chat_template.jinja)
read into the parts a Tokenizer is built from, and written back."""

from __future__ import annotations

import json
import os
from typing import Any

from .._util import atomic_directory, read_json
from ..chat_template import MAX_TEMPLATE_OUTPUT
from ..errors import TokenizerError
from .special import SPECIAL, token_content

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what save_pretrained always writes
# and the chat templates' files, as transformers saves them
TEMPLATE_FILES = ("chat_template.jinja", "additional_chat_templates")
SAVED_FILES = TOKENIZER_FILES + TEMPLATE_FILES  # what a save replaces in its folder
# transformers' loading switches that mean nothing here: autolm always runs the fast `tokenizers` backend
IGNORED_KWARGS = ("use_fast", "trust_remote_code", "legacy", "add_prefix_space")
# sentencepiece models a slow tokenizer reads (GPT-SW3's and T5's spiece.model, Llama's tokenizer.model, ...)
SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "sentencepiece.model")


def _read_json(path: str) -> dict[str, Any]:
    """An optional JSON config file: {} when absent."""
    return read_json(path, TokenizerError) if os.path.isfile(path) else {}


def _read_backend(directory: str):
    from tokenizers import Tokenizer as Backend

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        spm = [f for f in SENTENCEPIECE_FILES if os.path.isfile(os.path.join(directory, f))]
        only = f", only the sentencepiece model {spm[0]}, which autolm does not read" if spm else ""
        raise TokenizerError(
            f"{directory}: no tokenizer.json{only} (autolm reads tokenizers in the tokenizer.json format)"
        )
    try:
        return Backend.from_file(path)
    except Exception as e:  # the Rust library raises plain Exceptions for every parse error
        raise TokenizerError(f"{path}: cannot be parsed as a tokenizer ({e})") from None


def _read_jinja(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(MAX_TEMPLATE_OUTPUT + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read as UTF-8 text ({e})") from None


def _template_files(directory: str) -> dict[str, str]:
    """Templates in files, as transformers saves them: chat_template.jinja ("default") and, for named ones,
    additional_chat_templates/<name>.jinja."""
    found = {}
    if os.path.isfile(os.path.join(directory, "chat_template.jinja")):
        found["default"] = _read_jinja(os.path.join(directory, "chat_template.jinja"))
    extra = os.path.join(directory, "additional_chat_templates")
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja") and os.path.isfile(os.path.join(extra, name)):
                found[name.removesuffix(".jinja")] = _read_jinja(os.path.join(extra, name))
    return found


def _read_template(directory: str, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The chat template: templates in files (_template_files) replace tokenizer_config.json's, as in
    transformers; one default template is a string, several a {name: template} dict, as is a list in the config."""
    files = _template_files(directory)
    if files:
        return files["default"] if list(files) == ["default"] else files
    template: Any = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        if not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template
        ):
            raise TokenizerError(
                f"{directory}/tokenizer_config.json: chat_template list entries must be "
                '{"name": ..., "template": ...} objects'
            )
        return {t["name"]: t["template"] for t in template}
    if template is not None and not isinstance(template, str):
        raise TokenizerError(
            f"{directory}/tokenizer_config.json: chat_template must be a string or a list, "
            f"found {type(template).__name__}"
        )
    return template


def read_tokenizer_dir(directory: str, padding_side: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of Tokenizer(...) for a tokenizer folder; `kwargs` are from_pretrained's others."""
    for k in IGNORED_KWARGS:
        kwargs.pop(k, None)
    if kwargs:
        raise TokenizerError(
            f"AutoTokenizer.from_pretrained got unsupported arguments: {', '.join(sorted(kwargs))}"
        )
    backend = _read_backend(directory)
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
    special: dict[str, Any] = {k: token_content(config.get(k, special_map.get(k))) for k in SPECIAL}
    extra = config.get("additional_special_tokens", special_map.get("additional_special_tokens"))
    extra = config.get("extra_special_tokens", extra)  # transformers 5 writes this name
    if isinstance(extra, list) and all(token_content(t) for t in extra):
        special["additional_special_tokens"] = [token_content(t) for t in extra]
    _add_declared_tokens(backend, config, special, directory)
    side = padding_side or config.get("padding_side", "right")
    if side not in ("left", "right"):
        raise TokenizerError(
            f"{directory}/tokenizer_config.json: padding_side must be 'left' or 'right', found {side!r}"
        )
    max_len = config.get("model_max_length")
    return dict(
        backend=backend,
        special_tokens=special,
        chat_template=_read_template(directory, config),
        padding_side=side,
        model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        name_or_path=directory,
        init_kwargs=config,
    )


def _add_declared_tokens(backend, config: dict[str, Any], special: dict[str, Any], directory: str) -> None:
    """As transformers: tokens tokenizer_config.json declares (`added_tokens_decoder` with their flags, then the
    named and additional special tokens) that tokenizer.json does not list as added tokens are added to the
    backend, the special ones as special (split out whole, skipped by skip_special_tokens)."""
    from tokenizers import AddedToken

    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    declared = config.get("added_tokens_decoder")
    declared = declared if isinstance(declared, dict) else {}
    if not all(k.isascii() and k.isdigit() for k in declared):
        raise TokenizerError(
            f"{directory}/tokenizer_config.json: added_tokens_decoder's keys must be token ids, found "
            f"{sorted(k for k in declared if not (k.isascii() and k.isdigit()))!r}"
        )
    entries = [e for _, e in sorted(declared.items(), key=lambda kv: int(kv[0]))]
    new = []
    for entry in entries:
        content = entry.get("content") if isinstance(entry, dict) else None
        if isinstance(content, str) and content not in present:
            flags = {
                k: bool(entry[k])
                for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                if k in entry
            }
            new.append(AddedToken(content, **flags))
            present.add(content)
    named = [v for k, v in special.items() if k in SPECIAL and v] + list(
        special.get("additional_special_tokens") or []
    )
    new += [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(named) if t not in present]
    for token in new:
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])


def _template_texts(template: str | dict[str, str] | None) -> dict[str, str]:
    """{path in the folder: text} of the chat templates as transformers saves them (read back by
    _template_files): the template, or the "default" one, as chat_template.jinja, the others by name."""
    if not template:
        return {}
    if isinstance(template, str):
        return {"chat_template.jinja": template}
    out = {}
    for name, text in template.items():
        if name == "default":
            out["chat_template.jinja"] = text
        elif not name or os.path.basename(name) != name or name.startswith("."):
            raise TokenizerError(
                f"chat template name {name!r} cannot name a file (additional_chat_templates/)"
            )
        else:
            out[f"additional_chat_templates/{name}.jinja"] = text
    return out


def write_tokenizer(tok, directory: str | os.PathLike) -> tuple[str, ...]:
    """Write tokenizer.json, tokenizer_config.json and the chat templates' files, all or none (replacing the
    templates' files a previous save left, which would otherwise win over these); their paths in the folder."""
    cfg = {
        k: v
        for k, v in tok.init_kwargs.items()
        if k not in SPECIAL
        and k not in ("chat_template", "additional_special_tokens", "extra_special_tokens")
    }
    cfg.update({k: v for k, v in tok.special_tokens.items() if v is not None})
    cfg["padding_side"] = tok.padding_side
    cfg["truncation_side"] = tok.truncation_side
    cfg["clean_up_tokenization_spaces"] = tok.clean_up_tokenization_spaces
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if tok.max_length:
        cfg["model_max_length"] = tok.max_length
    texts = dict(zip(TOKENIZER_FILES, (tok.backend.to_str(), json.dumps(cfg, indent=2, ensure_ascii=False))))
    texts.update(_template_texts(tok.chat_template))
    with atomic_directory(directory, owned=SAVED_FILES.__contains__) as tmp:
        for name, text in texts.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
    return tuple(texts)
