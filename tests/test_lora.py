"""LoRA adapters in peft's format: peft -> autolm, autolm -> peft, merge/unmerge, adapters, errors."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from conftest import VOCAB, padded_batch, positions

import autolm
from autolm.errors import AdapterError
from autolm.lora import LoraConfig, PeftModel, get_peft_model

NAME = "llama_gqa_llama3_sharded"


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_adapter(checkpoint, tmp_path, **lora_kwargs):
    """An adapter made and saved by peft itself, and the logits peft gives with it."""
    import peft
    import transformers

    directory, _ = checkpoint(NAME)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs))
    _randomize_lora(pm)
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask = padded_batch(seed=11)
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    return directory, str(tmp_path / "adapter"), ids, mask, logits


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=3, lora_alpha=5, target_modules="all-linear", use_rslora=True),
        dict(
            r=2,
            lora_alpha=4,
            target_modules=r".*\.layers\.1\.self_attn\.(k|o)_proj",
            modules_to_save=["lm_head"],
        ),
    ],
)
def test_peft_adapter_loads_with_peft_logits(checkpoint, tmp_path, kwargs):
    directory, adapter, ids, mask, expected = _peft_adapter(checkpoint, tmp_path, **kwargs)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    pm = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        out = pm(ids, attention_mask=mask).logits
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        torch.testing.assert_close(out[b][real], expected[b][real], atol=1e-5, rtol=1e-5)


def _peft_logits_merged_or_not(pm, ids, mask, expected):
    """The adapter's logits are peft's (`expected`, on the unpadded positions), merged too, and the same again after
    unmerging; returns them."""
    real = mask.bool()
    got = pm(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    pm.merge_adapter()
    torch.testing.assert_close(
        pm(ids, attention_mask=mask).logits[real], expected[real], atol=1e-5, rtol=1e-5
    )
    pm.unmerge_adapter()
    torch.testing.assert_close(pm(ids, attention_mask=mask).logits, got, atol=1e-5, rtol=1e-5)
    return got


def test_dora_adapters_compute_merge_and_train_as_peft(checkpoint, tmp_path):
    """DoRA (use_dora=True): an adapter peft made loads with peft's logits, one autolm made loads in peft with the
    same logits, merging and unmerging change neither, and a training step's gradients (the magnitudes' too, the
    row norms taken as constants) are peft's."""
    import peft
    import transformers

    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    directory, adapter, ids, mask, expected = _peft_adapter(checkpoint, tmp_path, **kwargs)
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["use_dora"] is True
    pm = PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory), adapter)
    real = mask.bool()
    with torch.no_grad():
        got = _peft_logits_merged_or_not(pm, ids, mask, expected)
        # outside training the row norms are kept until a weight changes (in place too)
        layer = pm.get_base_model().model.layers[1].mlp.down_proj
        layer.lora_B["default"].weight.mul_(2)
        after = pm(ids, attention_mask=mask).logits
        layer._norms.clear()
        assert torch.equal(after, pm(ids, attention_mask=mask).logits) and not torch.allclose(after, got)
    # autolm's own DoRA adapter, in peft
    ours = get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), LoraConfig(**kwargs))
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        layer.lora_magnitude_vector["default"].weight, layer.base_layer.weight.norm(dim=1)
    )
    _randomize_lora(ours, seed=4)
    ours.save_pretrained(tmp_path / "ours")
    base = transformers.AutoModelForCausalLM.from_pretrained(directory)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours", is_trainable=True)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    # one backward on unpadded rows: the same gradients for every trainable tensor
    _same_gradients(ours, theirs, "lora_magnitude_vector")


def _same_gradients(ours, theirs, kind):
    """One backward on unpadded rows in autolm's and peft's models: the same trainable tensors (some of `kind`),
    the same gradients."""
    ours.train()
    theirs.train()
    rows = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    for model in (ours, theirs):
        model(input_ids=rows, labels=rows).loss.backward()
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(ref) and any(kind in n for n in mine)
    for n, g in ref.items():
        torch.testing.assert_close(mine[n], g, atol=1e-5, rtol=1e-4)


def test_autolm_adapter_loads_in_peft_with_equal_logits(checkpoint, tmp_path):
    import peft
    import transformers

    directory, _ = checkpoint(NAME)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    pm = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"], lora_dropout=0.1)
    )
    _randomize_lora(pm, seed=3)
    pm.eval()
    pm.save_pretrained(tmp_path / "ours")
    with open(tmp_path / "ours" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"
    base = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    ids, mask = padded_batch(seed=12)
    with torch.no_grad():
        a = pm(ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_merge_unmerge_and_merge_and_unload(checkpoint):
    directory, _ = checkpoint(NAME)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(ids).logits
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomize_lora(pm, seed=5)
    with torch.no_grad():
        unmerged = pm(ids).logits
        assert not torch.allclose(unmerged, base_logits, atol=1e-3)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(ids).logits, base_logits)
        pm.merge_adapter()
        torch.testing.assert_close(pm(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        for name, layer in pm.get_base_model().named_modules():
            if hasattr(layer, "base_layer"):
                torch.testing.assert_close(
                    layer.base_layer.weight, before[f"{name}.weight"], atol=1e-6, rtol=0
                )
        torch.testing.assert_close(pm(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        merged = pm.merge_and_unload()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_several_named_adapters(checkpoint, tmp_path):
    directory, _ = checkpoint(NAME)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    _randomize_lora(pm, seed=1)
    pm.save_pretrained(tmp_path / "a")  # a non-default adapter goes in a subfolder, as peft does
    assert os.path.isfile(tmp_path / "a" / "a" / "adapter_model.safetensors")
    with torch.no_grad():
        out_a = pm(ids).logits
    pm2 = get_peft_model(
        autolm.AutoModelForCausalLM.from_pretrained(directory), LoraConfig(r=2, target_modules=["v_proj"])
    )
    _randomize_lora(pm2, seed=2)
    pm2.save_pretrained(tmp_path / "b")
    with torch.no_grad():
        out_b = pm2(ids).logits
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, out_a)
        pm.set_adapter("b")
        torch.testing.assert_close(pm(ids).logits, out_b)
    pm.delete_adapter("b")
    assert list(pm.peft_config) == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, out_a)
    with pytest.raises(AdapterError, match="no adapter named"):
        pm.set_adapter("b")


def test_trainable_parameters_are_lora_only(checkpoint):
    directory, _ = checkpoint(NAME)
    pm = get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), LoraConfig(r=4))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)  # peft's default targets
    t, total = pm.get_nb_trainable_parameters()
    assert t == sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad) and total > t


def test_adapter_that_does_not_fit_is_a_clear_error(checkpoint, tmp_path):
    directory, adapter, *_ = _peft_adapter(checkpoint, tmp_path, r=4, target_modules=["q_proj"])
    other, _ = checkpoint("qwen2_tied_bias")  # different hidden size
    with pytest.raises(AdapterError, match="shape"):
        PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(other), adapter)
    with pytest.raises(AdapterError, match="match no Linear layer"):
        get_peft_model(
            autolm.AutoModelForCausalLM.from_pretrained(directory), LoraConfig(target_modules=["wq"])
        )
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["k_proj"]  # the weights are for q_proj
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="do not match"):
        PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory), adapter)
    # an adapter whose config switches on a peft feature autolm lacks is refused by name, not loaded without it
    cfg["target_modules"], cfg["alora_invocation_tokens"] = ["q_proj"], [3, 4]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="alora_invocation_tokens is a peft feature"):
        PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory), adapter)
    with pytest.raises(AdapterError, match="layer_replication is a peft feature"):
        LoraConfig(
            r=4, target_modules=["q_proj"], layer_replication=[[0, 1]]
        )  # peft's keyword, taken and refused
    assert LoraConfig(r=4, revision="main").to_dict()["revision"] == "main"  # a harmless one round-trips


def test_finetune_lowers_loss_and_changes_only_lora(smol_dir, tmp_path):
    from autolm.train import TrainConfig, finetune

    data = tmp_path / "data.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is the secret word number {i}?"},
                {"role": "assistant", "content": "The secret word is pineapple."},
            ]
        }
        for i in range(4)
    ]
    rows.append({"prompt": "Say the secret word:", "completion": " pineapple"})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    model = autolm.AutoModelForCausalLM.from_pretrained(smol_dir)
    tok = autolm.AutoTokenizer.from_pretrained(smol_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The last layers only: backward stops there, which keeps the test fast on a CPU.
    pm = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            layers_to_transform=[26, 27, 28, 29],
        ),
    )
    lora_before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    cfg = TrainConfig(
        max_steps=8,
        lr=5e-3,
        batch_size=5,
        grad_accum=1,
        gradient_checkpointing=True,
        save_every=4,
        progress=False,
    )
    losses = finetune(pm, tok, str(data), str(tmp_path / "adapter"), cfg)
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in pm.named_parameters():
        if n in lora_before and "lora_B" in n:
            assert not torch.equal(p, lora_before[n]), n
    for name, layer in pm.get_base_model().named_modules():
        if hasattr(layer, "base_layer"):
            assert torch.equal(layer.base_layer.weight, before[f"{name}.weight"])
    assert torch.equal(pm.base_model.model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "adapter" / "checkpoint-4" / "adapter_model.safetensors")
    # Generation works on the un-merged model and has learnt the answer.
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the secret word number 9?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    out = pm.generate(ids, max_new_tokens=10)
    assert "pineapple" in tok.decode(out[0, ids.shape[1] :])
    # The saved adapter reloads onto a fresh base with the same logits.
    again = PeftModel.from_pretrained(
        autolm.AutoModelForCausalLM.from_pretrained(smol_dir), str(tmp_path / "adapter")
    )
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)


# ---- peft's surface, compared with peft itself (the import swapped) -----------------------------------------

IDS = torch.tensor([[1, 17, 33, 5, 99, 42, 7]])


def _pair(directory):
    """(transformers, peft) and (autolm, autolm.lora): the same user code runs on each pair."""
    import peft
    import transformers

    return [(transformers, peft), (autolm, autolm.lora)]


def _sync_lora(ref, ours):
    """Copy every LoRA tensor from peft's model into autolm's (same names), so both hold the same adapters."""
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(theirs[name])


def _logits(pm):
    with torch.no_grad():
        return pm(input_ids=IDS).logits


def test_several_adapters_add_set_disable_delete_as_peft(checkpoint):
    directory, _ = checkpoint(NAME)
    made = []
    for lib, lib_peft in _pair(directory):
        pm = lib_peft.get_peft_model(
            lib.AutoModelForCausalLM.from_pretrained(directory),
            lib_peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        pm.add_adapter("b", lib_peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
        made.append(pm)
    _sync_lora(*made)

    def user_code(pm):
        facts = [
            pm.active_adapter,
            sorted(n for n, p in pm.named_parameters() if p.requires_grad),
            _logits(pm),
        ]
        pm.set_adapter("b")
        facts += [
            pm.active_adapters,
            sorted(n for n, p in pm.named_parameters() if p.requires_grad),
            _logits(pm),
        ]
        with pm.disable_adapter():
            facts.append(_logits(pm))
        pm.delete_adapter("b")
        facts += [pm.active_adapter, sorted(pm.peft_config), _logits(pm)]
        return facts

    ref, got = (user_code(pm) for pm in made)
    for a, b in zip(got, ref):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert a == b
    assert not torch.allclose(ref[2], ref[5], atol=1e-3)  # the two adapters differ


@pytest.mark.parametrize(
    "combination", ["cat", "linear", "svd", "ties", "magnitude_prune_svd", "dare_linear"]
)
def test_add_weighted_adapter_as_peft(checkpoint, combination):
    """peft's add_weighted_adapter: a new adapter made of two (one weighted negatively, over partly different
    modules) by peft's arithmetic gives peft's logits (DARE's random pruning drawn from the same seed); it starts
    frozen, the active adapter stays active, and its config holds both adapters' modules and the new rank."""
    directory, _ = checkpoint(NAME)
    same_rank = combination not in ("cat", "svd", "magnitude_prune_svd")
    made = []
    for lib, lib_peft in _pair(directory):
        pm = lib_peft.get_peft_model(
            lib.AutoModelForCausalLM.from_pretrained(directory),
            lib_peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
            ),
        )
        pm.add_adapter("b", lib_peft.LoraConfig(r=4 if same_rank else 2, lora_alpha=4, init_lora_weights=False,
                                                target_modules=["v_proj", "down_proj"]))  # fmt: skip
        made.append(pm)
    _sync_lora(*made)

    def user_code(pm):
        torch.manual_seed(0)
        density = 0.5 if combination not in ("cat", "linear", "svd") else None
        pm.add_weighted_adapter(
            ["default", "b"], [0.7, -0.4], "mix", combination_type=combination, density=density
        )
        facts = [pm.active_adapter, [n for n, p in pm.named_parameters() if p.requires_grad and ".mix" in n]]
        facts += [sorted(pm.peft_config["mix"].target_modules), pm.peft_config["mix"].r]
        pm.set_adapter("mix")
        return [*facts, _logits(pm)]

    ref, got = (user_code(pm) for pm in made)
    assert got[:4] == ref[:4] and got[0] == "default" and not got[1]
    assert got[2] == ["down_proj", "q_proj", "v_proj"] and got[3] == {"cat": 6}.get(combination, 4)
    torch.testing.assert_close(got[4], ref[4], atol=1e-5, rtol=1e-4)


def test_layer_and_model_status_as_peft(checkpoint):
    """peft's get_layer_status / get_model_status (the methods and the functions): two adapters, an embedding
    adapter and a modules_to_save copy, one layer merged (merged_adapters then "irregular"), adapters disabled."""
    import dataclasses

    import peft

    directory, _ = checkpoint(NAME)
    seen = []
    for lib, lib_peft in _pair(directory):
        pm = lib_peft.get_peft_model(
            lib.AutoModelForCausalLM.from_pretrained(directory),
            lib_peft.LoraConfig(
                r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]
            ),
        )
        pm.add_adapter("other", lib_peft.LoraConfig(r=2, target_modules=["q_proj"]))
        # as dicts at once: peft's layer statuses hold the layers' own lists, which the merge below changes
        status = [
            [dataclasses.asdict(s) for s in pm.get_layer_status()],
            dataclasses.asdict(pm.get_model_status()),
        ]
        pm.base_model.model.model.layers[0].self_attn.q_proj.merge(adapter_names=["other"])
        status.append(dataclasses.asdict(lib_peft.get_model_status(pm)))
        with pm.disable_adapter():  # the adapters' weights do not train meanwhile
            status.append(dataclasses.asdict(lib_peft.get_model_status(pm)))
        status.append(dataclasses.asdict(lib_peft.get_model_status(pm)))
        seen.append(status)
    assert seen[1] == seen[0]
    assert seen[0][2]["merged_adapters"] == "irregular" and seen[0][3]["enabled"] is False
    assert (
        seen[0][3]["trainable_params"] == 0
        and seen[0][4]["trainable_params"] == seen[0][1]["trainable_params"]
    )
    assert peft.get_model_status  # the oracle's own function was the one compared


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_pissa_and_olora_initialise_as_peft(checkpoint, init):
    """init_lora_weights="pissa" / "pissa_niter_<n>" / "olora": A and B from the base weight's SVD (randomized,
    from the same seed) or QR, the base weight left with the residual, as peft computes them: the same adapter
    tensors, base weights and logits (the adapted model's output unchanged). Methods autolm lacks are refused."""
    directory, _ = checkpoint(NAME)
    made = []
    for lib, lib_peft in _pair(directory):
        torch.manual_seed(0)
        config = lib_peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init
        )
        made.append(lib_peft.get_peft_model(lib.AutoModelForCausalLM.from_pretrained(directory), config))
    theirs, ours = (dict(pm.named_parameters()) for pm in made)
    changed = [n for n in theirs if n.endswith("base_layer.weight")]
    assert changed and sorted(theirs) == sorted(ours)
    for name in [n for n in theirs if ".lora_" in n] + changed:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_logits(made[1]), _logits(made[0]), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="init_lora_weights"):
        autolm.lora.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva")


def test_lora_bias_as_peft(checkpoint, tmp_path):
    """lora_bias=True: lora_B carries a bias, scaled with it; the logits, a merge into the base layers' biases and
    the adapter file (lora_B.bias) as peft's; a target without a bias cannot merge; DoRA refuses it."""
    import peft

    directory, _ = checkpoint("qwen2_tied_bias")  # q, k and v projections with biases
    made = []
    for lib, lib_peft in _pair(directory):
        config = lib_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True,
                                     init_lora_weights=False)  # fmt: skip
        made.append(lib_peft.get_peft_model(lib.AutoModelForCausalLM.from_pretrained(directory), config))
    _sync_lora(*made)
    assert any(n.endswith("lora_B.default.bias") for n, _ in made[1].named_parameters())
    torch.testing.assert_close(_logits(made[1]), _logits(made[0]), atol=1e-5, rtol=1e-5)
    made[1].save_pretrained(tmp_path / "ours")
    import transformers

    back = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(directory), tmp_path / "ours"
    )
    torch.testing.assert_close(_logits(back), _logits(made[0]), atol=1e-5, rtol=1e-5)
    made[0].save_pretrained(tmp_path / "peft")
    ours = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours = autolm.lora.PeftModel.from_pretrained(ours, tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), _logits(made[0]), atol=1e-5, rtol=1e-5)
    merged = [pm.merge_and_unload() for pm in made]
    with torch.no_grad():
        torch.testing.assert_close(merged[1](IDS).logits, merged[0](IDS).logits, atol=1e-5, rtol=1e-5)
    plain = autolm.AutoModelForCausalLM.from_pretrained(directory)
    pm = autolm.lora.get_peft_model(
        plain, autolm.lora.LoraConfig(r=4, target_modules=["o_proj"], lora_bias=True)
    )
    with pytest.raises(ValueError, match="the base layer has no bias"):
        pm.merge_and_unload()
    with pytest.raises(ValueError, match="lora_bias=True"):
        autolm.lora.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, use_dora=True)


def test_saves_loads_merges_and_state_dicts_as_peft(checkpoint, tmp_path):
    import peft
    from huggingface_hub import ModelCard

    directory, _ = checkpoint(NAME)
    made = []
    for lib, lib_peft in _pair(directory):
        pm = lib_peft.get_peft_model(
            lib.AutoModelForCausalLM.from_pretrained(directory),
            lib_peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False),
        )
        made.append(pm)
    _sync_lora(*made)

    def user_code(pm, lib, lib_peft, out):
        pm.save_pretrained(out, safe_serialization=False)
        cfg = json.loads((out / "adapter_config.json").read_text())
        state = lib_peft.get_peft_model_state_dict(pm)
        loaded = lib_peft.set_peft_model_state_dict(pm, state)
        again = lib_peft.PeftModel.from_pretrained(lib.AutoModelForCausalLM.from_pretrained(directory), out)
        config = lib_peft.PeftConfig.from_pretrained(out)
        merged = again.merge_and_unload(safe_merge=True)
        return [
            sorted(os.listdir(out)),
            sorted(cfg["target_modules"]),
            cfg["base_model_name_or_path"],
            (type(config).__name__, config.r, config.lora_alpha, sorted(config.target_modules)),
            dict(state),
            loaded.unexpected_keys,
            [k for k in loaded.missing_keys if ".lora_" in k],
            (again.training, any(p.requires_grad for p in again.parameters())),
            _logits(merged),
        ]

    ref = user_code(made[0], *_pair(directory)[0], tmp_path / "peft")
    got = user_code(made[1], *_pair(directory)[1], tmp_path / "autolm")
    assert got[0] == ref[0] and "adapter_model.bin" in got[0]
    cards = [ModelCard.load(tmp_path / lib / "README.md") for lib in ("peft", "autolm")]  # peft's model card
    assert cards[1].data.to_dict() == cards[0].data.to_dict() and "lora" in cards[0].data.tags
    (tmp_path / "autolm" / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n")
    made[1].save_pretrained(tmp_path / "autolm")  # a card already there is updated, as peft updates it
    card = ModelCard.load(tmp_path / "autolm" / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "peft" and "# My adapter" in card.text
    assert got[1:4] == ref[1:4] and got[5:8] == ref[5:8]
    assert got[4].keys() == ref[4].keys() and all(torch.equal(got[4][k], ref[4][k]) for k in ref[4])
    torch.testing.assert_close(got[8], ref[8], atol=1e-5, rtol=1e-5)
    # peft itself loads autolm's .bin adapter
    pm = peft.PeftModel.from_pretrained(made[0].unload(), tmp_path / "autolm")
    torch.testing.assert_close(_logits(pm), ref[8], atol=1e-5, rtol=1e-5)


def test_auto_peft_model_and_named_adapters_load_as_peft(checkpoint, tmp_path):
    import peft

    _, adapter, *_ = _peft_adapter(checkpoint, tmp_path, r=4, target_modules=["q_proj", "o_proj"])
    _peft_adapter(checkpoint, tmp_path / "second", r=2, target_modules=["v_proj"])

    def user_code(lib, auto):
        pm = auto.from_pretrained(adapter)
        facts = [pm.training, _logits(pm)]
        pm.load_adapter(str(tmp_path / "second" / "adapter"), adapter_name="second")
        facts += [pm.active_adapter, _logits(pm)]
        pm.set_adapter("second")
        facts.append(_logits(pm))
        return facts

    ref = user_code(peft, peft.AutoPeftModelForCausalLM)
    got = user_code(autolm.lora, autolm.AutoPeftModelForCausalLM)
    assert got[0] == ref[0] is False and got[2] == ref[2]
    for i in (1, 3, 4):
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref[3], ref[4], atol=1e-3)


def _peft_errors(lib, lib_peft, directory):
    """What users get wrong with adapters: each must raise a ValueError (peft's kind) with this pair."""
    pm = lib_peft.get_peft_model(
        lib.AutoModelForCausalLM.from_pretrained(directory), lib_peft.LoraConfig(r=2)
    )
    mistakes = [
        lambda: pm.set_adapter("nope"),
        lambda: pm.delete_adapter("nope"),
        lambda: pm.add_adapter("default", lib_peft.LoraConfig(r=2)),
        lambda: lib_peft.get_peft_model(
            lib.AutoModelForCausalLM.from_pretrained(directory), lib_peft.LoraConfig(target_modules=["nope"])
        ),
    ]
    return pm, mistakes


def test_errors_are_value_errors_as_in_peft(checkpoint):
    directory, _ = checkpoint(NAME)
    for lib, lib_peft in _pair(directory):
        pm, mistakes = _peft_errors(lib, lib_peft, directory)
        for bad in mistakes:
            with pytest.raises(ValueError):
                bad()
        with torch.no_grad():  # a broken adapter: safe_merge refuses it
            next(p for n, p in pm.named_parameters() if "lora_B" in n).fill_(float("nan"))
        with pytest.raises(ValueError, match="NaN"):
            pm.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("quantization", ["int8", "int4", "gguf"])
def test_lora_trains_on_quantized_layers_as_on_their_dequantized_weights(checkpoint, tmp_path, quantization):
    """QLoRA: LoRA (and DoRA) on int8, int4 and GGUF-block layers gives the logits and the gradients of LoRA on
    float layers holding the weights they stand for (within the kernels' rounding of the first layer's input);
    the quantized weights stay as they are while training; merging quantizes the merged weight again (as peft),
    a GGUF layer's to its own type."""
    if quantization == "gguf":
        from test_gguf_blocks import K, write_gguf

        path = write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, None)
        kw = dict(gguf_file=os.path.basename(path), progress=False)
        quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, quantization="gguf", **kw)
        plain = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, **kw)  # dequantized while loading
        vocab = quant.config.vocab_size
        # every layer's input needs a gradient, so every layer computes through its dequantized weight: this random
        # model's attention is so sharp (a loss of ~120) that the C++ kernel's int8 rounding of the first layer's
        # input alone turns its gradients (tests/test_gguf_blocks.py pins that kernel)
        for m in (quant, plain):
            m.model.embed_tokens.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    else:
        directory, _ = checkpoint(NAME)
        quant = autolm.AutoModelForCausalLM.from_pretrained(directory, quantization=quantization)
        plain = autolm.AutoModelForCausalLM.from_pretrained(directory)
        with torch.no_grad():
            for name, m in quant.named_modules():
                if hasattr(m, "dequantize") and name.startswith("model.layers."):
                    plain.get_submodule(name).weight.copy_(m.dequantize())
        vocab = VOCAB
    frozen = [(b, b.clone()) for b in quant.buffers() if not b.is_floating_point()]
    assert frozen  # the quantized weights
    # on the GGUF file: Q4_K, Q5_K, Q8_0 in layer 0 and Q5_0, Q5_1, BF16 in layer 1 (test_gguf_blocks.TYPES)
    targets = ["q_proj", "k_proj" if quantization == "gguf" else "v_proj", "down_proj"]
    config = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    config["use_dora"] = quantization == "gguf"  # DoRA's norms from the dequantized weight too
    made = [get_peft_model(m, LoraConfig(**config)) for m in (quant, plain)]
    _sync_lora(made[0], made[1])
    rows = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for pm in made:
        pm.train()
        out = pm(input_ids=rows, labels=rows)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    assert sorted(grads[0]) == sorted(grads[1]) and grads[0]
    torch.testing.assert_close(losses[0], losses[1], rtol=0.02, atol=0.0)
    for n, g in grads[1].items():
        cos = torch.nn.functional.cosine_similarity(grads[0][n].flatten(), g.flatten(), 0)
        assert cos > 0.98, (n, cos)
    assert all(torch.equal(b, before) for b, before in frozen)
    # as peft merges into 4- and 8-bit layers: the merged weight quantized again (a GGUF layer's to its own type),
    # so the quantized model merged holds the float model merged within a step of each layer's grid (half for
    # rounding to it, the rest the scales' and offsets' own rounding)
    before = {id(m): m.dequantize() for m in quant.modules() if hasattr(m, "requantize")}
    merged, merged_plain = (pm.merge_and_unload() for pm in made)
    changed = 0
    for name, m in merged.named_modules():
        if name.startswith("model.layers.") and hasattr(m, "requantize"):
            want = merged_plain.get_submodule(name).weight.float()
            # GGUF: a step of each block of 32's range on the type's grid (the layers left untouched: any)
            if quantization == "gguf":
                levels = {K.Q4_K: 15, K.Q5_K: 31, K.Q8_0: 254, K.Q5_0: 31, K.Q5_1: 31, K.BF16: 256}
                levels = levels.get(m.ggml_type, 1)
                step = 2 * want.unflatten(-1, (-1, 32)).abs().amax(-1).max() / levels
            else:
                step = m.scales if quantization == "int8" else m.scales_and_zeros[..., 0]
            torch.testing.assert_close(m.dequantize(), want, rtol=0, atol=step.float().abs().max().item())
            targeted = name.endswith(tuple(targets))
            assert torch.equal(m.dequantize(), before[id(m)]) != targeted, name
            changed += targeted
    assert changed == 3 * merged.config.num_hidden_layers
    if (
        quantization == "gguf"
    ):  # a type autolm does not quantize to: the merge refused by it, before any layer merges
        lora = get_peft_model(merged, LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
        kept = [b.clone() for b in lora.buffers() if not b.is_floating_point()]
        with pytest.raises(
            AdapterError, match="ggml type 20"
        ):  # layer 1's IQ4_NL (layer 0's Q6_K would merge)
            lora.merge_and_unload()
        assert all(
            torch.equal(a, b) for a, b in zip(kept, (b for b in lora.buffers() if not b.is_floating_point()))
        )


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_on_embeddings_computes_merges_and_trains_as_peft(checkpoint, tmp_path, dora):
    """target_modules naming the embeddings (peft's lora.Embedding: lora_embedding_A (r, vocab) and
    lora_embedding_B (hidden, r), A at zero and B normal at first; with DoRA a magnitude per embedding dimension,
    the column norms of the adapted weight): an adapter peft made loads with peft's logits, merging and unmerging
    change nothing, one autolm made loads in peft with the same logits and a backward step gives the same
    gradients; "all-linear" leaves the embeddings alone."""
    import peft
    import transformers

    def randomize(model, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    kwargs = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=dora)
    directory, _ = checkpoint(NAME)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    theirs = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    randomize(theirs, 0)
    theirs.save_pretrained(tmp_path / "peft")
    ids, mask = padded_batch(seed=13)
    real = mask.bool()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    pm = PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory), tmp_path / "peft")
    emb = pm.get_base_model().model.embed_tokens
    assert tuple(emb.lora_embedding_A["default"].shape) == (4, VOCAB)
    with torch.no_grad():
        got = _peft_logits_merged_or_not(pm, ids, mask, expected)
        with pm.disable_adapter():
            plain = pm(ids, attention_mask=mask).logits
        assert not torch.allclose(plain[real], got[real])
    # autolm's own: peft's initialisation, then in peft with the same logits and gradients
    ours = get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), LoraConfig(**kwargs))
    emb = ours.get_base_model().model.embed_tokens
    assert not emb.lora_embedding_A["default"].any() and emb.lora_embedding_B["default"].std() > 0.5
    if dora:  # A at zero: the magnitudes are the weight's column norms
        torch.testing.assert_close(emb.lora_magnitude_vector["default"].weight, emb.weight.norm(dim=0))
    randomize(ours, 4)
    ours.save_pretrained(tmp_path / "ours")
    # the file holds what peft's does: the LoRA tensors and the targeted embedding's weight (peft's
    # save_embedding_layers="auto"), under the same names
    from safetensors.torch import load_file

    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert sorted(mine) == sorted(peft_file)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in mine
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(directory), tmp_path / "ours", is_trainable=True
    )
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    _same_gradients(ours, theirs, "embed_tokens.lora_magnitude_vector" if dora else "lora_embedding_A")
    # "all-linear": Linear layers alone, as peft
    lin = get_peft_model(
        autolm.AutoModelForCausalLM.from_pretrained(directory), LoraConfig(target_modules="all-linear")
    )
    assert not any("lora_embedding" in n for n, _ in lin.named_parameters())


def test_mixed_adapter_batches_as_peft(checkpoint):
    """peft's adapter_names: each row of a forward or a generation (greedy, beams) runs with its own adapter or
    none ("__base__"), its LoRA layers and modules_to_save copy, as peft gives it and as the row alone gives it;
    the mistakes peft refuses are refused."""
    directory, _ = checkpoint(NAME)
    ids = torch.tensor([[1, 5, 9, 7, 3, 5], [0, 0, 4, 8, 2, 6], [2, 3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    names = ["default", "__base__", "b"]
    seen, models = [], []
    for lib, lib_peft in _pair(directory):
        pm = lib_peft.get_peft_model(
            lib.AutoModelForCausalLM.from_pretrained(directory),
            lib_peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        )
        pm.add_adapter(
            "b", lib_peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"])
        )
        if models:  # the same adapters as peft's
            theirs = dict(models[0].named_parameters())
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if ".lora_" in n or ".modules_to_save." in n:
                        p.copy_(theirs[n])
        else:
            _randomize_lora(pm)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if ".modules_to_save." in n:
                        p.add_(torch.randn_like(p))
        pm.eval()
        models.append(pm)
        with torch.no_grad():
            logits = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        greedy = pm.generate(
            input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False
        )
        beams = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=4, num_beams=2,
                            do_sample=False)  # fmt: skip
        seen.append((logits, greedy, beams))
    torch.testing.assert_close(seen[1][0][mask.bool()], seen[0][0][mask.bool()], atol=1e-5, rtol=1e-5)
    assert torch.equal(seen[1][1], seen[0][1]) and torch.equal(seen[1][2], seen[0][2])
    pm = models[1]
    for i, name in enumerate(names):  # each row as it runs alone with its adapter (or none)
        with torch.no_grad(), pm.disable_adapter() if name == "__base__" else contextlib.nullcontext():
            if name != "__base__":
                pm.set_adapter(name)
            alone = pm(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
        real = mask[i].bool()  # a padded position's logits are each run's arbitrary fill
        torch.testing.assert_close(seen[1][0][i, real], alone[0, real], atol=1e-5, rtol=1e-5)
    for bad, match in (
        (["default", "nope", "b"], "non-existing adapter"),
        ("default", "list of adapter names"),
    ):
        with pytest.raises(ValueError, match=match):
            pm(input_ids=ids, attention_mask=mask, adapter_names=bad)
    pm.train()
    with pytest.raises(ValueError, match="training mode"):
        pm(input_ids=ids, attention_mask=mask, adapter_names=names)


def test_peft_surface_beyond_peft_model(checkpoint):
    """peft's inject_adapter_in_model (LoRA put into a plain model), LoraModel's disable_adapter_layers /
    enable_adapter_layers and targeted_module_names, PeftModel's set_requires_grad, peft_type and modules_to_save,
    and LoraLayer for isinstance checks: as peft's on the same checkpoint."""
    directory, _ = checkpoint(NAME)
    seen = []
    for lib, lib_peft in _pair(directory):
        injected = lib_peft.inject_adapter_in_model(
            lib_peft.LoraConfig(r=4, target_modules=["q_proj"]),
            lib.AutoModelForCausalLM.from_pretrained(directory),
        )
        if seen:
            _sync_lora(seen[0]["injected"], injected)
        else:
            _randomize_lora(injected)
        pm = lib_peft.get_peft_model(
            lib.AutoModelForCausalLM.from_pretrained(directory),
            lib_peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        )
        _randomize_lora(pm)
        with torch.no_grad():
            adapted = _logits(pm)
            pm.base_model.disable_adapter_layers()
            off = _logits(pm)
            pm.base_model.enable_adapter_layers()
            on = _logits(pm)
        pm.set_requires_grad("default", requires_grad=False)
        seen.append({
            "injected": injected,
            "names": sorted(n for n, p in injected.named_parameters() if p.requires_grad),
            "logits": injected(input_ids=IDS).logits.detach(),
            "targets": sorted(pm.targeted_module_names),
            "switch": (off, on, adapted),
            "frozen": sum(p.requires_grad for p in pm.parameters()),
            "attrs": (pm.peft_type == "LORA", pm.modules_to_save),
            "layers": sum(isinstance(m, lib_peft.tuners.lora.LoraLayer if lib is not autolm else autolm.lora.LoraLayer)
                          for m in pm.modules()),
        })  # fmt: skip
    ref, ours = seen
    assert ours["names"] == ref["names"] and ours["targets"] == ref["targets"]
    torch.testing.assert_close(ours["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
    off, on, adapted = ours["switch"]
    torch.testing.assert_close(on, adapted)
    torch.testing.assert_close(off, ref["switch"][0], atol=1e-5, rtol=1e-5)  # the base model's, as peft's
    assert not torch.allclose(off, adapted)
    assert ours["frozen"] == ref["frozen"] == 0 and ours["attrs"] == ref["attrs"] == (True, {"lm_head"})
    assert ours["layers"] == ref["layers"] == 4
