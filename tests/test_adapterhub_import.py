"""Importing AdapterHub `adapters` library folders into our bottleneck format, and refusing what we cannot serve.

The source folders are real `model.save_adapter` output (tests/fixtures/bottleneck/adapters, made
by make_fixtures.py with adapters 1.3.0); bad inputs are copies of them with one thing changed.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub.adapterhub_import import import_adapterhub
from hub.bottleneck_format import BottleneckConfig
from hub.artifact import ArtifactError, Technique, is_adapterhub_folder, read_adapter

ADAPTERS = Path(__file__).parent / "fixtures" / "bottleneck" / "adapters"


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter.safetensors").exists():
        return load_file(str(folder / "adapter.safetensors"))
    return torch.load(folder / "pytorch_adapter.bin", weights_only=True)


def copy_of(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"src-{name}"
    shutil.copytree(ADAPTERS / name, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    saved = json.loads((folder / "adapter_config.json").read_text())
    saved["config"].update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(saved))


@pytest.mark.parametrize("name", sorted(p.name for p in ADAPTERS.iterdir()))
def test_import_keeps_every_weight_bit_for_bit(name, tmp_path):
    src = ADAPTERS / name
    assert is_adapterhub_folder(src)
    import_adapterhub(src, tmp_path / "out")
    adapter = read_adapter(tmp_path / "out")
    assert adapter.technique is Technique.BOTTLENECK
    assert not is_adapterhub_folder(tmp_path / "out")
    original = source_tensors(src)
    assert len(adapter.tensors) == len(original)
    for key, tensor in original.items():
        layer = key.split("layers.")[1].split(".")[0]
        location = "attention" if ".attention_adapters." in key else "ffn"
        part = "down" if ".adapter_down." in key else "up"
        ours = adapter.tensors[f"model.layers.{layer}.{location}_adapter.{part}.{key.rsplit('.', 1)[1]}"]
        assert torch.equal(ours, tensor), key


def test_imported_config_carries_the_math_options(tmp_path):
    expected = {
        "pfeiffer": dict(locations=("ffn",), non_linearity="relu", bottleneck_size=4, parallel=False,
                         original_ln_before=True, original_ln_after=True, residual_before_ln=True, scaling=1.0),
        "houlsby": dict(locations=("attention", "ffn"), non_linearity="swish", bottleneck_size=8,
                        original_ln_before=False),
        "parallel": dict(locations=("ffn",), parallel=True, scaling=4.0, bottleneck_size=16),
        "seq_tanh": dict(non_linearity="tanh", residual_before_ln=False, scaling=0.5),
    }
    for name, fields in expected.items():
        import_adapterhub(ADAPTERS / name, tmp_path / name)
        config = BottleneckConfig.from_dict(read_adapter(tmp_path / name).config)
        assert config.hidden_size == 64 and config.source["name"] == name
        for key, value in fields.items():
            assert getattr(config, key) == value, (name, key)
    # seq_tanh leaves layer 1 out: no tensors there
    assert not any(k.startswith("model.layers.1.") for k in read_adapter(tmp_path / "seq_tanh").tensors)


def test_refuses_unknown_non_linearity(tmp_path):
    src = copy_of("pfeiffer", tmp_path)
    edit_config(src, non_linearity="softplus_squared")
    with pytest.raises(ArtifactError, match="non_linearity 'softplus_squared' is not served"):
        import_adapterhub(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_missing_weights_file(tmp_path):
    src = copy_of("pfeiffer", tmp_path)
    (src / "adapter.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no adapter.safetensors or pytorch_adapter.bin"):
        import_adapterhub(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_refuses_bin_that_is_not_a_weights_only_pickle(tmp_path):
    src = copy_of("houlsby", tmp_path)
    marker = tmp_path / "code-ran"
    with open(src / "pytorch_adapter.bin", "wb") as f:
        pickle.dump({"model.layers.0.output_adapters.adapters.houlsby.adapter_up.bias": _RunsCode(marker)}, f,
                    protocol=2)
    with pytest.raises(ArtifactError, match="not a weights-only PyTorch file"):
        import_adapterhub(src, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    with open(src / "pytorch_adapter.bin", "rb") as f:  # the file really runs code when fully unpickled
        pickle.load(f)
    assert marker.exists()


def test_refuses_truncated_bin(tmp_path):
    src = copy_of("houlsby", tmp_path)
    data = (src / "pytorch_adapter.bin").read_bytes()
    (src / "pytorch_adapter.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a weights-only PyTorch file"):
        import_adapterhub(src, tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    ({"ln_after": True}, "ln_after=true"),
    ({"ln_before": True}, "ln_before=true"),
    ({"use_gating": True}, "use_gating=true"),
    ({"phm_layer": True}, "phm_layer=true"),
    ({"inv_adapter": "nice"}, "inv_adapter='nice'"),
    ({"scaling": "learned"}, "scaling 'learned' is not served"),
    ({"residual_before_ln": "post_add"}, "residual_before_ln='post_add'"),
    ({"architecture": "lora"}, "architecture 'lora' is not a bottleneck adapter"),
    ({"mh_adapter": False, "output_adapter": False}, "no place"),
])
def test_refuses_options_it_cannot_serve(change, message, tmp_path):
    src = copy_of("pfeiffer", tmp_path)
    edit_config(src, **change)
    with pytest.raises(ArtifactError, match=message):
        import_adapterhub(src, tmp_path / "out")


def test_refuses_other_model_types(tmp_path):
    src = copy_of("pfeiffer", tmp_path)
    saved = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**saved, "model_type": "bert"}))
    with pytest.raises(ArtifactError, match="model_type 'bert' is not served"):
        import_adapterhub(src, tmp_path / "out")


_PFEIFFER = "model.layers.{}.{}_adapters.adapters.pfeiffer.{}"
_ATTENTION_BLOCK = {_PFEIFFER.format(0, "attention", part): torch.zeros(shape) for part, shape in {
    "adapter_down.0.weight": (4, 64), "adapter_down.0.bias": (4,), "adapter_up.weight": (64, 4),
    "adapter_up.bias": (64,)}.items()}


@pytest.mark.parametrize("add, drop, message", [
    ({_PFEIFFER.format(0, "output", "adapter_norm_after.weight"): torch.ones(64)}, (),
     "adapter_norm_after.weight.*would be dropped"),
    (_ATTENTION_BLOCK, (), "location 'attention'"),
    ({_PFEIFFER.format(1, "output", "adapter_up.weight"): torch.zeros(64, 5)}, (),
     r"ffn_adapter.up.weight has shape \(64, 5\), expected \(64, 4\)"),
    ({}, (_PFEIFFER.format(1, "output", "adapter_up.weight"),), "model.layers.1.ffn_adapter lacks up.weight"),
])
def test_refuses_tensors_it_cannot_place(add, drop, message, tmp_path):
    src = copy_of("pfeiffer", tmp_path)
    tensors = load_file(str(src / "adapter.safetensors"))
    tensors = {k: v for k, v in {**tensors, **add}.items() if k not in drop}
    save_file(tensors, str(src / "adapter.safetensors"))
    with pytest.raises(ArtifactError, match=message):
        import_adapterhub(src, tmp_path / "out")


def test_refuses_non_empty_destination_and_leaves_it_alone(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an empty folder"):
        import_adapterhub(ADAPTERS / "pfeiffer", dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_is_adapterhub_folder_rejects_other_folders(tmp_path):
    assert not is_adapterhub_folder(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert not is_adapterhub_folder(tmp_path)


@pytest.mark.parametrize("config, message", [
    ({"locations": ["ffn"], "non_linearity": "relu", "ln_after": True}, "unknown option"),
    ({"locations": ["ffn"], "non_linearity": "ReLU"}, "non_linearity 'ReLU' is not served"),
    ({"locations": ["middle"], "non_linearity": "relu"}, "locations must be"),
    ({"non_linearity": "relu"}, "missing locations"),
    ({"locations": ["ffn"], "non_linearity": "relu", "parallel": "yes"}, "parallel must be true or false"),
    ({"locations": ["ffn"], "non_linearity": "relu", "bottleneck_size": 0}, "bottleneck_size must be"),
])
def test_our_format_is_validated(config, message):
    with pytest.raises(ArtifactError, match=message):
        BottleneckConfig.from_dict({"adapter_type": "bottleneck", **config})
