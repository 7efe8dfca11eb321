"""AutoModelForTokenClassification with only the import changed: a token classifier transformers saved gives its
logits and loss (the `score` head of the newer families, `classifier` of the older ones), a causal checkpoint gets
a fresh head that transformers loads back, a training step's gradients are transformers', and peft's TOKEN_CLS
adapters (the head trained beside the adapter) save and load as peft's."""

from __future__ import annotations

import logging

import pytest
import torch

import autolm

IDS = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [0, 0, 0, 3, 4, 5]])
MASK = (IDS != 0).long()
LABELS = torch.tensor([[0, 1, 2, 1, -100, -100], [2, 2, 0, 1, 0, 1], [-100, -100, -100, 1, 0, 2]])


def _token_classifier(checkpoint, name, tmp_path, **kwargs):
    """transformers' token classifier on a tiny causal checkpoint (its head drawn by transformers; kwargs: config
    keys), saved; the directory and transformers' model loaded back from it."""
    import transformers

    directory, _ = checkpoint(name)
    config = transformers.AutoConfig.from_pretrained(directory, num_labels=3)
    for key, value in kwargs.items():  # saved in config.json (transformers 5 drops unknown load arguments)
        setattr(config, key, value)
    model = transformers.AutoModelForTokenClassification.from_pretrained(directory, config=config)
    model.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok", transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "tok")


@pytest.mark.parametrize(
    "name,head",
    [("llama_gqa_llama3_sharded", "score"), ("qwen2_tied_bias", "score"), ("gpt_neox", "classifier"),
     ("falcon_40b", "classifier")],
)  # fmt: skip
def test_a_saved_token_classifier_gives_transformers_logits_and_loss(checkpoint, tmp_path, name, head):
    directory, ref = _token_classifier(checkpoint, name, tmp_path)
    got = autolm.AutoModelForTokenClassification.from_pretrained(directory)
    assert type(got).__name__ == type(ref).__name__ and got.lm_head is None
    assert getattr(got, head).bias is not None and got.state_dict().keys() == ref.state_dict().keys()
    ref.eval()
    with torch.no_grad():
        want, have = (m(input_ids=IDS, attention_mask=MASK, labels=LABELS) for m in (ref, got))
    assert have.logits.shape == (3, 6, 3) and list(have.keys()) == list(want.keys())
    real = MASK.bool()
    torch.testing.assert_close(have.logits[real], want.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(have.loss, want.loss, atol=1e-5, rtol=1e-5)


def test_a_causal_checkpoint_gets_a_fresh_head_that_transformers_loads_back(checkpoint, tmp_path, caplog):
    import transformers

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    with caplog.at_level(logging.WARNING, logger="autolm"):
        model = autolm.AutoModelForTokenClassification.from_pretrained(directory, num_labels=5)
    assert "newly initialized" in caplog.text and "score.weight" in caplog.text
    assert model.score.weight.shape == (5, model.config.hidden_size) and not model.score.bias.any()
    assert 0.005 < float(model.score.weight.detach().std()) < 0.05  # normal(0, initializer_range=0.02)
    model.save_pretrained(tmp_path / "ner")
    back = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "ner")
    assert type(back).__name__ == "LlamaForTokenClassification"
    real = MASK.bool()  # a padded position's logits are no token's
    with torch.no_grad():
        torch.testing.assert_close(
            model(IDS, attention_mask=MASK).logits[real], back(IDS, attention_mask=MASK).logits[real]
        )


def test_a_training_step_has_transformers_gradients(checkpoint, tmp_path):
    """In train mode with the dropout at zero (config.json's classifier_dropout) and no bias on the head
    (token_classification_bias): the loss and every parameter's gradient are transformers'."""
    directory, ref = _token_classifier(checkpoint, "qwen2_tied_bias", tmp_path, classifier_dropout=0.0,
                                       token_classification_bias=False)  # fmt: skip
    got = autolm.AutoModelForTokenClassification.from_pretrained(directory)
    assert got.dropout.p == 0.0 and got.score.bias is None and ref.score.bias is None
    losses = []
    for m in (ref, got):
        m.train()
        out = m(input_ids=IDS, attention_mask=MASK, labels=LABELS)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    theirs = dict(ref.named_parameters())
    for n, p in got.named_parameters():
        torch.testing.assert_close(p.grad, theirs[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_peft_token_cls_adapter_saves_and_loads_as_peft(checkpoint, tmp_path):
    """task_type="TOKEN_CLS": the adapter carries a trainable copy of the head (peft's modules_to_save); the
    saved adapter holds peft's tensor names, and each library loads the other's adapter with equal logits."""
    import peft

    directory, _ = _token_classifier(checkpoint, "llama_gqa_llama3_sharded", tmp_path)
    models, files = [], []
    for lib, plib in ((autolm, autolm), (__import__("transformers"), peft)):
        torch.manual_seed(0)
        base = lib.AutoModelForTokenClassification.from_pretrained(directory)
        config = plib.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], task_type="TOKEN_CLS", init_lora_weights=False
        )
        model = plib.get_peft_model(base, config).eval()
        with torch.no_grad():
            model.base_model.model.score.modules_to_save["default"].weight.add_(0.5)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any("modules_to_save.default" in n and "score" in n for n in trainable)
        out = tmp_path / f"adapter_{plib.__name__}"
        model.save_pretrained(out)
        models.append(model)
        files.append(out)
    from safetensors.torch import load_file

    ours, theirs = (load_file(f / "adapter_model.safetensors") for f in files)
    assert ours.keys() == theirs.keys() and "base_model.model.score.weight" in ours
    for lib, path in ((autolm, files[1]), (peft, files[0])):
        loaded = lib.AutoPeftModelForTokenClassification.from_pretrained(path).eval()
        source = models[0] if path == files[0] else models[1]
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(IDS, attention_mask=MASK).logits[MASK.bool()],
                source(IDS, attention_mask=MASK).logits[MASK.bool()],
                atol=1e-5,
                rtol=1e-5,
            )
