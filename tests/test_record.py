"""The model record: one object per model (through wrappers), its on-disk form, and validation of every field
of a record or HF config read from disk (one line naming the file and field, before any model is built)."""
from __future__ import annotations

import copy
import json
import resource
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitshrink.errors import UserError
from vitshrink.io import (METADATA_KEY, ModelRecord, attach_record, create_model, data_config, load_model,
                          model_from_record, record_of, save_model, set_data_config)

TINY_VIT = "vit_tiny_patch16_224"
TINY_KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
BUNDLED = Path(__file__).resolve().parents[1] / "vitshrink" / "assets" / "teacher_vit_cifar10.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("record") / "tiny.safetensors"
    save_model(create_model(TINY_VIT, **TINY_KWARGS), path, class_names=[f"c{i}" for i in range(10)])
    return path


def _with_record(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` whose record is edited by ``edit(dict)`` (tensors unchanged)."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        raw = json.loads(handle.metadata()[METADATA_KEY])
    edit(raw)
    save_file(load_file(str(source)), str(target), metadata={METADATA_KEY: json.dumps(raw)})
    return target


def _one_line_error(spec: Path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_model(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message and spec.name in message
    return message


def test_record_follows_model_through_wrappers_and_copies():
    model = create_model(TINY_VIT, **TINY_KWARGS)
    record = record_of(model)
    assert record.name == TINY_VIT and record.kwargs == TINY_KWARGS and record.notes == []
    assert record.data["input_size"] == (3, 32, 32)
    compiled = torch.compile(model)
    assert record_of(compiled) is record
    assert record_of(torch.nn.DataParallel(model)) is record
    assert record_of(torch.nn.Linear(2, 2)) is None
    clone = copy.deepcopy(model)
    assert record_of(clone) == record and record_of(clone) is not record
    set_data_config(compiled, mean=(0.1, 0.2, 0.3))
    assert record.data["mean"] == (0.1, 0.2, 0.3) and data_config(model)["mean"] == (0.1, 0.2, 0.3)
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)  # timm's own helpers read the mirror
    other = ModelRecord(name="x", data={"input_size": [1, 8, 8]})
    attach_record(model, other)
    assert record_of(model) is other and data_config(model)["input_size"] == (1, 8, 8)


def test_bundled_teacher_loads_with_its_record_unchanged():
    model = load_model(BUNDLED)
    record = record_of(model)
    assert record.name == TINY_VIT and record.kwargs["depth"] == 6 and len(record.class_names) == 10
    from safetensors import safe_open

    with safe_open(str(BUNDLED), framework="pt") as handle:
        on_disk = json.loads(handle.metadata()[METADATA_KEY])
    rebuilt = model_from_record(on_disk)
    assert record_of(rebuilt).to_json() == {**on_disk, "input_size": list(on_disk["input_size"]),
                                            "mean": list(on_disk["mean"]), "std": list(on_disk["std"])}


def test_save_load_keeps_class_names_provenance_and_spec_is_not_written(saved, tmp_path):
    model = load_model(saved)
    record = record_of(model)
    assert record.class_names[3] == "c3" and "vitshrink_version" in record.provenance
    record.spec = "what/the/user/typed"
    again = record_of(load_model(save_model(model, tmp_path / "again.safetensors")))
    assert again.class_names == record.class_names and again.spec is None


@pytest.mark.parametrize("field, value, expected", [
    ("kwargs.depth", "2", "field kwargs.depth must be an integer in [1, 512], got '2'"),
    ("kwargs.depth", 0, "kwargs.depth must be an integer"),
    ("kwargs.embed_dim", 0, "kwargs.embed_dim must be an integer"),
    ("kwargs.num_heads", 3, "kwargs.num_heads=3 does not divide kwargs.embed_dim=64"),
    ("kwargs.mlp_ratio", float("nan"), "kwargs.mlp_ratio must be a number"),
    ("kwargs.qkv_bias", "yes", "kwargs.qkv_bias must be true or false"),
    ("kwargs.img_size", [32, 32, 32], "kwargs.img_size must be a list"),
    ("kwargs.num_classes", 10.5, "kwargs.num_classes must be an integer"),
    ("input_size", [3, 0, 32], "input_size[1] must be an integer"),
    ("input_size", "3x32x32", "input_size must be a list of 3"),
    ("mean", [0.5, "x", 0.5], "mean[1] must be a number"),
    ("std", [0.5, 0.0, 0.5], "std[1] must be a number"),
    ("std", [0.5, 0.5], "std has 2 values for 3 input channels"),
    ("interpolation", 3, "interpolation must be a non-empty string"),
    ("crop_pct", 0, "crop_pct must be a number"),
    ("class_names", ["a", 2], "class_names must be a list of strings"),
    ("class_names", ["a", "b"], "2 class_names for num_classes=10"),
    ("provenance", [1], "provenance must be an object"),
    ("model", 7, "field model must be a non-empty string"),
    ("kwargs", [1, 2], "kwargs must be an object"),
    ("format_version", 99, "format_version must be an integer in [1, 1]"),
])
def test_every_record_field_is_checked_for_type_and_range(saved, tmp_path, field, value, expected):
    def edit(raw):
        if field.startswith("kwargs."):
            raw["kwargs"][field.split(".", 1)[1]] = value
        else:
            raw[field] = value

    message = _one_line_error(_with_record(saved, tmp_path / "bad.safetensors", edit))
    assert expected in message and "architecture record" in message


def test_absurd_depth_fails_on_the_tensors_before_anything_is_allocated(saved, tmp_path):
    bad = _with_record(saved, tmp_path / "deep.safetensors", lambda raw: raw["kwargs"].update(depth=500))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    message = _one_line_error(bad)
    assert "depth=500 but the file holds 2 blocks" in message
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no model was built
    huge = _with_record(saved, tmp_path / "huge.safetensors", lambda raw: raw["kwargs"].update(depth=10 ** 6))
    assert "kwargs.depth must be an integer in [1, 512]" in _one_line_error(huge)
    wide = _with_record(saved, tmp_path / "wide.safetensors", lambda raw: raw["kwargs"].update(embed_dim=128,
                                                                                             num_heads=2))
    assert "embed_dim=128 but patch_embed.proj.weight has width 64" in _one_line_error(wide)


def test_record_that_is_not_json_or_not_an_object(saved, tmp_path):
    target = tmp_path / "notjson.safetensors"
    save_file(load_file(str(saved)), str(target), metadata={METADATA_KEY: "{not json"})
    assert "damaged vitshrink architecture record" in _one_line_error(target)
    save_file(load_file(str(saved)), str(target), metadata={METADATA_KEY: "[1, 2]"})
    assert "is a list, not a JSON object" in _one_line_error(target)


def test_model_from_record_validates_a_dict_too():
    with pytest.raises(UserError, match="resume: architecture record: field kwargs.depth"):
        model_from_record({"model": TINY_VIT, "kwargs": {**TINY_KWARGS, "depth": -1}}, source="resume")


def test_state_dict_with_non_string_keys_or_flat_pos_embed(tmp_path):
    odd = tmp_path / "odd.pt"
    torch.save({1: torch.zeros(2), "a": torch.zeros(2)}, odd)
    assert "key 1 is not a string" in _one_line_error(odd, arch=TINY_VIT)
    model = create_model(TINY_VIT, **TINY_KWARGS)
    state = dict(model.state_dict())
    state["pos_embed"] = state["pos_embed"].flatten()
    flat = tmp_path / "flat.safetensors"
    save_file(state, str(flat))
    assert "pos_embed has shape (4160,), expected (1, tokens, 64)" in _one_line_error(flat, arch=TINY_VIT)


def _hf_directory(tmp_path: Path, **config) -> Path:
    """A tiny HF ViT directory converted from a timm-layout model's tensors (enough for config checks)."""
    directory = tmp_path / "hf"
    directory.mkdir(exist_ok=True)
    base = {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "image_size": 32, "patch_size": 4}
    (directory / "config.json").write_text(json.dumps({**base, **config}))
    torch.manual_seed(0)
    state = {"vit.embeddings.cls_token": torch.zeros(1, 1, 64),
             "vit.embeddings.position_embeddings": torch.zeros(1, 65, 64),
             "vit.embeddings.patch_embeddings.projection.weight": torch.zeros(64, 3, 4, 4),
             "vit.embeddings.patch_embeddings.projection.bias": torch.zeros(64),
             "vit.layernorm.weight": torch.ones(64), "vit.layernorm.bias": torch.zeros(64),
             "classifier.weight": torch.zeros(10, 64), "classifier.bias": torch.zeros(10)}
    for i in range(2):
        prefix = f"vit.encoder.layer.{i}."
        for name, shape in (("attention.attention.query", (64, 64)), ("attention.attention.key", (64, 64)),
                            ("attention.attention.value", (64, 64)), ("attention.output.dense", (64, 64)),
                            ("intermediate.dense", (128, 64)), ("output.dense", (64, 128))):
            state[prefix + name + ".weight"] = torch.zeros(shape)
            state[prefix + name + ".bias"] = torch.zeros(shape[0])
        for norm in ("layernorm_before", "layernorm_after"):
            state[prefix + norm + ".weight"], state[prefix + norm + ".bias"] = torch.ones(64), torch.zeros(64)
    save_file(state, str(directory / "model.safetensors"))
    return directory


def test_hf_directory_builds_when_config_is_sound(tmp_path):
    model = load_model(_hf_directory(tmp_path))
    assert len(model.blocks) == 2 and model.head.out_features == 10


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", "64", "field hidden_size must be an integer"),
    ("num_hidden_layers", 0, "field num_hidden_layers must be an integer in [1, 512], got 0"),
    ("num_hidden_layers", 400, "depth=400 but the file holds 2 blocks"),
    ("num_attention_heads", 3, "num_attention_heads=3 does not divide hidden_size=64"),
    ("image_size", -32, "field image_size must be an integer"),
    ("patch_size", 64, "patch_size=64 is larger than image_size=32"),
    ("layer_norm_eps", "small", "field layer_norm_eps must be a number"),
    ("qkv_bias", 1, "field qkv_bias must be true or false"),
    ("num_channels", 0, "field num_channels must be an integer"),
    ("hidden_act", ["gelu"], "has no timm equivalent"),
])
def test_every_hf_config_field_is_checked(tmp_path, field, value, expected):
    directory = _hf_directory(tmp_path, **{field: value})
    with pytest.raises(UserError) as info:
        load_model(directory)
    assert expected in str(info.value) and "config.json" in str(info.value)
