"""ONNX export: parity with PyTorch on real bundled CIFAR-10 images, dynamic batch, atomic failure."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vitshrink.data import build_transform, resolve_data
from vitshrink.errors import UserError
from vitshrink.export import ExportParityError, export_onnx
from vitshrink.io import create_model, data_config, record_of, set_data_config


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                        num_classes=10, **kwargs)


def real_images(model, n: int) -> torch.Tensor:
    val = resolve_data().val
    val.transform = build_transform(data_config(model))
    stride = len(val) // n  # the tar is grouped by class: spread the sample over classes
    return torch.stack([val[i * stride][0] for i in range(n)])


def test_tiny_vit_export_matches_torch_on_real_images_with_dynamic_batch(tmp_path):
    model = tiny_vit()
    sample = real_images(model, 6)
    path = tmp_path / "vit.onnx"
    result = export_onnx(model, path, sample=sample)
    assert result.passed and result.checked and result.exporter == "dynamo"
    assert result.top1_agree == 1.0 and result.max_abs_diff <= 1e-4
    assert result.n_images == 6 and result.batch_sizes_checked == [6, 1] and result.path == str(path)

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dim

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = real_images(model, 5)
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    for batch in (images[:1], images):  # batch 1 and batch 5 from the same file
        got = session.run(["logits"], {"input": batch.numpy()})[0]
        assert got.shape == (len(batch), 10)
        np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-4, rtol=0)
        assert (got.argmax(1) == expected[: len(batch)].argmax(1)).all()


def test_resnet18_export_at_32px_with_default_bundled_sample(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    set_data_config(model, input_size=(3, 32, 32), crop_pct=1.0)
    result = export_onnx(model, tmp_path / "resnet18.onnx")
    assert result.passed and result.n_images == 8 and result.top1_agree == 1.0
    assert result.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "resnet18.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((3, 3, 32, 32), np.float32)})[0].shape == (3, 10)


def test_export_leaves_the_model_unchanged(tmp_path):
    model = tiny_vit()
    model.train()
    record = copy.deepcopy(record_of(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "vit.onnx", sample=real_images(model, 2))
    assert record_of(model) == record
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_distilled_vit_in_training_mode_exports_one_logits_output(tmp_path):
    torch.manual_seed(0)
    model = create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2,
                         num_heads=2, num_classes=10)
    model.set_distilled_training(True)
    model.train()
    assert isinstance(model(torch.zeros(2, 3, 32, 32)), tuple)  # two heads while training
    result = export_onnx(model, tmp_path / "deit.onnx", sample=real_images(model, 4))
    assert result.passed
    assert len(onnx.load(str(tmp_path / "deit.onnx")).graph.output) == 1
    assert model.training


def test_failed_parity_raises_and_leaves_no_file(tmp_path):
    model = tiny_vit()
    path = tmp_path / "out" / "vit.onnx"
    with pytest.raises(ExportParityError, match="does not match PyTorch") as info:
        export_onnx(model, path, sample=real_images(model, 2), atol=-1.0)  # no difference can be <= -1
    assert isinstance(info.value, UserError)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temp file left either


def test_sample_must_be_a_batch_of_at_least_two(tmp_path):
    model = tiny_vit()
    with pytest.raises(UserError, match="N >= 2"):
        export_onnx(model, tmp_path / "vit.onnx", sample=real_images(model, 2)[:1])
    assert not (tmp_path / "vit.onnx").exists()


def test_falls_back_to_torchscript_exporter_when_dynamo_fails(tmp_path, monkeypatch):
    import vitshrink.export as export_module

    def dynamo_fails(*args, **kwargs):
        raise RuntimeError("dynamo exporter unavailable")

    monkeypatch.setattr(export_module, "_export_dynamo", dynamo_fails)
    model = tiny_vit()
    result = export_onnx(model, tmp_path / "vit.onnx", sample=real_images(model, 3))
    assert result.exporter == "torchscript" and result.passed and result.batch_sizes_checked == [3, 1]
