"""Broken and hostile files: each gets a clear autolm error; no code runs; no raw exceptions or hangs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autolm
from autolm.errors import AutolmError, CheckpointError, ConfigError
from autolm.sources.safetensors import read_safetensors_header


def _write_st(path, header: dict | bytes, data: bytes = b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


GOOD = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]},
}
BROKEN_HEADERS = {
    "unknown dtype": ({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
    "out of bounds": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "outside"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12"),
    "overlap": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        12,
        "overlaps",
    ),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "gap"),
    "bad shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    "bad offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, 8, "invalid data_offsets"),
    "not an object": (b"[1, 2]", 0, "JSON object"),
    "invalid json": (b"{nope", 0, "not valid JSON"),
    "trailing bytes": (GOOD, 20, "data area holds"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_HEADERS))
def test_broken_safetensors_headers(tmp_path, case):
    header, nbytes, message = BROKEN_HEADERS[case]
    path = tmp_path / "model.safetensors"
    _write_st(path, header, b"\0" * nbytes)
    with pytest.raises(CheckpointError, match=message) as e:
        read_safetensors_header(str(path))
    assert "model.safetensors" in str(e.value)


def test_header_length_lies(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**7) + b"{}")
    with pytest.raises(CheckpointError, match="runs past the end"):
        read_safetensors_header(str(path))
    path.write_bytes(struct.pack("<Q", 10**12))
    with pytest.raises(CheckpointError, match="exceeds"):
        read_safetensors_header(str(path))
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        read_safetensors_header(str(path))


@pytest.fixture()
def model_dir(checkpoint, tmp_path):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    out = tmp_path / "m"
    shutil.copytree(directory, out)
    return out


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _set_index(d, index):
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "shard,message",
    [
        ("model-09999-of-09999.safetensors", "does not exist"),
        ("../outside.safetensors", "outside the model directory"),
        ("/etc/passwd", "relative file name"),
        ("", "relative file name"),
    ],
)
def test_index_pointing_at_bad_shards(model_dir, shard, message):
    index = _index(model_dir)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (model_dir.parent / "outside.safetensors").write_bytes(b"")
    _set_index(model_dir, index)
    with pytest.raises(CheckpointError, match=message):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)


def test_symlinked_shard_escaping_the_directory(model_dir, tmp_path):
    index = _index(model_dir)
    name = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(model_dir / name, outside)
    os.symlink(outside, model_dir / name)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)


def test_tensor_in_two_shards(model_dir):
    from safetensors.torch import load_file, save_file

    shards = sorted(set(_index(model_dir)["weight_map"].values()))
    a, b = load_file(model_dir / shards[0]), load_file(model_dir / shards[1])
    b.update({next(iter(a)): next(iter(a.values()))})
    save_file(b, model_dir / shards[1])
    with pytest.raises(CheckpointError, match="appears in two files"):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)


def test_malformed_index(model_dir):
    (model_dir / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)
    _set_index(model_dir, {"weight_map": []})
    with pytest.raises(CheckpointError, match="weight_map"):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hidden_size": "big"}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
        ({"num_key_value_heads": 3}, "must divide"),
        ({"head_dim": None, "hidden_size": 66}, "not divisible"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "needs a numeric 'factor'"),
        ({"rope_parameters": {"rope_type": "weird", "rope_theta": 1.0}}, "not supported"),
        ({"rope_parameters": [1, 2]}, "must be an object"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_configs(model_dir, change, message):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(change)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        autolm.AutoModelForCausalLM.from_pretrained(model_dir)


def test_config_not_json(model_dir):
    (model_dir / "config.json").write_text("{]")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        autolm.AutoConfig.from_pretrained(model_dir)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_does_not_run(tmp_path, checkpoint):
    directory, _ = checkpoint("qwen2_tied_bias")
    shutil.copy(os.path.join(directory, "config.json"), tmp_path)
    marker = tmp_path / "pwned"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2), "evil": _Payload(marker)},
        tmp_path / "pytorch_model.bin",
    )
    with pytest.raises(CheckpointError, match="weights-only"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()


def test_nan_weights_reported_when_asked(tmp_path, checkpoint):
    from safetensors.torch import load_file, save_file

    directory, _ = checkpoint("qwen2_tied_bias")
    shutil.copy(os.path.join(directory, "config.json"), tmp_path)
    sd = load_file(os.path.join(directory, "model.safetensors"))
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, tmp_path / "model.safetensors")
    autolm.AutoModelForCausalLM.from_pretrained(tmp_path)  # opt-in: no check by default
    with pytest.raises(CheckpointError, match="model.norm.weight.*NaN"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, check_finite=True)


# ---- fuzzing: every outcome is a load or an autolm error ---------------------------------------------


@pytest.fixture(scope="module")
def fuzz_source(checkpoint):
    directory, _ = checkpoint("qwen2_tied_bias")
    with open(os.path.join(directory, "model.safetensors"), "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]

    class Source(tuple):
        def __repr__(self):  # keep hypothesis' failure reports short
            return f"<safetensors file of {directory}>"

    return Source((directory, raw[: 8 + n], raw[8 + n :]))


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_safetensors_header(fuzz_source, tmp_path_factory, data):
    _directory, header, body = fuzz_source
    mutated = bytearray(header)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "length"]))
        pos = data.draw(st.integers(0, len(mutated) - 1))
        if kind == "flip":
            mutated[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and len(mutated) > 9:
            del mutated[pos]
        else:
            mutated[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    d = tmp_path_factory.mktemp("fz")
    path = d / "model.safetensors"
    path.write_bytes(bytes(mutated) + body)
    try:
        from autolm.sources.safetensors import SafetensorsFile

        f = SafetensorsFile(str(path))
        for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
            f.get(k)
    except AutolmError:
        pass


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    weight_map=st.dictionaries(
        st.text(max_size=30),
        st.one_of(
            st.text(max_size=30),
            st.sampled_from(["model.safetensors", "../model.safetensors", "/x", "a/../../b"]),
            st.integers(),
            st.none(),
        ),
        max_size=5,
    ),
    metadata=st.one_of(st.none(), st.integers(), st.text()),
)
def test_fuzz_index_files(fuzz_source, tmp_path_factory, weight_map, metadata):
    directory, _, _ = fuzz_source
    d = tmp_path_factory.mktemp("fzi")
    shutil.copy(os.path.join(directory, "config.json"), d)
    shutil.copy(os.path.join(directory, "model.safetensors"), d)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": metadata, "weight_map": weight_map})
    )
    with contextlib.suppress(AutolmError):
        autolm.AutoModelForCausalLM.from_pretrained(d)
