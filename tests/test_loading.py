"""from_pretrained: resolution, formats, dtype, no random init, strictness, the load report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB

import autolm
from autolm.errors import CheckpointError, ConfigError, ResolveError


def _ids():
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def test_no_parameter_is_randomly_initialised(checkpoint, monkeypatch):
    directory, _ = checkpoint("qwen2_tied_bias")
    calls = []
    for fn in (
        "normal_",
        "uniform_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "trunc_normal_",
        "zeros_",
        "ones_",
    ):
        monkeypatch.setattr(torch.nn.init, fn, lambda t, *a, _fn=fn, **k: calls.append((_fn, t.device.type)))
    for fn in ("normal_", "uniform_", "random_", "bernoulli_"):
        monkeypatch.setattr(torch.Tensor, fn, lambda t, *a, _fn=fn, **k: calls.append((_fn, t.device.type)))
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    # Modules are built on the meta device: init calls there touch no memory and draw no numbers.
    assert [c for c in calls if c[1] != "meta"] == []
    assert all(p.device.type == "cpu" for p in model.parameters())


def link_or_copy(src, dst) -> None:
    """A hard link to src at dst (no disk used: the suite's checkpoints are hundreds of MB), a copy where the
    file system has none; saves replace files (autolm._atomic), never write into them, so the source stays."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def hf_cache_layout(directory, repo, commit: str):
    """Lay a checkpoint out as huggingface_hub does: each file once in blobs/ (named by its hash), the
    snapshot a folder of relative symlinks into blobs/, refs/main naming the commit."""
    import hashlib

    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in os.listdir(directory):
        digest = hashlib.sha256()
        with open(os.path.join(directory, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        blob = digest.hexdigest()
        link_or_copy(os.path.join(directory, name), repo / "blobs" / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_repo_id_resolves_from_hf_cache_layout(checkpoint, tmp_path, monkeypatch):
    directory, ref = checkpoint("qwen2_tied_bias")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache_layout(directory, tmp_path / "hub" / "models--acme--tiny-qwen", commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = autolm.AutoModelForCausalLM.from_pretrained("acme/tiny-qwen")
    assert model.load_report.directory == str(repo / "snapshots" / commit)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits, atol=1e-5, rtol=1e-5)
    # HF_HOME/hub is the fallback when HF_HUB_CACHE is unset.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert autolm.AutoConfig.from_pretrained("acme/tiny-qwen").hidden_size == 48
    with pytest.raises(ResolveError, match="not found in the Hugging Face cache"):
        autolm.AutoModelForCausalLM.from_pretrained("acme/missing")
    # A sharded checkpoint too, by repo id and by snapshot path; a link out of the repo's folder is refused.
    sharded, ref2 = checkpoint("llama_gqa_llama3_sharded")
    repo2 = hf_cache_layout(sharded, tmp_path / "models--acme--sharded", commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for name in ("acme/sharded", str(repo2 / "snapshots" / commit)):
        model = autolm.AutoModelForCausalLM.from_pretrained(name)
        with torch.no_grad():
            torch.testing.assert_close(model(_ids()).logits, ref2(_ids()).logits, atol=1e-5, rtol=1e-5)
    snap = repo2 / "snapshots" / commit
    shard = sorted(f for f in os.listdir(snap) if f.endswith(".safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(snap / shard, outside)
    os.unlink(snap / shard)
    os.symlink(outside, snap / shard)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        autolm.AutoModelForCausalLM.from_pretrained("acme/sharded")


def test_pytorch_bin_checkpoint(checkpoint, tmp_path):
    directory, ref = checkpoint("llama_gqa_llama3_sharded")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    shutil.copy(os.path.join(directory, "config.json"), tmp_path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.load_report.format == "bin"
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits, atol=1e-5, rtol=1e-5)


def test_dtype_choices(checkpoint):
    directory, _ = checkpoint("llama_bf16")
    auto = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert auto.dtype == torch.bfloat16 and auto.load_report.cast_tensors == 0
    fp32 = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert fp32.dtype == torch.float32 and fp32.load_report.cast_tensors > 0
    assert autolm.AutoModelForCausalLM.from_pretrained(directory, dtype="float16").dtype == torch.float16
    with pytest.raises(ConfigError, match="dtype"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, dtype="int3")


def test_zero_copy_when_dtype_matches(checkpoint):
    directory, _ = checkpoint("qwen2_tied_bias")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    import ctypes

    from autolm.sources.safetensors import SafetensorsFile

    st = SafetensorsFile(os.path.join(directory, "model.safetensors"))
    t = st.get("model.norm.weight")
    base = ctypes.addressof(ctypes.c_char.from_buffer(st._mapped()))
    assert t.data_ptr() - base == st.infos["model.norm.weight"].start  # a view of the mapped file, no copy
    assert model.load_report.zero_copy_tensors == model.load_report.tensors


def test_missing_unexpected_and_misshaped_tensors_are_clear_errors(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = checkpoint("qwen2_tied_bias")
    sd = load_file(os.path.join(directory, "model.safetensors"))
    shutil.copy(os.path.join(directory, "config.json"), tmp_path)
    broken = dict(sd)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    broken["model.extra.weight"] = torch.zeros(2)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight: checkpoint (3, 3)" in msg


def test_unknown_model_type_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))  # an image classifier
    with pytest.raises(
        ConfigError, match="'vit' is not supported; supported model types: .*gemma2, .*, llama, "
    ):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_a_remote_code_model_type_is_read_by_its_architecture(checkpoint, tmp_path):
    """Kimi K2's config.json says model_type "kimi_k2" (remote code) and architectures DeepseekV3ForCausalLM: read
    as DeepSeek-V3's, as vLLM picks the model by its architecture, with transformers' logits for the same weights;
    saved, it is a DeepSeek-V3 checkpoint without the remote code's auto_map. A model_type no family has whose
    architecture autolm has no class for is still refused by name."""
    import shutil

    directory, ref = checkpoint("deepseek_v3")
    shutil.copytree(directory, tmp_path / "kimi")
    config = json.loads((tmp_path / "kimi" / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    (tmp_path / "kimi" / "config.json").write_text(json.dumps(config))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "kimi")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v3" and "auto_map" not in saved
    config.update(model_type="deepseek", architectures=["DeepseekForCausalLM"])  # DeepSeek V1: no class
    (tmp_path / "kimi" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'deepseek' is not supported"):
        autolm.AutoConfig.from_pretrained(tmp_path / "kimi")


def test_config_round_trip_keeps_unknown_keys(checkpoint, tmp_path):
    directory, _ = checkpoint("mistral_sliding")
    with open(os.path.join(directory, "config.json")) as f:
        original = json.load(f)
    original["my_custom_key"] = {"a": 1}
    cfg = autolm.MistralConfig.from_dict(original)
    out = cfg.to_dict()
    for k, v in original.items():
        if k in ("torch_dtype",):
            continue
        assert out[k] == v, k


def test_register_a_new_family(checkpoint, tmp_path, private_registry):
    from dataclasses import dataclass
    from typing import ClassVar

    from autolm.models import LlamaForCausalLM, register

    @dataclass
    class MyConfig(autolm.LlamaConfig):
        model_type: ClassVar[str] = "my-llama"

    class MyModel(LlamaForCausalLM):
        pass

    register("my-llama", MyConfig, MyModel)
    directory, _ref = checkpoint("llama_gqa_llama3_sharded")
    shutil.copytree(directory, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    d = json.loads(cfg_path.read_text())
    d["model_type"] = "my-llama"
    cfg_path.write_text(json.dumps(d))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(model) is MyModel


def test_every_type_transformers_causal_lm_maps_loads():
    """Every model type transformers' AutoModelForCausalLM maps (the pinned version's) is in autolm's registry."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(autolm.models.model_types())) == []


def test_the_family_table_names_each_familys_classes_and_gguf_layout():
    """models.FAMILIES, read before a family's file is imported, says what the file declares."""
    import importlib

    from autolm.models import FAMILIES, gguf_layouts

    for model_type, (module, config, model, arch) in FAMILIES.items():
        mod = importlib.import_module(f"autolm.models.{module}")
        config_cls, model_cls = getattr(mod, config), getattr(mod, model)
        assert config_cls.model_type == model_type, model_type
        # an image-text type (gemma3, qwen2_5_vl, mistral3, ...) loads its language model
        text = {getattr(config_cls, "text_class", None), *getattr(config_cls, "text_classes", {}).values()}
        # a type transformers reads with another type's config class (gpt-sw3: GPT2Config) subclasses autolm's
        alias = issubclass(config_cls, model_cls.config_class)
        assert model_cls.config_class is config_cls or model_cls.config_class in text or alias, model_type
        layouts = [g.arch for g in gguf_layouts(model_cls)]
        assert layouts == ([arch] if isinstance(arch, str) else list(arch or ())), model_type
        # `autolm.<Family>Config` / `autolm.<Family>ForCausalLM`, as transformers exports them
        assert getattr(autolm, config) is config_cls and getattr(autolm, model) is model_cls, model_type


def test_a_load_imports_its_own_family_alone(checkpoint):
    """Loading a Llama checkpoint (or a GGUF file of llama.cpp's "llama" architecture) imports llama's file, and
    those of Mistral, Mixtral, InternLM3 and IQuestCoder, which llama.cpp also writes as "llama", not the other families'."""
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    script = (
        "import sys, autolm\n"
        f"autolm.AutoModelForCausalLM.from_pretrained({str(directory)!r})\n"
        "from autolm.models import gguf_family\n"
        "assert gguf_family({'general.architecture': 'llama'}).__name__ == 'LlamaForCausalLM'\n"
        "assert gguf_family({'general.architecture': 'llama', 'llama.expert_count': 8}).__name__ == "
        "'MixtralForCausalLM'\n"
        "print(sorted(m for m in sys.modules if m.startswith('autolm.models.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    # families: the table; heads, question_answering: the other heads on any family's body; image_text: the
    # image-text checkpoints' rules Mistral reads by; none a family
    imported = [
        "autolm.models.base",
        "autolm.models.families",
        "autolm.models.heads",
        "autolm.models.image_text",
        "autolm.models.internlm3",
        "autolm.models.interop",
        "autolm.models.iquestcoder",
        "autolm.models.llama",
        "autolm.models.mistral",
        "autolm.models.mixtral",
        "autolm.models.output",
        "autolm.models.question_answering",
    ]
    assert out.stdout.split("\n")[-2] == str(imported)


FAULTS_SCRIPT = """
import resource, sys, torch
import autolm
from autolm.models import LlamaConfig
from autolm.models.llama import LlamaForCausalLM
torch.set_num_threads(1)
if sys.argv[1] != "-":
    from autolm.malloc import keep_freed_memory
    keep_freed_memory()  # the only difference between the two runs
cfg = LlamaConfig(vocab_size=160, hidden_size=512, intermediate_size=2816, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2)
model = LlamaForCausalLM(cfg).eval()
x = torch.randint(0, 160, (1, 512))
with torch.no_grad():
    model(x)  # warm up
    faults = []
    for _ in range(7):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[3])  # the median forward's
"""


def test_keep_freed_memory_stops_page_faults_per_op():
    """Forward passes with megabyte activations page-fault their outputs anew under glibc's default
    malloc settings (~10,000 faults per forward here: how many depends on glibc's dynamic thresholds and the
    OS's huge pages); after the opt-in keep_freed_memory() (the CLI, server and bench call it) they reuse freed
    memory: the median forward of seven faults in (almost) nothing. (The heap still grows now and then where
    its free space is split too finely for a new block: one forward in several faults in one activation.)"""
    from autolm.malloc import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc")
    runs = {
        arg: int(
            subprocess.run(
                [sys.executable, "-c", FAULTS_SCRIPT, arg], capture_output=True, text=True, check=True
            ).stdout
        )
        for arg in ("-", "tuned")
    }
    assert runs["tuned"] < 500, runs  # a forward's activations are ~11,000 pages; 0 or 1 fault seen here
    if runs["-"] > 5000:  # where the default settings do fault, the tuned ones cut that tenfold at least
        assert runs["tuned"] < runs["-"] / 10, runs


def test_huge_page_tensor_is_memory_of_its_own():
    """malloc.huge_page_tensor: the bytes asked for, writable, over whole huge pages that live as long as the
    tensor (or a view of it) does; a private mapping, so nothing else sees its writes."""
    import gc

    from autolm.malloc import HUGE_PAGE, huge_page_tensor

    t = huge_page_tensor(3 << 20)
    assert t.dtype == torch.uint8 and t.numel() == 3 << 20
    assert t.untyped_storage().nbytes() == 2 * HUGE_PAGE
    view = t[1 << 20 :]
    del t
    gc.collect()
    view.fill_(7)
    assert int(view.sum()) == 7 * (2 << 20)
    assert huge_page_tensor(10).untyped_storage().nbytes() == HUGE_PAGE
