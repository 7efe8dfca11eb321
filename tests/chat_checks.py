"""Real chat templates (tests/data/chat_templates, as the models' tokenizer_config.json ship them) rendered by
autolm's tokenizer and by transformers' on the same files: the same text for each conversation, generation
prompt on and off, and each set of extra template arguments (tools, documents, enable_thinking, ...)."""

from __future__ import annotations

import json
import os

from conftest import write_char_tokenizer

import autolm

TEMPLATES = os.path.join(os.path.dirname(__file__), "data", "chat_templates")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a prime."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\nHello!"},
    ],
]


def tokenizers(directory, template_name: str, **special):
    """(autolm's, transformers') tokenizer of a character-level vocabulary with this chat template."""
    import transformers
    from tokenizers import AddedToken, Tokenizer

    os.makedirs(directory, exist_ok=True)
    write_char_tokenizer(str(directory))
    # the special tokens as real tokenizers hold them: added tokens, matched whole in a rendered template
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<s>", "</s>")])
    tok.save(os.path.join(directory, "tokenizer.json"))
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(os.path.join(TEMPLATES, template_name)) as f:
        config["chat_template"] = f.read()
    config.update(special)
    with open(path, "w") as f:
        json.dump(config, f)
    return autolm.AutoTokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(
        directory
    )


def check_chat_template(
    directory, template_name: str, conversations=CONVERSATIONS, variants=({},), **special
):
    """Every conversation renders as transformers renders it, with and without the generation prompt, under
    each variant's extra arguments; returns autolm's tokenizer."""
    ours, theirs = tokenizers(directory, template_name, **special)
    for msgs in conversations:
        for gen in (True, False):
            for extra in variants:
                text = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False, **extra)
                assert text == theirs.apply_chat_template(
                    msgs, add_generation_prompt=gen, tokenize=False, **extra
                ), (
                    msgs,
                    gen,
                    extra,
                )
    return ours


def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """An `autolm` command run in this process (its parser and its function; tests/test_cli.py runs the real entry
    point in processes of its own): (exit status, stdout, stderr), with `env` the environment variables it sees."""
    import contextlib
    import io

    import pytest

    from autolm.cli import build_parser
    from autolm.errors import AutolmError

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key, value in env.items():
            mp.setenv(key, value)
        parsed = build_parser().parse_args(list(args))
        parsed.argv = list(args)
        try:
            code = parsed.func(parsed)
        except AutolmError as e:  # as autolm.cli.main reports it
            print(f"autolm {parsed.command}: error: {e}", file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


def check_cli(family, template_name: str, tmp_path_factory, tmp_path, shown: str) -> None:
    """`autolm generate --chat` on the family's checkpoint with this chat template answers with transformers'
    greedy tokens; `autolm inspect` prints `shown` (the class and model type)."""
    import shutil

    src, hf = family.checkpoint(tmp_path_factory)
    directory = tmp_path / "model"
    shutil.copytree(src, directory)
    # transformers reads the tokenizer on its own (next to the config it could pick the family's tokenizer class)
    _, tok = tokenizers(tmp_path / "tokenizer", template_name)
    for f in os.listdir(tmp_path / "tokenizer"):
        shutil.copy(tmp_path / "tokenizer" / f, directory)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=False)  # fmt: skip
    out = hf.generate(ids, max_new_tokens=8, do_sample=False)
    want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def cli(*args):
        code, out, err = run_cli(*args, env={"AUTOLM_HOME": str(tmp_path / "home"), "AUTOLM_EAGER": "1"})
        assert code == 0, err
        return out

    assert cli("generate", str(directory), "Hi", "--chat", "--max-new-tokens", "8").strip() == want.strip()
    assert shown in cli("inspect", str(directory))


def check_cli_without_template(family, tmp_path_factory, tmp_path, shown: str) -> None:
    """For a model that ships no chat template: `autolm generate` prints transformers' greedy continuation;
    `autolm inspect` prints `shown` (the class and model type); `autolm chat` says there is no chat template."""
    import shutil

    directory, hf = family.checkpoint(tmp_path_factory)
    model_dir = tmp_path / "model"
    shutil.copytree(directory, model_dir)
    write_char_tokenizer(str(model_dir))

    def cli(*args):
        return run_cli(*args, env={"AUTOLM_HOME": str(tmp_path / "home"), "AUTOLM_EAGER": "1"})

    code, out, err = cli("generate", str(model_dir), "Hello", "--max-new-tokens", "8")
    assert code == 0, err
    tok = autolm.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok("Hello", return_tensors="pt")["input_ids"]
    new = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    want = tok.decode(new, skip_special_tokens=True)
    assert want and want in out
    code, out, err = cli("inspect", str(model_dir))
    assert code == 0 and shown in out, err
    code, out, err = cli("chat", str(model_dir), "--prompt", "Hi")
    assert code != 0 and "no chat template" in err
