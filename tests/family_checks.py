"""The checks every model family passes against transformers and peft, on a tiny random checkpoint that
transformers itself writes. A family's test file gives its checkpoints (a transformers config class name and
keyword arguments, each quirk switched on) and calls these; they run the transformers original and autolm on
the same files and compare.

    from family_checks import Family
    GEMMA2 = Family("Gemma2Config", dict(hidden_size=64, ...))

    def test_logits(tmp_path_factory):
        GEMMA2.check_logits(tmp_path_factory)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import pytest
import torch
from conftest import VOCAB, padded_batch, positions, randomize

import autolm

_CACHE: dict = {}


@dataclass
class Family:
    """A tiny checkpoint of one family: transformers' config class name and its keyword arguments."""

    config_cls: str
    kwargs: dict
    save_kwargs: dict = field(default_factory=dict)
    atol: float = 1e-4
    # LoRA targets for families peft has no default for (None: peft's default for the type)
    lora_targets: list[str] | None = None
    # transformers' attention implementation for the reference model (Falcon-RW: its SDPA path, the default, as
    # its eager one adds ALiBi's bias twice)
    hf_attention: str = "eager"
    # transformers' model class where AutoModelForCausalLM takes no checkpoint of the config (Mllama's and Emu3's
    # text configs: its table has their image-text types only); None: AutoModelForCausalLM
    hf_class: str | None = None
    # buffers (by name suffix) the checkpoint randomizes too (conftest's randomize leaves buffers): e.g. routers'
    # e_score_correction_bias, large enough to change which experts the sigmoid scores pick
    random_buffers: tuple[str, ...] = ()

    # ---- the checkpoint --------------------------------------------------------------------------

    def checkpoint(self, tmp_path_factory, dtype=None) -> tuple[str, torch.nn.Module]:
        """(directory, transformers' model loaded back from it), made once per session."""
        import transformers

        kwargs = repr(sorted(self.kwargs.items()))
        key = (self.config_cls, kwargs, str(dtype), self.hf_attention, self.random_buffers)
        if key not in _CACHE:
            cfg = getattr(transformers, self.config_cls)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                         **self.kwargs)  # fmt: skip
            torch.manual_seed(0)
            model = self.hf_auto()._from_config(cfg) if self.hf_class else self.hf_auto().from_config(cfg)
            randomize(model)
            _randomize_buffers(model, self.random_buffers)
            if dtype is not None:
                model = model.to(dtype)
            d = str(tmp_path_factory.mktemp(self.config_cls.lower()))
            model.save_pretrained(d, **self.save_kwargs)
            ref = self.hf_auto().from_pretrained(d, dtype="auto", attn_implementation=self.hf_attention)
            _CACHE[key] = (d, ref.eval())
        return _CACHE[key]

    def hf_auto(self) -> type:
        """transformers' class that builds and loads the checkpoint: AutoModelForCausalLM, or `hf_class`."""
        import transformers

        return getattr(transformers, self.hf_class or "AutoModelForCausalLM")

    # ---- logits and generation ---------------------------------------------------------------------

    def check_logits(self, tmp_path_factory) -> None:
        """fp32 logits of a left-padded batch equal transformers' (atol 1e-4) at every real position."""
        directory, hf = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ids, mask = padded_batch()
        with torch.no_grad():
            ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
            theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
        real = mask.bool()
        torch.testing.assert_close(ours[real], theirs[real], atol=self.atol, rtol=self.atol)

    def check_generate(self, tmp_path_factory) -> None:
        """Greedy (a padded batch and one row, which takes the one-token step) and beam search give
        transformers' tokens."""
        directory, hf = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ids, mask = padded_batch(lengths=(9, 5))
        for kwargs in (dict(max_new_tokens=12), dict(max_new_tokens=8, num_beams=3)):
            ours = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
            theirs = hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
            assert torch.equal(ours, theirs), kwargs
        row = ids[:1, -9:]
        assert torch.equal(model.generate(row, max_new_tokens=16, do_sample=False),
                           hf.generate(row, max_new_tokens=16, do_sample=False))  # fmt: skip

    def check_bf16(self, tmp_path_factory) -> None:
        """bf16 logits no further from the fp32 model's than transformers' bf16 logits are (with some slack:
        the two round in different places)."""
        directory, hf = self.checkpoint(tmp_path_factory)
        ids, mask = padded_batch()
        real = mask.bool()
        half = self.hf_auto().from_pretrained(directory, dtype=torch.bfloat16,
                                              attn_implementation=self.hf_attention)  # fmt: skip
        with torch.no_grad():
            truth = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
            theirs = half(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
            model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
            ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        ours_err, theirs_err = (ours.float() - truth).abs().mean(), (theirs.float() - truth).abs().mean()
        assert ours_err <= 1.5 * theirs_err + 1e-3, (ours_err, theirs_err)

    def check_one_token_step(self, tmp_path_factory) -> None:
        """The eager one-token step (autolm.step) gives the general forward's greedy tokens and logits."""
        from test_decode_steps import greedy_steps

        directory, _ = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
        plain_tokens, plain = greedy_steps(model, ids, 20, "forward")
        tokens, logits = greedy_steps(model, ids, 20, "eager")
        assert tokens == plain_tokens
        torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)

    def check_compiled_step(self, tmp_path_factory, home=None) -> None:
        """The one-token step's graphs derived from the family's own layers (no code of its own), for one row
        and for a left-padded batch, give the general forward's greedy tokens and logits in fp32. They are
        exported and run as exported (what the compiled code computes); AUTOLM_TEST_COMPILE=1 compiles them with
        AOTInductor too (a minute a graph; tests/test_compiled_step.py compiles representative models in the
        suite). `home`: an AUTOLM_HOME for compiled packages."""
        with pytest.MonkeyPatch.context() as mp:  # the suite's AUTOLM_EAGER=1 comes back afterwards
            mp.delenv("AUTOLM_EAGER", raising=False)
            if home is not None:
                mp.setenv("AUTOLM_HOME", str(home))
            self._compiled_step_tokens(tmp_path_factory)

    def _compiled_step_tokens(self, tmp_path_factory) -> None:
        from test_decode_steps import greedy_steps

        from autolm import step
        from autolm.step import graphs

        compile_too = os.environ.get("AUTOLM_TEST_COMPILE") == "1"
        directory, _ = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
        plain_tokens, plain = greedy_steps(model, ids, 20, "forward")
        if compile_too:
            assert model.precompile_decode(batched=True), (
                "the compiled step failed for this family (see the warning)"
            )
        else:
            step.install_plan(model, graphs.exported(model))
            step.install_plan(model, graphs.exported(model, batched=True), batched=True)
        tokens, logits = greedy_steps(model, ids, 20, "auto")
        assert step._PLANS[model][1] is not None
        assert tokens == plain_tokens
        torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
        ids, mask = padded_batch(seed=4)
        outs = []
        for mode in ("forward", "auto"):
            model.decode_mode = mode
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True))  # fmt: skip
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        torch.testing.assert_close(
            torch.stack(outs[1].logits), torch.stack(outs[0].logits), atol=1e-4, rtol=1e-4
        )

    def check_hidden_states(self, tmp_path_factory) -> None:
        """output_hidden_states: each layer's input, then the final norm's output, in transformers' shapes (a
        hyper-connection family's streams as (B, T, hc_mult, h)) and values."""
        directory, hf = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            theirs = hf(ids, output_hidden_states=True).hidden_states
            ours = model(ids, output_hidden_states=True).hidden_states
        assert len(ours) == len(theirs)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(
                a, b, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"hidden state {i}: {m}"
            )

    def check_gguf_refused(self, tmp_path_factory, tmp_path, field: str, change) -> None:
        """GGUF out of a config llama.cpp would compute otherwise (or not load): a ConfigError naming `field`, and
        no file left. change(config) alters the loaded model's config."""
        from test_family_phi import _byte_tokenizer

        from autolm.gguf_writer import save_gguf

        model = autolm.AutoModelForCausalLM.from_pretrained(self.checkpoint(tmp_path_factory)[0])
        change(model.config)
        path = tmp_path / "m.gguf"
        with pytest.raises(autolm.ConfigError, match=field):
            save_gguf(model, _byte_tokenizer(tmp_path / "tokenizer"), str(path), "f32")
        assert not path.exists()

    def check_recurrent(self, tmp_path_factory, tmp_path) -> None:
        """A family with recurrent layers (their state in the cache): a left-padded batch run in two pieces
        through the cache gives the whole batch's logits; the serving engine (a prefill of 4 tokens per forward,
        rows joining a running batch) gives each prompt's greedy tokens; speculation gives greedy decoding's
        tokens (the rejected candidates dropped from the states: _check_speculation); and
        where the compiled one-token graphs serve the family, they carry the states (check_compiled_step)."""
        import shutil

        from conftest import write_char_tokenizer

        directory, _ = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        assert model.recurrent
        ids, mask = padded_batch()
        with torch.no_grad():
            whole = model(ids, attention_mask=mask).logits
            first = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
            assert first.past_key_values.states, "no recurrent state was kept"
            second = model(ids[:, 6:], attention_mask=mask, past_key_values=first.past_key_values)
        pieces = torch.cat([first.logits, second.logits], 1)
        torch.testing.assert_close(pieces[mask.bool()], whole[mask.bool()], atol=1e-4, rtol=1e-4)
        _check_speculation(model, directory, ids, mask)
        served = tmp_path / "served"
        shutil.copytree(directory, served)
        write_char_tokenizer(str(served))
        prompts = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
        want = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p) :].tolist()
                for p in prompts]  # fmt: skip
        assert _engine_tokens(model, autolm.AutoTokenizer.from_pretrained(served), prompts, 12) == want
        from autolm import step

        if step.compilable(model):
            self.check_compiled_step(tmp_path_factory)

    def check_pieces(self, tmp_path_factory):
        """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (pieces starting and ending inside the
        recurrent layers' chunks, single tokens between them) give the logits of one forward, and transformers'.
        Returns the cache after the pieces, for the family's own checks of what it keeps."""
        directory, hf = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ids = torch.randint(3, VOCAB, (2, 70), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            whole = model(ids).logits
            cache, parts, start = None, [], 0
            for n in (5, 13, 1, 1, 30, 20):
                out = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
                cache, start = out.past_key_values, start + n
                parts.append(out.logits)
            theirs = hf(ids).logits
        torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(whole, theirs, atol=1e-4, rtol=1e-4)
        return cache

    def check_long_generation(
        self, tmp_path_factory, new=45, seed=3, exact_length=False, whole_atol=None
    ) -> None:
        """A 30-token prompt and `new` greedy tokens (a recurrent family: its chunked scan over the prompt, then the
        one-step recurrence, crossing the chunks' boundaries) are transformers' tokens; `exact_length`: no earlier
        stop at EOS; `whole_atol`: the decoded logits equal the whole sequence's in one forward within it."""
        directory, hf = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(seed))
        lengths = dict(max_new_tokens=new, **(dict(min_new_tokens=new) if exact_length else {}))
        out = model.generate(
            ids, do_sample=False, output_logits=True, return_dict_in_generate=True, **lengths
        )
        assert torch.equal(out.sequences, hf.generate(ids, do_sample=False, **lengths))
        if whole_atol is not None:
            with torch.no_grad():
                whole = model(out.sequences).logits[0, 29:-1]
            torch.testing.assert_close(torch.cat(out.logits), whole, atol=whole_atol, rtol=whole_atol)

    # ---- adapters, quantization, saving, placement ------------------------------------------------

    def check_lora(
        self,
        tmp_path_factory,
        tmp_path,
        dora: bool = False,
        targets: list[str] | None = None,
        slots: bool = False,
        adapted: tuple[str, ...] = (),
    ) -> None:
        """peft's default target modules for the type (`targets`: these; else the Family's lora_targets): an
        adapter peft made gives peft's logits in autolm; an adapter autolm made gives the same logits in peft;
        merging changes nothing (`dora`: DoRA adapters). The modules autolm's adapter holds are exactly `adapted`
        (default: `targets`) where given. `slots`: a type whose default positions are the cache's slots, as
        transformers' (BERT's, GIT's, ...): the padding mask's positions are given to autolm too."""
        import peft

        directory, hf = self.checkpoint(tmp_path_factory)
        ids, mask = padded_batch(seed=5)
        real, pos = mask.bool(), positions(mask)
        given = {"position_ids": pos} if slots else {}
        pm = peft.get_peft_model(
            hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or self.lora_targets, use_dora=dora)
        )
        _randomize_lora(pm)
        pm.save_pretrained(tmp_path / "peft")
        with torch.no_grad():
            expected = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
        pm.unload()
        ours = autolm.PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory),
                                                str(tmp_path / "peft"))  # fmt: skip
        if adapted or targets:
            held = {n.split(".")[-4] for n, _ in ours.named_parameters() if ".lora_A." in n}
            assert held == set(adapted or targets)
        with torch.no_grad():
            got = ours(ids, attention_mask=mask, **given).logits[real]
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            ours.save_pretrained(tmp_path / "ours")
            back = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
            again = back(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
            torch.testing.assert_close(again, expected, atol=1e-4, rtol=1e-4)
            back.unload()
            merged = ours.merge_and_unload()(ids, attention_mask=mask, **given).logits[real]
            torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)

    def check_quantized(self, tmp_path_factory, bits: str) -> None:
        """int8 / int4 (experts included) stay close to the fp32 model; where a tiny random model is too harsh on
        the quantization for that, its error must be the quantization's own: no larger than the fp32 model's
        with the weights the quantized layers stand for (their dequantized values)."""
        directory, _ = self.checkpoint(tmp_path_factory)
        ids, mask = padded_batch()
        real = mask.bool()
        full = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        quant = autolm.AutoModelForCausalLM.from_pretrained(directory, quantization=bits)
        assert any(type(m).__name__.startswith("Int") for m in quant.modules())
        with torch.no_grad():
            truth = full(ids, attention_mask=mask).logits[real]
            got = quant(ids, attention_mask=mask).logits[real].float()
            err = (got - truth).abs().mean()
            if err <= (0.08 if bits == "int8" else 0.25) * truth.abs().mean():
                return
            for name, m in quant.named_modules():
                if hasattr(m, "dequantized_parameters"):  # stacked experts
                    for p, w in m.dequantized_parameters().items():
                        setattr(full.get_submodule(name), p, torch.nn.Parameter(w))
                elif hasattr(m, "dequantize"):  # a new Parameter: a tied embedding keeps its values
                    full.get_submodule(name).weight = torch.nn.Parameter(m.dequantize())
            ideal = (full(ids, attention_mask=mask).logits[real] - truth).abs().mean()
        assert err <= 1.1 * ideal, (bits, err, ideal)

    def check_save(self, tmp_path_factory, tmp_path) -> None:
        """autolm's save_pretrained loads in transformers with equal logits, and back in autolm bit-identical."""
        directory, _ = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        model.save_pretrained(tmp_path / "saved")
        theirs = self.hf_auto().from_pretrained(tmp_path / "saved", attn_implementation=self.hf_attention)
        ids, mask = padded_batch()
        real = mask.bool()
        with torch.no_grad():
            a = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
            b = theirs(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(a, b, atol=self.atol, rtol=self.atol)
        back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        sd = model.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())

    def check_disk_offload(self, tmp_path_factory, tmp_path) -> None:
        """With max_memory at half the model and the rest on disk: the in-memory model's logits and tokens."""
        directory, _ = self.checkpoint(tmp_path_factory)
        full = autolm.AutoModelForCausalLM.from_pretrained(directory)
        size = sum(p.numel() * p.element_size() for p in {id(p): p for p in full.parameters()}.values())
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, device_map="auto",
                                                            max_memory={"cpu": size // 2, "disk": 0},
                                                            offload_folder=tmp_path / "offload")  # fmt: skip
        assert "disk" in set(model.hf_device_map.values())
        ids, mask = padded_batch()
        with torch.no_grad():
            torch.testing.assert_close(
                model(ids, attention_mask=mask).logits, full(ids, attention_mask=mask).logits
            )
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                           full.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))  # fmt: skip

    def check_names_and_config(self, tmp_path_factory, tmp_path, tp_plan: bool = False):
        """transformers' parameter names and shapes; config.json saved back holds the checkpoint's keys and values,
        no others; with tp_plan, transformers' tensor-parallel plan. Gives (autolm's model, transformers')."""
        directory, hf = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
            k: tuple(v.shape) for k, v in hf.state_dict().items()
        }
        model.config.save_pretrained(tmp_path)
        written = json.loads((tmp_path / "config.json").read_text())
        original = json.loads(open(os.path.join(directory, "config.json")).read())
        for d in (written, original):
            d.pop("transformers_version", None)
        assert written == original
        if tp_plan:
            assert type(model).tp_patterns == dict(hf.config.base_model_tp_plan)
        return model, hf

    def check_top_level_rope(self, tmp_path_factory, tmp_path, top: dict):
        """A config.json as the Hub ships older checkpoints (transformers 4's spelling): no rope_parameters, `top`'s
        keys (rope_theta, partial_rotary_factor, rope_scaling ...) at the top level instead. autolm reads it with
        transformers' logits and saves it back in that spelling, `top`'s values as given, which transformers loads
        with equal logits. Gives the loaded config."""
        import transformers

        directory, hf = self.checkpoint(tmp_path_factory)
        shutil.copytree(directory, tmp_path / "v4")
        path = tmp_path / "v4" / "config.json"
        d = json.loads(path.read_text())
        d.pop("rope_parameters")
        path.write_text(json.dumps({**d, **top}))
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "v4")
        ids, mask = padded_batch()
        real = mask.bool()
        with torch.no_grad():
            want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
            torch.testing.assert_close(
                model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4
            )
        model.save_pretrained(tmp_path / "saved")
        saved = json.loads((tmp_path / "saved" / "config.json").read_text())
        assert "rope_parameters" not in saved and {k: saved.get(k) for k in top} == top
        back = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "saved", attn_implementation=self.hf_attention
        )
        assert type(back) is type(hf)
        with torch.no_grad():
            got = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        return model.config

    def check_learned_positions(self, tmp_path_factory) -> None:
        """Learned positions (n_positions of them) follow the padding: a left-padded row gives the unpadded row's
        logits; a position past n_positions is a clear error."""
        from autolm.errors import GenerationError

        model = autolm.AutoModelForCausalLM.from_pretrained(self.checkpoint(tmp_path_factory)[0])
        ids, mask = padded_batch(lengths=(9, 5))
        with torch.no_grad():
            batch = model(ids, attention_mask=mask).logits[1, -5:]
            alone = model(ids[1:, -5:]).logits[0]
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        n = model.config.n_positions
        with pytest.raises(GenerationError, match="n_positions"):
            model.generate(ids[:1], max_new_tokens=n, do_sample=False, min_new_tokens=n)

    def check_correction_bias(self, tmp_path_factory, tmp_path) -> None:
        """Random router correction biases (which change the experts chosen), saved by transformers: its logits."""
        import copy

        hf = copy.deepcopy(self.checkpoint(tmp_path_factory)[1])
        g = torch.Generator().manual_seed(1)
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g))
        hf.save_pretrained(tmp_path)
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
        named = [*model.named_buffers(), *model.named_parameters()]
        biases = [b for n, b in named if n.endswith("e_score_correction_bias")]
        assert biases and all(b.abs().sum() > 0 for b in biases)
        same_logits(model, hf)

    def check_saved_files(self, tmp_path_factory, tmp_path):
        """check_save, then: transformers' names and shapes in the state dict, the checkpoint's tensor names in the
        file autolm saved, and config.json's keys and values (v4's "type" beside rope_type aside). Gives (autolm's
        model, the saved tensor names)."""
        from safetensors import safe_open

        self.check_save(tmp_path_factory, tmp_path)
        directory, hf = self.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
            k: tuple(v.shape) for k, v in hf.state_dict().items()
        }
        with (
            safe_open(f"{directory}/model.safetensors", "pt") as theirs,
            safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
        ):
            saved = set(ours.keys())
            assert saved == set(theirs.keys())
        written, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
        for d in (written, original):
            d.pop("transformers_version", None)
            d.get("rope_parameters", {}).pop("type", None)  # transformers keeps v4's "type" beside rope_type
        assert written == original
        return model, saved


def _check_speculation(model, directory, ids, mask) -> None:
    """Greedy speculation on a recurrent model (a left-padded batch) gives plain greedy decoding's tokens, with
    candidates from n-grams of the sequence and from a draft (the same checkpoint, perturbed) that keeps recurrent
    states too: rejected candidates went back through the caches' marks (KVCache.restore ran)."""
    from unittest import mock

    from autolm.nn.cache import KVCache

    prompt = torch.cat([ids, ids[:, -6:], ids[:, -6:]], 1)  # repeated n-grams for prompt lookup to find
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 12)], 1)
    greedy = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    plain = model.generate(prompt, **greedy)
    draft = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    with mock.patch.object(KVCache, "restore", autospec=True, side_effect=KVCache.restore) as restore:
        assert torch.equal(model.generate(prompt, prompt_lookup_num_tokens=3, **greedy), plain)
        assert torch.equal(model.generate(prompt, assistant_model=draft, **greedy), plain)
    assert restore.call_count, "no candidate was rejected: the check proved nothing"


def _engine_tokens(model, tok, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Each prompt's tokens from the serving engine: the first alone, the others joining after its first token."""
    import queue

    from autolm.generation import GenerationConfig
    from autolm.serve.engine import Engine, Sequence
    from autolm.serve.events import Failed, Finished

    engine = Engine(model, tok, max_batch=4, prefill_chunk=4)
    events: queue.Queue = queue.Queue()
    done: dict[int, list[int]] = {}

    def take() -> None:
        k, ev = events.get(timeout=300)
        assert not isinstance(ev, Failed), ev.message
        if isinstance(ev, Finished):
            done[k] = ev.all_token_ids

    try:
        for k, p in enumerate(prompts):
            cfg = GenerationConfig(max_new_tokens=new, eos_token_id=2, do_sample=False)  # as generate() stops
            engine.submit(Sequence(p, cfg, [], lambda ev, k=k: events.put((k, ev))))
            if k == 0:
                take()  # the first row's first token before the others join
        while len(done) < len(prompts):
            take()
    finally:
        engine.stop()
    return [done[k] for k in range(len(prompts))]


@dataclass
class RoutedFamily(Family):
    """A Family whose checkpoint's routers' e_score_correction_bias buffers are random too."""

    random_buffers: tuple[str, ...] = ("e_score_correction_bias",)


def _randomize_buffers(model, suffixes: tuple[str, ...], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if suffixes and name.endswith(suffixes):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def check_loss_and_gradients(directory: str, hf, ids: torch.Tensor) -> None:
    """labels=ids in training mode: transformers' loss, and every gradient transformers' model computes."""
    model = autolm.AutoModelForCausalLM.from_pretrained(directory).train()
    hf.train()
    try:
        ours, theirs = model(ids, labels=ids), hf(input_ids=ids, labels=ids)
        ours.loss.backward()
        theirs.loss.backward()
    finally:
        hf.eval()
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    mine = dict(model.named_parameters())
    for name, p in hf.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-4, rtol=1e-3)
        p.grad = None


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def check_lora_needs_targets(directory: str, hf) -> None:
    """A type peft has no default target modules for: a LoraConfig naming none is an error in peft and in autolm,
    which names the model type."""
    import peft

    from autolm.errors import AdapterError

    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(hf, peft.LoraConfig(r=4))
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    kind = model.config.model_type
    with pytest.raises(AdapterError, match=f"no default target_modules for model_type '{kind}'"):
        autolm.get_peft_model(model, autolm.LoraConfig(r=4))


def same_logits(model, hf) -> None:
    """autolm's `model` gives transformers' `hf` logits on a left-padded batch (1e-4), over the real tokens."""
    ids, mask = padded_batch()
    real, pos = mask.bool(), positions(mask)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits[real]
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def check_config_defaults(config_cls: type) -> None:
    """Every field autolm's config class writes by default holds transformers' default for it."""
    import transformers

    ours, theirs = config_cls(), getattr(transformers, config_cls.__name__)()
    for key, value in ours.to_dict().items():
        if key not in ("model_type", "transformers_version"):
            assert getattr(theirs, key) == value, key


def check_wrapper_lora(
    family: Family, tmp_path_factory, tmp_path, text=lambda key: ".language_model." in key
) -> None:
    """An adapter peft made on transformers' image-text model gives peft's logits in autolm (the towers' adapters
    skipped); autolm saves it under the text model's names, the language model's tensors peft saved (peft cannot
    load text names onto the image-text model; `text` picks them from peft's file); merging changes nothing."""
    import peft
    from safetensors.torch import load_file

    directory, hf = family.checkpoint(tmp_path_factory)
    ids, mask = padded_batch(seed=5)
    real = mask.bool()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets))
    _randomize_lora(pm)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask).logits[real]
    pm.unload()
    ours = autolm.PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory),
                                            str(tmp_path / "peft"))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
        ours.save_pretrained(tmp_path / "ours")
        theirs = {k.replace("model.language_model.", "model."): v
                  for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()
                  if text(k)}  # fmt: skip
        saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        assert saved.keys() == theirs.keys() and all(torch.equal(saved[k], theirs[k]) for k in saved)
        merged = ours.merge_and_unload()(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
