"""AutoModelForQuestionAnswering with only the import changed: a QA model transformers saved gives its start and
end logits and loss (the body under `transformer` for the Llama-style families, under the causal LM's own name for
the others), its state_dict() names are transformers', a causal checkpoint gets a fresh head that transformers
loads back, a training step's gradients are transformers', and peft's QUESTION_ANS adapters (the head trained
beside the adapter) save and load as peft's."""

from __future__ import annotations

import logging

import pytest
import torch

import autolm

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [9, 10, 11, 12, 13, 14], [3, 4, 5, 6, 7, 8]])
STARTS, ENDS = torch.tensor([1, 0, 9]), torch.tensor([3, 5, 2])  # 9: past the sequence (ignored)


def _qa_model(checkpoint, name, tmp_path):
    """transformers' QA model on a tiny causal checkpoint (its head drawn by transformers), saved; the directory
    and transformers' model loaded back from it."""
    import transformers

    directory, _ = checkpoint(name)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(directory)
    model.save_pretrained(tmp_path / "qa")
    return tmp_path / "qa", transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "qa")


@pytest.mark.parametrize(
    "name,body",
    [("llama_gqa_llama3_sharded", "transformer"), ("qwen2_tied_bias", "transformer"), ("mistral", "model"),
     ("gpt_neox", "gpt_neox"), ("falcon_40b", "transformer")],
)  # fmt: skip
def test_a_saved_qa_model_gives_transformers_logits_and_loss(checkpoint, tmp_path, name, body):
    directory, ref = _qa_model(checkpoint, name, tmp_path)
    got = autolm.AutoModelForQuestionAnswering.from_pretrained(directory)
    assert type(got).__name__ == type(ref).__name__ and got.lm_head is None
    keys = got.state_dict().keys()
    assert keys == ref.state_dict().keys() and any(k.startswith(body + ".") for k in keys)
    ref.eval()
    with torch.no_grad():
        want, have = (m(input_ids=IDS, start_positions=STARTS, end_positions=ENDS) for m in (ref, got))
    assert have.start_logits.shape == (3, 6) and list(have.keys()) == list(want.keys())
    for field in ("start_logits", "end_logits", "loss"):
        torch.testing.assert_close(getattr(have, field), getattr(want, field), atol=1e-5, rtol=1e-5)
    got.load_state_dict(ref.state_dict())  # transformers' names load back


def test_a_causal_checkpoint_gets_a_fresh_head_that_transformers_loads_back(checkpoint, tmp_path, caplog):
    import transformers

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    with caplog.at_level(logging.WARNING, logger="autolm"):
        model = autolm.AutoModelForQuestionAnswering.from_pretrained(directory)
    assert "newly initialized" in caplog.text and "qa_outputs.weight" in caplog.text
    assert model.qa_outputs.weight.shape == (2, model.config.hidden_size) and not model.qa_outputs.bias.any()
    model.save_pretrained(tmp_path / "qa")
    back = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "qa")
    assert type(back).__name__ == "LlamaForQuestionAnswering"
    with torch.no_grad():
        ours, theirs = model(IDS), back(IDS)
    torch.testing.assert_close(ours.start_logits, theirs.start_logits)
    torch.testing.assert_close(ours.end_logits, theirs.end_logits)


def test_a_training_step_has_transformers_gradients(checkpoint, tmp_path):
    """The loss (with num_items_in_batch, as the Trainer passes it) and every parameter's gradient are
    transformers', under transformers' parameter names once the body's prefix is mapped."""
    directory, ref = _qa_model(checkpoint, "qwen2_tied_bias", tmp_path)
    got = autolm.AutoModelForQuestionAnswering.from_pretrained(directory)
    losses = []
    for m in (ref, got):
        m.train()
        out = m(input_ids=IDS, start_positions=STARTS, end_positions=ENDS, num_items_in_batch=torch.tensor(2))
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    theirs = dict(ref.named_parameters())
    for n, p in got.named_parameters():
        name = "transformer." + n.removeprefix("model.") if n.startswith("model.") else n
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_peft_question_ans_adapter_saves_and_loads_as_peft(checkpoint, tmp_path):
    """task_type="QUESTION_ANS": the adapter carries a trainable copy of qa_outputs (peft's modules_to_save); the
    saved adapter holds peft's tensor names (the body under `transformer`), and each library loads the other's
    adapter with equal logits."""
    import peft

    directory, _ = _qa_model(checkpoint, "llama_gqa_llama3_sharded", tmp_path)
    models, files = [], []
    for lib, plib in ((autolm, autolm), (__import__("transformers"), peft)):
        torch.manual_seed(0)
        base = lib.AutoModelForQuestionAnswering.from_pretrained(directory)
        config = plib.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], task_type="QUESTION_ANS", init_lora_weights=False
        )
        model = plib.get_peft_model(base, config).eval()
        with torch.no_grad():
            model.base_model.model.qa_outputs.modules_to_save["default"].weight.add_(0.5)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any("modules_to_save.default" in n and "qa_outputs" in n for n in trainable)
        out = tmp_path / f"adapter_{plib.__name__}"
        model.save_pretrained(out)
        models.append(model)
        files.append(out)
    from safetensors.torch import load_file

    ours, theirs = (load_file(f / "adapter_model.safetensors") for f in files)
    assert ours.keys() == theirs.keys() and "base_model.model.qa_outputs.weight" in ours
    assert any(k.startswith("base_model.model.transformer.layers.0.") for k in ours)
    for lib, path in ((autolm, files[1]), (peft, files[0])):
        loaded = lib.AutoPeftModelForQuestionAnswering.from_pretrained(path).eval()
        source = models[0] if path == files[0] else models[1]
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(IDS).start_logits, source(IDS).start_logits, atol=1e-5, rtol=1e-5
            )


def test_the_body_is_named_as_each_family_s_transformers_qa_class_names_it():
    """For every family transformers has a QA class for, autolm's QA class names its body as that class does."""
    import transformers

    from autolm.models import FAMILIES, model_class
    from autolm.models.question_answering import question_answering

    checked = 0
    for model_type, (_, config_name, _, _) in FAMILIES.items():
        family = config_name.removesuffix("Config")
        theirs = getattr(transformers, family + "ForQuestionAnswering", None)
        if theirs is None:
            continue
        if getattr(model_class(model_type), "causal_only", None):  # BART's, BERT's: refused (test below)
            continue
        ours = question_answering(model_class(model_type), family)
        assert ours.__name__ == theirs.__name__
        assert ours.qa_prefix == theirs.base_model_prefix, model_type
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("model_type", ["bert", "bart"])
def test_heads_of_encoder_models_are_refused(model_type):
    """BERT's and BART's QA, classification and base models are transformers' encoder (-decoder) models, which autolm
    does not run: asking for them names the type and what they are, rather than a causal model under their name."""
    from autolm.errors import ConfigError
    from autolm.load.build import model_class

    for head in ("question_answering", "sequence_classification", "token_classification", "base"):
        with pytest.raises(ConfigError, match=f"{model_type}: autolm loads it as a causal LM only"):
            model_class(model_type, head)
