"""Reading artifact folders: every technique reads back, and what the runtime cannot serve is refused by name."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub.artifact import ArtifactError, Technique, check_tensors, parse_tensors, read_adapter, technique_of
from hub.errors import InvalidName
from hub.manifest import artifact_files


@pytest.mark.parametrize("technique", ["lora", "ia3", "prompt_tuning", "bitfit", "bottleneck"])
def test_every_technique_reads_back_bit_for_bit(technique, technique_adapters):
    folder = technique_adapters[technique]
    adapter = read_adapter(folder)
    assert adapter.technique is Technique(technique)
    saved = load_file(folder / "adapter_model.safetensors")
    assert adapter.tensors.keys() == saved.keys() and all(torch.equal(adapter.tensors[k], saved[k]) for k in saved)
    assert adapter.num_parameters == sum(t.numel() for t in saved.values())


@pytest.mark.parametrize("option, value, message", [
    ("use_dora", True, "use_dora=true is not served"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("layer_replication", [[0, 1]], "layer_replication"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices"),
    ("bias", "all", "LoRA bias='all' is not served"),
])
def test_unservable_peft_options_are_refused_by_name(option, value, message, technique_adapters):
    config = json.loads((technique_adapters["lora"] / "adapter_config.json").read_text())
    with pytest.raises(ArtifactError, match=message):
        technique_of({**config, option: value})


def test_servable_lora_options_are_accepted(technique_adapters):
    config = json.loads((technique_adapters["lora"] / "adapter_config.json").read_text())
    options = {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 4}, "lora_bias": True}
    assert technique_of({**config, **options}) is Technique.LORA


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "LOHA"}, "PEFT type 'LOHA' is not served"),
    ({"peft_type": "PREFIX_TUNING"}, "not served"),
    ({"adapter_type": "compacter"}, "unknown adapter config"),
    ({"config": {"reduction_factor": 16}, "hidden_size": 64}, "must be imported first"),
    ({}, "unknown adapter config"),
])
def test_unknown_techniques_are_refused(config, message):
    with pytest.raises(ArtifactError, match=message):
        technique_of(config)


def test_empty_weights_and_non_object_config_are_refused(technique_adapters, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(technique_adapters["bitfit"], folder)
    save_file({}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ArtifactError, match="holds no tensors"):
        read_adapter(folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a JSON object"):
        read_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ArtifactError, match="no adapter_config.json"):
        read_adapter(folder)


def test_missing_weights_file_is_refused(technique_adapters, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(technique_adapters["ia3"], folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ArtifactError, match="no adapter_model.safetensors"):
        read_adapter(folder)


def test_artifact_files_are_the_flat_non_hidden_files(technique_adapters, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(technique_adapters["lora"], folder)
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert [p.name for p in artifact_files(folder)] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    (folder / "bad name.txt").write_text("x")
    with pytest.raises(InvalidName, match="invalid artifact file name"):
        artifact_files(folder)


# -- parse_tensors: our zero-copy reader of safetensors bytes, against the safetensors library ------------

def _file(header: dict, data: bytes, pad: bool = True) -> bytearray:
    """A safetensors file by hand: little-endian header length, JSON header (space-padded to 8 bytes as
    writers do, unless pad=False), data."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return bytearray(len(raw).to_bytes(8, "little") + raw + data)


def test_parse_tensors_equals_the_safetensors_library_for_every_dtype_and_shape():
    from safetensors.torch import load, save

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen), "bf16": torch.randn(7, generator=gen).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=gen).half(), "f64": torch.randn(3, generator=gen).double(),
        "i64": torch.arange(-4, 5), "i32": torch.arange(6, dtype=torch.int32).view(2, 3),
        "i8": torch.tensor([-1, 2], dtype=torch.int8), "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
    }
    data = save(tensors, metadata={"format": "pt"})
    ours, theirs = parse_tensors(data, "mem"), load(data)
    assert list(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape and torch.equal(ours[key], tensor)


def test_parse_tensors_views_the_buffer_without_copying():
    from safetensors.torch import save

    buf = bytearray(save({"a": torch.ones(4, 4), "b": torch.zeros(8)}))
    ours = parse_tensors(buf, "mem")
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert all(base <= t.data_ptr() < base + len(buf) for t in ours.values())  # inside the file's buffer
    buf[-32:] = torch.full((8,), 2.0).numpy().tobytes()  # writing the buffer shows through: same memory
    assert torch.equal(ours["b"], torch.full((8,), 2.0))


def test_parse_tensors_copies_a_tensor_at_an_unaligned_offset():
    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8 + 2)  # the data starts 2 bytes past an 8-byte boundary
    values = torch.tensor([1.25, -3.0])
    buf = bytearray(len(raw).to_bytes(8, "little") + raw + values.numpy().tobytes())
    x = parse_tensors(buf, "mem")["x"]
    assert torch.equal(x, values) and x.data_ptr() % 4 == 0


def _f32(offsets, shape=(2,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


def _mixed_file(poison: dict[str, float]) -> bytearray:
    """A safetensors file whose tensors lie in runs of one dtype (f32, then f16, then f32 again, with an int
    tensor and an empty one between), `poison` setting the last value of the named tensors."""
    from safetensors.torch import save

    tensors = {"a": torch.ones(3, 4), "b": torch.ones(5), "c": torch.ones(2, 2).half(), "d": torch.ones(3).half(),
               "e": torch.arange(4), "f": torch.ones(6, 1), "g": torch.zeros(0, 3), "h": torch.ones(2)}
    for key, value in poison.items():
        tensors[key].view(-1)[-1] = value
    return bytearray(save(tensors))


@pytest.mark.parametrize("key", ["a", "b", "c", "d", "f", "h"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_anywhere_in_a_run_of_tensors_is_refused_by_name(key, value):
    """parse_tensors views each run of one dtype as one span and check_tensors checks a span at once: every
    tensor's last value (the end of each span included) is still seen, and named."""
    tensors = parse_tensors(_mixed_file({}), "mem")
    tensors.pop("e")  # an integer tensor is refused for its dtype; here only finiteness is under test
    check_tensors(tensors, "mem")
    poisoned = parse_tensors(_mixed_file({key: value}), "mem")
    poisoned.pop("e")
    with pytest.raises(ArtifactError, match=f"tensor '{key}' holds non-finite values"):
        check_tensors(poisoned, "mem")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_values_whose_sum_overflows_are_not_refused(dtype):
    """The check sums first (a NaN or an inf makes the sum so); a sum that overflows on finite values alone takes
    the exact check instead of refusing them."""
    big = torch.finfo(dtype).max
    check_tensors({"x": torch.tensor([big] * 4 + [big / 3] * 3, dtype=dtype), "y": torch.full((5,), -big, dtype=dtype)},
                  "mem")
    with pytest.raises(ArtifactError, match="tensor 'x' holds non-finite"):
        check_tensors({"x": torch.tensor([big, float("nan"), -big], dtype=dtype)}, "mem")


def _layouts() -> dict[str, torch.Tensor]:
    base = torch.ones(20)
    return {"sep": torch.ones(3), "t": torch.ones(3, 4).t(), "gap1": base[0:4], "gap2": base[6:9], "over": base[2:8],
            "tail": base[15:20]}


@pytest.mark.parametrize("key, index", [("sep", (1,)), ("t", (3, 1)), ("gap1", (3,)), ("gap2", (2,)), ("over", (2,)),
                                        ("tail", (4,))])
def test_non_finite_values_are_found_in_tensors_of_any_layout(key, index):
    """Tensors not laid back to back (separate, non-contiguous, views of one storage with gaps or overlapping)
    are each checked, and only their own values: a NaN between two views of one storage is no tensor's."""
    check_tensors(_layouts(), "mem")
    bad = _layouts()
    bad[key][index] = float("nan")
    with pytest.raises(ArtifactError, match=f"tensor '{key}' holds non-finite"):
        check_tensors(bad, "mem")
    base = torch.ones(10)
    base[4] = float("nan")
    check_tensors({"a": base[0:3], "b": base[5:8], "c": base[8:10]}, "mem")
    with pytest.raises(ArtifactError, match="tensor 'x' holds"):  # of two bad ones, the first key is named
        check_tensors({"x": torch.tensor([1.0, float("inf")]), "y": torch.tensor([float("nan")])}, "mem")


@pytest.mark.parametrize("buf, message", [
    (bytearray(b"\x01\x02"), "shorter than the header length field"),
    (bytearray((1000).to_bytes(8, "little") + b"{}"), "runs past the end of the file"),
    (_file({}, b"")[:8] + b"{not json}", "header is not JSON"),
    (_file({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "malformed entry"),
    (_file({"x": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "malformed entry"),
    (_file({"x": _f32([0, 4])}, bytes(4)), "does not match its data offsets"),
    (_file({"x": _f32([0, 8])}, bytes(4)), "past the end of the file"),
    (_file({"x": _f32([0, 8]), "y": _f32([4, 12])}, bytes(12)), "a gap or an overlap"),
    (_file({"x": _f32([0, 8]), "y": _f32([12, 20])}, bytes(20)), "a gap or an overlap"),
    (_file({"x": _f32([0, 8])}, bytes(12)), "cover 8 bytes of data, the file holds 12"),
    (_file([1, 2], b""), "not a JSON object"),
    (_file({"__metadata__": {"format": 1}, "x": _f32([0, 8])}, bytes(8)), "__metadata__ is not a map of strings"),
    (_file({"__metadata__": ["pt"], "x": _f32([0, 8])}, bytes(8)), "__metadata__ is not a map of strings"),
])
def test_parse_tensors_refuses_malformed_files_clearly(buf, message):
    with pytest.raises(ArtifactError, match=f"mem: not a valid safetensors file .*{message}"):
        parse_tensors(buf, "mem")


def test_parse_tensors_takes_metadata_that_is_absent_null_or_a_map_of_strings():
    for metadata in ({}, None, {"format": "pt"}):
        buf = _file({"__metadata__": metadata, "x": _f32([0, 8])}, torch.tensor([1.0, 2.0]).numpy().tobytes())
        assert torch.equal(parse_tensors(buf, "mem")["x"], torch.tensor([1.0, 2.0]))


def test_parse_tensors_takes_read_only_bytes_too():
    from safetensors.torch import save

    data = save({"w": torch.arange(6.0)})
    assert torch.equal(parse_tensors(bytes(data), "mem")["w"], torch.arange(6.0))


@pytest.mark.parametrize("reported", [-10, 10])
def test_read_buffer_returns_the_file_bytes_when_its_size_changes_under_the_read(tmp_path, monkeypatch, reported):
    """fstat and the read disagree (the file shrank or grew in between): every byte read is returned, so
    the caller's size and sha256 check sees the file as it was read, never a zero-padded or cut buffer."""
    import os

    import hub.artifact as artifact

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 4)
    real = os.fstat

    def fstat(fd):
        st = real(fd)
        return os.stat_result((*st[:6], st.st_size + reported, *st[7:]))

    monkeypatch.setattr(artifact.os, "fstat", fstat)
    assert artifact.read_buffer(path) == path.read_bytes()
