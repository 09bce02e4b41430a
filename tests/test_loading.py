"""Every SPEC kind that ``load_model`` accepts, its round trip through ``save_model``, and its errors."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import CHECKPOINTS, REPO
from vitshrink.errors import UserError
from vitshrink.io import create_model, data_config, load_model, record_of, save_model

# A tiny ViT at 32 px: 8x8 patches of 4 px, width 64, 2 blocks, 4 heads of 16.
TINY_VIT = "vit_tiny_patch16_224"
TINY_KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)


def _images(n: int = 2, size: int = 32, chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _tiny_vit(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(TINY_VIT, **{**TINY_KWARGS, **overrides}).eval()
    # Non-trivial values everywhere (timm initialises some to zero), so a wrongly placed tensor shows.
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.02 * torch.randn_like(tensor))
    return model


def _assert_round_trip(model: torch.nn.Module, tmp_path: Path, x: torch.Tensor) -> torch.nn.Module:
    """save_model -> load_model(path) with no other argument gives identical logits."""
    path = save_model(model, tmp_path / "round_trip.safetensors")
    again = load_model(path)
    torch.testing.assert_close(_logits(again, x), _logits(model, x), rtol=0, atol=0)
    assert data_config(again)["input_size"] == data_config(model)["input_size"]
    assert data_config(again)["mean"] == data_config(model)["mean"]
    return again


def _raises_user_error(match_file: str | Path, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_model(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert Path(match_file).name in message
    return message


# --- timm names ---------------------------------------------------------------------------

def test_timm_name_with_kwargs_builds_random_model_and_round_trips(tmp_path):
    model = load_model(TINY_VIT, img_size=32, num_heads=4, num_classes=7, in_chans=3)
    assert not model.training
    assert record_of(model).name == TINY_VIT
    assert record_of(model).kwargs == {"img_size": 32, "in_chans": 3, "num_classes": 7, "num_heads": 4}
    assert model.blocks[0].attn.num_heads == 4 and model.head.out_features == 7
    assert data_config(model)["input_size"] == (3, 32, 32)
    x = _images()
    assert _logits(model, x).shape == (2, 7)
    _assert_round_trip(model, tmp_path, x)


def test_timm_cnn_name_takes_img_size_as_preprocessing(tmp_path):
    model = load_model("resnet18", img_size=32, num_classes=10)
    assert data_config(model)["input_size"] == (3, 32, 32)
    assert "img_size" not in record_of(model).kwargs
    _assert_round_trip(model, tmp_path, _images())


def test_unknown_timm_name_suggests_close_names():
    message = _raises_user_error("vit_smal_patch16_224", "vit_smal_patch16_224")
    assert "vit_small_patch16_224" in message


def test_pretrained_without_local_weights_fails_fast_with_advice(monkeypatch, tmp_path):
    # The refusal path of --pretrained: an empty weight cache and no opt-in to downloads, so nothing is
    # fetched whatever the machine has cached or its environment says.
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.monotonic()
    message = _raises_user_error("vit_tiny_patch16_224", "vit_tiny_patch16_224", pretrained=True)
    assert time.monotonic() - start < 30
    assert "--arch vit_tiny_patch16_224" in message and "local file" in message


# --- safetensors ----------------------------------------------------------------------------

def test_vitshrink_safetensors_loads_with_no_other_argument(tmp_path):
    model = _tiny_vit()
    path = save_model(model, tmp_path / "tiny.safetensors", class_names=[str(i) for i in range(10)])
    loaded = load_model(path)
    torch.testing.assert_close(_logits(loaded, _images()), _logits(model, _images()), rtol=0, atol=0)
    assert record_of(loaded).notes == []
    assert record_of(loaded).class_names == [str(i) for i in range(10)]


@pytest.mark.parametrize("variant", [
    {},                                                  # class token
    {"reg_tokens": 2},                                   # class token + register tokens
    {"class_token": False, "global_pool": "avg"},        # no class token
    {"no_embed_class": True, "reg_tokens": 1},           # prefix tokens without position embedding
    {"global_pool": "avg"},                              # class token kept, fc_norm + average pooling
    {"in_chans": 1, "num_classes": 0},                   # grey input, no head
])
def test_foreign_safetensors_infers_architecture_from_shapes(tmp_path, variant):
    model = _tiny_vit(**variant)
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path, arch=TINY_VIT, num_heads=4)
    x = _images(chans=variant.get("in_chans", 3))
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
    kwargs = record_of(loaded).kwargs
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["patch_size"], kwargs["img_size"]) == (64, 2, 4, 32)
    assert kwargs["num_classes"] == variant.get("num_classes", 10)
    assert data_config(loaded)["input_size"] == (variant.get("in_chans", 3), 32, 32)
    assert len(data_config(loaded)["mean"]) == variant.get("in_chans", 3)
    _assert_round_trip(loaded, tmp_path, x)


def test_foreign_file_without_num_heads_says_what_it_assumed(tmp_path):
    model = _tiny_vit(embed_dim=192, num_heads=3)  # vit_tiny's own width: its default head count applies
    path = tmp_path / "foreign.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_model(path, arch=TINY_VIT)
    assert loaded.blocks[0].attn.num_heads == 3
    assert any("num_heads=3 assumed" in note and TINY_VIT in note for note in record_of(loaded).notes)
    torch.testing.assert_close(_logits(loaded, _images()), _logits(model, _images()), rtol=0, atol=0)


def test_foreign_file_without_arch_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file(_tiny_vit().state_dict(), str(path))
    assert "--arch" in _raises_user_error(path, path)


def test_grey_model_records_given_mean_std_in_saved_metadata(tmp_path):
    model = _tiny_vit(in_chans=1)
    path = tmp_path / "mnist_vit.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_model(path, arch=TINY_VIT, num_heads=4, mean=[0.1307], std=[0.3081])
    assert data_config(loaded)["input_size"] == (1, 32, 32)
    assert data_config(loaded)["mean"] == (0.1307,) and data_config(loaded)["std"] == (0.3081,)
    again = load_model(save_model(loaded, tmp_path / "saved.safetensors"))
    assert data_config(again)["mean"] == (0.1307,) and data_config(again)["std"] == (0.3081,)


def test_foreign_cnn_state_dict_infers_num_classes(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    path = tmp_path / "resnet.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_model(path, arch="resnet18")
    assert record_of(loaded).kwargs == {"num_classes": 10}
    torch.testing.assert_close(_logits(loaded, _images()), _logits(model, _images()), rtol=0, atol=0)


# --- position embedding resampling -------------------------------------------------------------

def test_img_size_resamples_position_embedding(tmp_path):
    model = _tiny_vit(reg_tokens=1)
    foreign = tmp_path / "foreign.safetensors"
    save_file(model.state_dict(), str(foreign))
    ours = save_model(model, tmp_path / "ours.safetensors")
    for path, extra in ((foreign, {"arch": TINY_VIT, "num_heads": 4}), (ours, {})):
        bigger = load_model(path, img_size=48, **extra)
        assert bigger.pos_embed.shape == (1, 2 + 12 * 12, 64)
        # The class and register token rows are not interpolated.
        torch.testing.assert_close(bigger.pos_embed[:, :2], model.pos_embed[:, :2], rtol=0, atol=0)
        assert data_config(bigger)["input_size"] == (3, 48, 48)
        assert record_of(bigger).kwargs["img_size"] == 48
        x = _images(size=48)
        assert torch.isfinite(_logits(bigger, x)).all()
        _assert_round_trip(bigger, tmp_path, x)


# --- torch state dicts -------------------------------------------------------------------------

@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "model_ema", "state_dict_ema"])
@pytest.mark.parametrize("prefix, suffix", [("", ".pt"), ("module.", ".pth"), ("_orig_mod.", ".th")])
def test_torch_state_dict_unwraps_and_strips_prefixes(tmp_path, wrapper, prefix, suffix):
    model = _tiny_vit()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    obj = state if wrapper is None else {wrapper: state, "epoch": 3, "best_acc1": 80.5}
    path = tmp_path / f"checkpoint{suffix}"
    torch.save(obj, path)
    loaded = load_model(path, arch=TINY_VIT, num_heads=4)
    torch.testing.assert_close(_logits(loaded, _images()), _logits(model, _images()), rtol=0, atol=0)
    assert record_of(loaded).kwargs["embed_dim"] == 64  # what a round trip rebuilds from


class _WritesMarker:
    """A pickle payload that would create a directory if it were ever unpickled for real."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"weight": torch.zeros(1)}, "payload": _WritesMarker(marker)}, path)
    message = _raises_user_error(path, path, arch=TINY_VIT)
    assert "refused for safety" in message and "state_dict" in message
    assert not marker.exists()


def test_cifar_resnet_teacher_checkpoint_loads_and_classifies_real_images(tmp_path):
    from vitshrink.data import sample_images

    path = CHECKPOINTS / "cifar10_resnet56_akamaster.th"
    model = load_model(path, arch="cifar_resnet56")
    raw = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    assert len(raw) > 100
    for key, value in raw.items():
        torch.testing.assert_close(model.state_dict()[key.removeprefix("module.")], value, rtol=0, atol=0)
    # Real behaviour: the stored top-1 is ~83% on these JPEG images; ten per class must mostly be right.
    images = sample_images(data_config(model), n=100)
    from vitshrink.data import resolve_eval_split

    split, _ = resolve_eval_split()
    targets = split.targets
    first = {}
    for index, target in enumerate(targets):
        first.setdefault(target, index)
    order = list(first.values()) + [i for i in range(len(targets)) if i not in first.values()]
    labels = torch.tensor([targets[i] for i in order[:100]])
    accuracy = (_logits(model, images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.6
    resnet20 = load_model(CHECKPOINTS / "cifar10_resnet20_akamaster.th", arch="cifar_resnet20")
    _assert_round_trip(resnet20, tmp_path, images[:4])


# --- Hugging Face directories --------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")  # a test-only dependency, never imported by vitshrink


def _hf_tiny_config(transformers, cls_name: str, **overrides):
    config_cls = getattr(transformers, cls_name)
    return config_cls(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, num_labels=10, **overrides)


def _randomise(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.05 * torch.randn_like(tensor))


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_hf_vit_directory_matches_transformers_logits(tmp_path, transformers, hidden_act):
    hf = transformers.ViTForImageClassification(_hf_tiny_config(transformers, "ViTConfig", hidden_act=hidden_act)).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hf_vit")
    x = _images()
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    loaded = load_model(tmp_path / "hf_vit")
    torch.testing.assert_close(_logits(loaded, x), expected, rtol=1e-4, atol=1e-4)
    assert loaded.norm.eps == 1e-12  # HF's LayerNorm epsilon, not timm's 1e-6
    assert data_config(loaded)["mean"] == (0.5, 0.5, 0.5)
    assert any("preprocessor_config.json" in note for note in record_of(loaded).notes)
    _assert_round_trip(loaded, tmp_path, x)


def test_hf_vit_bin_weights_and_preprocessor_config(tmp_path, transformers):
    hf = transformers.ViTForImageClassification(_hf_tiny_config(transformers,
        "ViTConfig", id2label={i: name for i, name in enumerate("abcdefghij")})).eval()
    _randomise(hf)
    directory = tmp_path / "hf_bin"
    directory.mkdir()
    hf.config.to_json_file(str(directory / "config.json"))
    torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.45, 0.5], "image_std": [0.2, 0.25, 0.3], "resample": 3}))
    x = _images()
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    loaded = load_model(directory)
    torch.testing.assert_close(_logits(loaded, x), expected, rtol=1e-4, atol=1e-4)
    assert data_config(loaded)["mean"] == (0.4, 0.45, 0.5) and data_config(loaded)["std"] == (0.2, 0.25, 0.3)
    assert data_config(loaded)["interpolation"] == "bicubic"
    assert record_of(loaded).class_names == list("abcdefghij")
    saved = load_model(save_model(loaded, tmp_path / "from_hf.safetensors"))
    assert record_of(saved).class_names == list("abcdefghij")


@pytest.mark.parametrize("hf_class", ["DeiTForImageClassificationWithTeacher", "DeiTForImageClassification"])
def test_hf_deit_directory_with_distillation_token_matches_transformers(tmp_path, transformers, hf_class):
    hf = getattr(transformers, hf_class)(_hf_tiny_config(transformers, "DeiTConfig")).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hf_deit")
    x = _images()
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    loaded = load_model(tmp_path / "hf_deit")
    assert record_of(loaded).name == "deit_base_distilled_patch16_224"
    torch.testing.assert_close(_logits(loaded, x), expected, rtol=1e-4, atol=1e-4)
    _assert_round_trip(loaded, tmp_path, x)


def test_hf_directory_resamples_to_new_img_size(tmp_path, transformers):
    hf = transformers.ViTForImageClassification(_hf_tiny_config(transformers, "ViTConfig")).eval()
    hf.save_pretrained(tmp_path / "hf_vit")
    loaded = load_model(tmp_path / "hf_vit", img_size=64)
    assert loaded.pos_embed.shape == (1, 1 + 16 * 16, 64)
    assert _logits(loaded, _images(size=64)).shape == (2, 10)


def test_hf_conversion_never_imports_transformers(tmp_path, transformers):
    import subprocess
    import sys

    transformers.ViTForImageClassification(_hf_tiny_config(transformers, "ViTConfig")).save_pretrained(tmp_path / "hf")
    script = ("import sys; from vitshrink.io import load_model; load_model(sys.argv[1]); "
              "assert 'transformers' not in sys.modules, 'transformers was imported'")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf")], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# --- errors ---------------------------------------------------------------------------------------

def test_missing_files_and_directories(tmp_path):
    for name in ("absent.safetensors", "absent.pt", "absent.th"):
        assert "not found" in _raises_user_error(name, tmp_path / name, arch=TINY_VIT)
    assert "no such file" in _raises_user_error("nowhere", tmp_path / "nowhere" / "model")
    not_hf = tmp_path / "plain_dir"
    not_hf.mkdir()
    assert "config.json" in _raises_user_error(not_hf, not_hf)


def test_random_bytes_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    assert "not a" in _raises_user_error(garbage, garbage, arch=TINY_VIT)
    source = save_model(_tiny_vit(), tmp_path / "whole.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    assert "safetensors" in _raises_user_error(truncated, truncated)
    zipped = tmp_path / "truncated.pth"
    torch.save(_tiny_vit().state_dict(), zipped)
    zipped.write_bytes(zipped.read_bytes()[:2000])
    _raises_user_error(zipped, zipped, arch=TINY_VIT)


def test_shape_mismatch_names_file_tensor_and_both_shapes(tmp_path):
    state = dict(_tiny_vit().state_dict())
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(96, 64)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    message = _raises_user_error(path, path, arch=TINY_VIT, num_heads=4)
    assert "blocks.1.mlp.fc1.weight has shape (96, 64)" in message and "expects (128, 64)" in message


def test_wrong_arch_and_conflicting_options(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=10).state_dict(), str(path))
    assert "resnet34" in _raises_user_error(path, path, arch="resnet34")
    vit = tmp_path / "vit.safetensors"
    save_file(_tiny_vit().state_dict(), str(vit))
    assert "num_classes=10" in _raises_user_error(vit, vit, arch=TINY_VIT, num_classes=5)
    assert "num_heads=5" in _raises_user_error(vit, vit, arch=TINY_VIT, num_heads=5)
    assert "patch size 4" in _raises_user_error(vit, vit, arch=TINY_VIT, num_heads=4, img_size=30)
    ours = save_model(_tiny_vit(), tmp_path / "ours.safetensors")
    assert "num_classes=10" in _raises_user_error(ours, ours, num_classes=3)
    weird = tmp_path / "weights.npz"
    weird.write_bytes(b"x")
    assert "unsupported file type" in _raises_user_error(weird, weird)


def test_hf_directory_of_unsupported_model_type(tmp_path):
    directory = tmp_path / "swin_dir"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "swin"}))
    assert "swin" in _raises_user_error("config.json", directory)
