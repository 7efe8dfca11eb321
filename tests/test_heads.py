"""The other heads with only the import changed. AutoModelForSequenceClassification: a classifier checkpoint
transformers saved gives its logits and losses; a causal LM's checkpoint loads with a fresh `score` head (a reward
model's start) that transformers loads back; TRL's RewardTrainer and peft's SEQ_CLS adapters train it as
transformers' model. AutoModel: the body alone, as embedding models use it, and its checkpoints and adapters in
transformers' and peft's names for a base model."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import write_char_tokenizer

import autolm
import autolm.lora
from autolm.errors import ConfigError

# rows right-padded with the pad token (0), one full row, a left-padded one
IDS = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [0, 0, 0, 3, 4, 5]])
MASK = (IDS != 0).long()


def _classifier(checkpoint, name, tmp_path, **kwargs):
    """transformers' classifier on a tiny causal checkpoint (its head drawn by transformers), saved; the
    directory and transformers' model loaded back from it."""
    import transformers

    directory, _ = checkpoint(name)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, pad_token_id=0, **kwargs
    )
    model.save_pretrained(tmp_path / "cls")
    return tmp_path / "cls", transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")


@pytest.mark.parametrize(
    "name", ["llama_gqa_llama3_sharded", "qwen2_tied_bias", "gemma2", "phi3_longrope", "mixtral"]
)
def test_a_saved_classifier_gives_transformers_logits_and_loss(checkpoint, tmp_path, name):
    directory, ref = _classifier(checkpoint, name, tmp_path, num_labels=3)
    got = autolm.AutoModelForSequenceClassification.from_pretrained(directory)
    assert type(got).__name__ == type(ref).__name__ and got.config.id2label == ref.config.id2label
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        want, have = (m(input_ids=IDS, attention_mask=MASK, labels=labels) for m in (ref, got))
    assert have.logits.shape == (3, 3)
    torch.testing.assert_close(have.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(have.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert got.config.problem_type == ref.config.problem_type == "single_label_classification"


def test_problem_types_as_transformers(checkpoint, tmp_path):
    """Regression for one label, multi-label for float labels, and a problem_type given at load."""
    for kwargs, labels in (
        ({"num_labels": 1}, torch.tensor([0.5, -1.0, 2.0])),
        ({"num_labels": 2}, torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])),
        ({"num_labels": 2, "problem_type": "regression"}, torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])),
    ):
        directory, ref = _classifier(checkpoint, "llama_gqa_llama3_sharded", tmp_path, **kwargs)
        got = autolm.AutoModelForSequenceClassification.from_pretrained(directory)
        with torch.no_grad():
            want, have = (m(input_ids=IDS, attention_mask=MASK, labels=labels) for m in (ref, got))
        torch.testing.assert_close(have.loss, want.loss, atol=1e-5, rtol=1e-5)
        assert got.config.problem_type == ref.config.problem_type


def test_label_maps_given_at_load_as_the_classification_tutorial(checkpoint, tmp_path):
    """from_pretrained(..., num_labels=2, id2label=..., label2id=...) as transformers' text classification guide
    writes it: the config takes the maps (saved as transformers saves them), the head has one row per label."""
    import transformers

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    kwargs = {
        "num_labels": 2,
        "id2label": {0: "NEGATIVE", 1: "POSITIVE"},
        "label2id": {"NEGATIVE": 0, "POSITIVE": 1},
    }
    ref, got = (lib.AutoModelForSequenceClassification.from_pretrained(directory, **kwargs)
                for lib in (transformers, autolm))  # fmt: skip
    assert got.config.id2label == ref.config.id2label and got.config.label2id == ref.config.label2id
    assert got.score.weight.shape == ref.score.weight.shape == (2, ref.config.hidden_size)
    got.save_pretrained(tmp_path / "saved")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "saved").id2label == ref.config.id2label


def test_a_causal_checkpoint_gets_a_fresh_head_that_transformers_loads_back(checkpoint, tmp_path, caplog):
    import transformers

    directory, _ = checkpoint("llama_gqa_llama3_sharded")  # untied: its lm_head.weight is skipped
    with caplog.at_level(logging.WARNING, logger="autolm"):
        model = autolm.AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1)
    assert "newly initialized" in caplog.text and "score.weight" in caplog.text
    assert model.score.weight.shape == (1, model.config.hidden_size) and model.lm_head is None
    assert 0.005 < float(model.score.weight.detach().std()) < 0.05  # normal(0, initializer_range=0.02)
    model.config.pad_token_id = 0
    model.save_pretrained(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and saved["id2label"] == {
        "0": "LABEL_0"
    }
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(
            model(IDS, attention_mask=MASK).logits, back(IDS, attention_mask=MASK).logits
        )
    with pytest.raises(ConfigError, match="pad_token_id"):
        model.config.pad_token_id = None
        model(IDS)
    with pytest.raises(ConfigError, match="no LM head"):
        model.generate(IDS[:1])


def test_reward_trainer_trains_an_autolm_model_as_transformers(checkpoint, tmp_path):
    """TRL's RewardTrainer on preference pairs, the model handed in (the same fresh head in both): the losses,
    accuracies and gradient norms of transformers' model, step for step."""
    import datasets
    import transformers
    import trl

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    write_char_tokenizer(directory)
    pairs = {
        "chosen": ["hello world", "the quick brown fox", "abc def"] * 2,
        "rejected": ["zzz", "qq", "xyz"] * 2,
    }
    made = [lib.AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1)
            for lib in (transformers, autolm)]  # fmt: skip
    with torch.no_grad():
        made[1].score.weight.copy_(made[0].score.weight)

    def user_code(model, lib):
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        args = trl.RewardConfig(
            output_dir=str(tmp_path / lib), max_steps=3, per_device_train_batch_size=2, logging_steps=1,
            learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no", max_length=32,
        )  # fmt: skip
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(pairs),
                                    processing_class=tok)  # fmt: skip
        trainer.train()
        keys = ("loss", "grad_norm", "accuracy")
        return [[h[k] for k in keys] for h in trainer.state.log_history if "loss" in h]

    ref, got = user_code(made[0], "transformers"), user_code(made[1], "autolm")
    assert len(got) == len(ref) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=1e-5)


def test_trainer_fine_tunes_a_classifier_as_transformers(checkpoint, tmp_path):
    """transformers' text classification guide with the import changed: Trainer with DataCollatorWithPadding and
    compute_metrics trains, evaluates and predicts as on transformers' model (the same fresh head in both)."""
    import datasets
    import numpy as np
    import transformers

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    write_char_tokenizer(directory)
    made = [lib.AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2, pad_token_id=0)
            for lib in (transformers, autolm)]  # fmt: skip
    with torch.no_grad():
        made[1].score.weight.copy_(made[0].score.weight)

    def user_code(model, name):
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        data = datasets.Dataset.from_dict({"text": ["good day", "bad day", "great", "awful thing"] * 4,
                                           "label": [1, 0, 1, 0] * 4})  # fmt: skip
        data = data.map(lambda b: tok(b["text"]), batched=True)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=4,
            logging_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no",
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=data, eval_dataset=data,
            data_collator=transformers.DataCollatorWithPadding(tok),
            compute_metrics=lambda p: {"acc": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
        )  # fmt: skip
        trainer.train()
        evaluated = trainer.evaluate()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], evaluated, trainer.predict(data)

    ref, got = user_code(made[0], "transformers"), user_code(made[1], "autolm")
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(ref[0]), atol=1e-5, rtol=1e-5)
    assert got[1]["eval_acc"] == ref[1]["eval_acc"]
    torch.testing.assert_close(got[1]["eval_loss"], ref[1]["eval_loss"], atol=1e-5, rtol=1e-5)
    assert got[2].predictions.shape == ref[2].predictions.shape == (16, 2)
    torch.testing.assert_close(
        torch.tensor(got[2].predictions), torch.tensor(ref[2].predictions), atol=1e-5, rtol=1e-5
    )


def test_seq_cls_lora_trains_the_head_and_saves_what_peft_loads(checkpoint, tmp_path):
    """task_type="SEQ_CLS": the adapter carries a trainable copy of `score` (peft's modules_to_save
    ["classifier", "score"]); the same logits as peft's on transformers' classifier, and the saved adapter loads
    in peft to the same logits."""
    import peft

    directory, ref = _classifier(checkpoint, "llama_gqa_llama3_sharded", tmp_path, num_labels=2)
    config = {"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}
    theirs = peft.get_peft_model(ref, peft.LoraConfig(**config))
    ours = autolm.lora.get_peft_model(
        autolm.AutoModelForSequenceClassification.from_pretrained(directory), autolm.lora.LoraConfig(**config)
    )
    assert ours.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save.default" in n for n in trainable)
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == trainable
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
                params[n].copy_(p)
        torch.testing.assert_close(
            ours(IDS, attention_mask=MASK).logits, theirs(IDS, attention_mask=MASK).logits
        )
    ours.save_pretrained(tmp_path / "adapter")
    base = _classifier(checkpoint, "llama_gqa_llama3_sharded", tmp_path / "again", num_labels=2)[1]
    with torch.no_grad():
        base.score.weight.copy_(ref.score.original_module.weight)
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
        torch.testing.assert_close(
            loaded(IDS, attention_mask=MASK).logits, ours(IDS, attention_mask=MASK).logits
        )
        # the Auto class: the base classifier that adapter_config.json names, the adapter (and its head) on it
        for auto in (
            autolm.AutoPeftModelForSequenceClassification,
            peft.AutoPeftModelForSequenceClassification,
        ):
            again = auto.from_pretrained(tmp_path / "adapter")
            torch.testing.assert_close(
                again(IDS, attention_mask=MASK).logits,
                ours(IDS, attention_mask=MASK).logits,
                atol=1e-5,
                rtol=1e-5,
            )


def test_placement_and_quantization_keep_the_head(checkpoint, tmp_path):
    """A tied checkpoint's classifier under a device_map (the head is its own block, nothing ties to it) and
    quantized (int8 decoder layers, the head in floating point) gives the plain load's logits."""
    directory, ref = _classifier(checkpoint, "qwen2_tied_bias", tmp_path, num_labels=2)
    plain = autolm.AutoModelForSequenceClassification.from_pretrained(directory)
    placed = autolm.AutoModelForSequenceClassification.from_pretrained(directory, device_map={"": "cpu"})
    quantized = autolm.AutoModelForSequenceClassification.from_pretrained(directory, quantization="int8")
    assert placed.hf_device_map["score"] == "cpu" and "lm_head" not in placed.hf_device_map
    assert quantized.score.weight.is_floating_point()
    with torch.no_grad():
        want = ref(IDS, attention_mask=MASK).logits
        torch.testing.assert_close(plain(IDS, attention_mask=MASK).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(placed(IDS, attention_mask=MASK).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            quantized(IDS, attention_mask=MASK).logits.float(), want, atol=0.05, rtol=0.05
        )


def test_text_classification_pipeline_as_transformers(checkpoint, tmp_path):
    """pipeline("text-classification") on a folder: the call forms transformers' pipeline takes (a text, a list,
    top_k, function_to_apply, text pairs, batches) give its labels and scores; a reward model's one label
    scores through a sigmoid."""
    import transformers

    for num_labels in (3, 1):
        directory, _ = _classifier(checkpoint, "llama_gqa_llama3_sharded", tmp_path / str(num_labels),
                                   num_labels=num_labels)  # fmt: skip
        write_char_tokenizer(directory)
        pipes = [lib.pipeline("sentiment-analysis" if lib is autolm else "text-classification",
                              model=str(directory)) for lib in (transformers, autolm)]  # fmt: skip
        assert type(pipes[1].model).__name__ == "LlamaForSequenceClassification"
        for args, kwargs in (
            (("hello world",), {}),
            ((["hello world", "abc", "the quick brown fox"],), {}),
            (("hello world",), {"top_k": None}),
            ((["hello", "abc def"],), {"top_k": 2, "function_to_apply": "none"}),
            (({"text": "hello", "text_pair": "world"},), {}),
            ((["hello world", "abc", "the quick brown fox"],), {"batch_size": 2}),
        ):
            want, got = (pipe(*args, **kwargs) for pipe in pipes)
            assert _labels(got) == _labels(want), (args, kwargs)
            torch.testing.assert_close(_scores(got), _scores(want), atol=1e-5, rtol=1e-5)


def _labels(result):
    return [_labels(r) for r in result] if isinstance(result, list) else result["label"]


def _scores(result) -> torch.Tensor:
    flat = []
    stack = [result]
    while stack:
        r = stack.pop()
        flat += [r["score"]] if isinstance(r, dict) else []
        stack += reversed(r) if isinstance(r, list) else []
    return torch.tensor(flat)


def test_a_gguf_file_is_refused_as_a_classifier_or_a_body(tmp_path):
    for auto in (autolm.AutoModelForSequenceClassification, autolm.AutoModel):
        with pytest.raises(ConfigError, match="causal LM"):
            auto.from_pretrained(tmp_path, gguf_file="model.gguf")


@pytest.mark.parametrize("name", ["llama_gqa_llama3_sharded", "qwen2_tied_bias", "gemma3_text", "mixtral"])
def test_auto_model_is_the_body_as_transformers(checkpoint, tmp_path, name):
    """AutoModel on a causal checkpoint: transformers' last_hidden_state, hidden states and cache; the embedding
    recipe (left padding, the last token's state, normalised); saved as a base model that transformers loads."""
    import transformers

    directory, _ = checkpoint(name)
    ref, got = (lib.AutoModel.from_pretrained(directory) for lib in (transformers, autolm))
    assert type(got).__name__ == type(ref).__name__ and got.lm_head is None
    assert len(got.layers) == len(ref.layers) and got.embed_tokens is got.get_input_embeddings()
    assert got.norm.weight.shape == ref.norm.weight.shape  # the body's modules where transformers has them
    assert list(got.state_dict()) == list(ref.state_dict())  # transformers' base-model names, in its order
    got.load_state_dict(ref.state_dict())  # and back, as a transformers user moves weights
    batch = torch.tensor([[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    mask = (batch != 0).long()
    with torch.no_grad():
        want, have = (m(batch, attention_mask=mask, output_hidden_states=True) for m in (ref, got))
    real = mask.bool()  # the padding's own rows are each library's arbitrary fill
    torch.testing.assert_close(
        have.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5, rtol=1e-5
    )
    assert len(have.hidden_states) == len(want.hidden_states)
    assert have.past_key_values is not None and have.past_key_values.get_seq_length() == 6
    pooled = [torch.nn.functional.normalize(out.last_hidden_state[:, -1], dim=-1) for out in (want, have)]
    torch.testing.assert_close(pooled[1], pooled[0], atol=1e-5, rtol=1e-5)
    got.save_pretrained(tmp_path / "base")
    saved = json.loads((tmp_path / "base" / "config.json").read_text())
    assert saved["architectures"] == [type(ref).__name__]
    back = transformers.AutoModel.from_pretrained(tmp_path / "base")
    again = autolm.AutoModel.from_pretrained(tmp_path / "base")  # a base model's own checkpoint
    with torch.no_grad():
        for model in (back, again):
            torch.testing.assert_close(model(batch, attention_mask=mask).last_hidden_state[real],
                                       want.last_hidden_state[real], atol=1e-5, rtol=1e-5)  # fmt: skip


def test_a_base_model_adapter_in_peft_names_both_ways(checkpoint, tmp_path):
    """LoRA on AutoModel (task_type FEATURE_EXTRACTION, as for an embedding model): autolm's file loads in peft on
    transformers' base model, and peft's in autolm, to the same hidden states."""
    import peft
    import transformers

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    config = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False,
              "task_type": "FEATURE_EXTRACTION"}  # fmt: skip
    ours = autolm.lora.get_peft_model(
        autolm.AutoModel.from_pretrained(directory), autolm.lora.LoraConfig(**config)
    )
    theirs = peft.get_peft_model(transformers.AutoModel.from_pretrained(directory), peft.LoraConfig(**config))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())  # peft's names over the base model's
    for state in (None, ours.state_dict()):  # peft's on-disk names, from the model or from its state dict
        names = autolm.lora.get_peft_model_state_dict(ours, state_dict=state)
        assert sorted(names) == sorted(
            peft.get_peft_model_state_dict(theirs, state_dict=state and theirs.state_dict())
        )
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = [
        peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(directory), tmp_path / "ours"),
        autolm.lora.PeftModel.from_pretrained(
            autolm.AutoModel.from_pretrained(directory), tmp_path / "theirs"
        ),
    ]
    with torch.no_grad():
        for model, source in zip(loaded, (ours, theirs)):
            real = MASK.bool()  # the padding's rows are each library's arbitrary fill
            torch.testing.assert_close(model(IDS, attention_mask=MASK).last_hidden_state[real],
                                       source(IDS, attention_mask=MASK).last_hidden_state[real], atol=1e-5, rtol=1e-5)  # fmt: skip


def test_feature_extraction_pipeline_as_transformers(smol_dir):
    """pipeline("feature-extraction"): per text the body's last_hidden_state (1, tokens, hidden) as nested lists, or
    tensors with return_tensors=True, for a model loaded by name; a causal LM object gives its first output (the
    logits), as transformers' pipeline does."""
    import transformers

    got = []
    for lib in (transformers, autolm):
        by_name = lib.pipeline("feature-extraction", model=smol_dir, dtype=torch.float32)
        causal = lib.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
        on_object = lib.pipeline("feature-extraction", model=causal, tokenizer=by_name.tokenizer)
        got.append((torch.tensor(by_name("hello world")), by_name(["hello", "The capital"], return_tensors=True),
                    torch.tensor(on_object("hi there"))))  # fmt: skip
    (ref, ref_batch, ref_logits), (ours, ours_batch, ours_logits) = got
    assert ours.shape == ref.shape == (1, 2, 576) and ours_logits.shape == ref_logits.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-3, rtol=1e-4)  # logits of tens: fp32 rounding
    for a, b in zip(ours_batch, ref_batch, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwen3", "qwen2_tied_bias"])
def test_a_causal_lm_as_a_classifier_from_its_tokens_as_vllm(checkpoint, tmp_path, name):
    """vLLM's hf_overrides for a causal LM read as a classifier: from_2_way_softmax gives one logit whose sigmoid
    is the softmax over its two tokens' logits (Qwen3-Reranker's yes / no), no_post_processing the tokens' logits;
    the rows come from the file's lm_head, or the embeddings a tied head is."""
    import shutil

    directory, ref = checkpoint(name)
    shutil.copytree(directory, tmp_path / "m")
    write_char_tokenizer(str(tmp_path / "m"))
    ids = [ord("n") - 29, ord("y") - 29, ord("a") - 29]  # write_char_tokenizer's ids
    two = autolm.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "m", pad_token_id=0,
        hf_overrides={"classifier_from_token": ["n", "y"], "is_original_qwen3_reranker": True},
    )  # fmt: skip
    three = autolm.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "m", pad_token_id=0, hf_overrides={"classifier_from_token": ["n", "y", "a"],
                                                      "method": "no_post_processing"},
    )  # fmt: skip
    assert two.config.num_labels == 1 and three.config.num_labels == 3
    assert any("made from the LM head's rows" in n for n in two.load_report.notes)
    with torch.no_grad():
        logits = ref(IDS, attention_mask=MASK).logits
        last = logits[torch.arange(3), torch.tensor([3, 5, 5])]  # each row's last real token
        torch.testing.assert_close(two(IDS, attention_mask=MASK).logits[:, 0].sigmoid(),
                                   last[:, ids[:2]].softmax(-1)[:, 1], atol=1e-5, rtol=1e-5)  # fmt: skip
        torch.testing.assert_close(three(IDS, attention_mask=MASK).logits, last[:, ids], atol=1e-5, rtol=1e-5)
    two.save_pretrained(tmp_path / "cls")  # a classifier now: its score loads back with no tokenizer
    back = autolm.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    torch.testing.assert_close(back.score.weight, two.score.weight)
    for bad, match in [({"classifier_from_token": ["n", "y"]}, "needs method"),
                       ({"classifier_from_token": ["n"], "method": "from_2_way_softmax"}, "two tokens"),
                       ({"classifier_from_token": ["n", "<zz>"], "method": "no_post_processing"}, "<zz>"),
                       ({"classifier_from_token": "n", "method": "no_post_processing"}, "a list of tokens")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            autolm.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", hf_overrides=bad)
    with pytest.raises(ConfigError, match="hf_overrides must be a dict"):
        autolm.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", hf_overrides=["x"])
