"""The coadvise recipe (Co-advise, Ren et al. 2022), its loss, and train-teacher."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli_support import assert_one_line_error, run_cli
from distill_support import small_data

torch.set_num_threads(1)

# A tiny CiT at 32 px (depth 2, width 32) so a run takes seconds.
TINY_CIT = "vitshrink_cit:img_size=32,patch_size=4,embed_dim=32,depth=2,num_heads=2,stem_chs=32"
FAST = {"steps_per_epoch": 2, "batch_size": 16, "eval_batch_size": 100, "bench_batch_sizes": [1],
        "checkpoint_steps": 0, "workers": 0}


# --- reference transcription of the official loss (OliverRensu/co-advise main.py, train_one_epoch) ----------
def official_coadvise_loss(outputs, y_kd_conv, y_kd_inv, y_conv, y_inv, targets, criterion):
    kl = nn.KLDivLoss(reduction="batchmean")
    T = 1
    ce_loss = criterion(outputs, targets)
    conv_kd_loss = kl(F.log_softmax(y_kd_conv / T, dim=-1), F.softmax(y_conv / T, dim=-1)) * T * T
    inv_kd_loss = kl(F.log_softmax(y_kd_inv / T, dim=-1), F.softmax(y_inv / T, dim=-1)) * T * T
    return ce_loss + conv_kd_loss + inv_kd_loss
# --- end of transcription -----------------------------------------------------------------------------------


class FixedHeads(nn.Module):
    """A 'student' returning three fixed logit tensors (the CiT's training output) and a parameter to train."""

    def __init__(self, heads):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.heads = heads

    def forward(self, x):
        return tuple(h * self.scale for h in self.heads)


class FixedTeacher:
    def __init__(self, logits):
        self._logits = logits

    def logits(self, images, extras=None):
        return self._logits


def _task(heads, conv, inv, main=None, **cfg_over):
    from vitshrink.config import load_preset
    from vitshrink.distill.teachers import Teachers
    from vitshrink.recipes import get_recipe

    cfg = {**load_preset("coadvise"), **cfg_over}
    teachers = {"conv": FixedTeacher(conv), "inv": FixedTeacher(inv)}
    if main is not None:
        teachers["teacher"] = FixedTeacher(main)
    student = FixedHeads(heads)
    student.set_distilled_training = lambda enable=True: None
    return get_recipe("coadvise").task(Teachers(teachers), student, cfg)


def test_loss_equals_official_formula_with_index_and_soft_targets():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(0)
    heads = [torch.randn(6, 10, generator=g) * 3 for _ in range(3)]
    conv, inv = torch.randn(6, 10, generator=g) * 2, torch.randn(6, 10, generator=g) * 2
    labels = torch.randint(0, 10, (6,), generator=g)
    task = _task(heads, conv, inv)
    ours = task(torch.zeros(6, 3, 32, 32), labels)["loss"]
    # Official criterion without mixup: LabelSmoothingCrossEntropy(config.MODEL.LABEL_SMOOTHING = 0.1).
    ref = official_coadvise_loss(*heads, conv, inv, labels, LabelSmoothingCrossEntropy(0.1))
    assert (ours - ref).abs().item() < 1e-5  # max abs diff measured: ~5e-7
    # Mixup / cutmix targets: probabilities [B, K]. Official: Mixup smooths them (label_smoothing 0.1) and the
    # criterion is SoftTargetCrossEntropy; ours: the task's CE smooths the unsmoothed mixed targets.
    soft = torch.softmax(torch.randn(6, 10, generator=g), -1)
    ours_soft = task(torch.zeros(6, 3, 32, 32), soft)["loss"]
    ref_soft = official_coadvise_loss(*heads, conv, inv, soft * 0.9 + 0.1 / 10, SoftTargetCrossEntropy())
    assert (ours_soft - ref_soft).abs().item() < 1e-5
    # By hand: CE + the two batch-mean KLs.
    kl = lambda s, t: (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    hand = F.cross_entropy(heads[0], labels, label_smoothing=0.1) + kl(heads[1], conv) + kl(heads[2], inv)
    assert torch.allclose(ours, hand, atol=1e-5)


def test_cls_teacher_option_adds_soft_targets_to_the_class_head():
    g = torch.Generator().manual_seed(1)
    heads = [torch.randn(4, 10, generator=g) for _ in range(3)]
    conv, inv, main = (torch.randn(4, 10, generator=g) for _ in range(3))
    labels = torch.randint(0, 10, (4,), generator=g)
    base = _task(heads, conv, inv, main)(torch.zeros(4, 3, 32, 32), labels)["loss"]
    kl_main = F.kl_div(F.log_softmax(heads[0], -1), F.softmax(main, -1), reduction="batchmean")
    both = _task(heads, conv, inv, main, cls_teacher_weight=0.5)(torch.zeros(4, 3, 32, 32), labels)["loss"]
    assert torch.allclose(both, base + 0.5 * kl_main, atol=1e-5)
    only = _task(heads, conv, inv, main, cls_teacher_weight=1.0, task_weight=0.0)(torch.zeros(4, 3, 32, 32), labels)
    assert torch.allclose(only["loss"], base - F.cross_entropy(heads[0], labels, label_smoothing=0.1) + kl_main,
                          atol=1e-5)


def test_one_epoch_run_writes_a_reloadable_student_with_one_onnx_output(tmp_path, coadvise_teachers):
    import onnxruntime as ort

    from vitshrink.io import load_model
    from vitshrink.models.cit import CrossInductiveViT
    from vitshrink.pipeline import distill

    out = tmp_path / "run"
    result = distill(None, "coadvise", student=TINY_CIT, data=small_data(64, 32), out_dir=out, epochs=1,
                     device="cpu", progress=False, overrides=dict(FAST),
                     options={"conv_teacher": str(coadvise_teachers / "conv.safetensors"),
                              "inv_teacher": str(coadvise_teachers / "inv.safetensors")})
    args = (out / "args.yaml").read_text()
    assert "conv.safetensors" in args and "inv.safetensors" in args
    assert 0.0 <= result.report["student"]["top1"] <= 1.0
    reloaded = load_model(out / "student.safetensors").eval()
    assert isinstance(reloaded, CrossInductiveViT)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded(x), result.student(x), atol=1e-5)
    graph = onnx.load(str(out / "student.onnx"))
    assert len(graph.graph.output) == 1
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(onnx_out - reloaded(x).detach().numpy()).max() < 1e-4


def test_default_student_is_a_cit_started_from_a_vit_teacher(tiny_teacher_path):
    from vitshrink.io import load_model
    from vitshrink.models.cit import CrossInductiveViT
    from vitshrink.recipes import get_recipe
    from vitshrink.recipes.base import RecipeContext
    from vitshrink.config import load_preset

    teacher = load_model(tiny_teacher_path)
    ctx = RecipeContext(cfg=load_preset("coadvise"), device=torch.device("cpu"), data=small_data(16, 8),
                        train_loader=None, teachers={"teacher": teacher})
    cit = get_recipe("coadvise").build_student(teacher, None, ctx)
    assert isinstance(cit, CrossInductiveViT)
    assert len(cit.blocks) == len(teacher.blocks) // 2 and cit.embed_dim == teacher.embed_dim
    assert torch.equal(cit.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)


def _cli(capsys, monkeypatch, cwd: Path, *args) -> tuple[int, str, str]:
    """``vitshrink ARGS`` run in-process from ``cwd``."""
    monkeypatch.chdir(cwd)
    return run_cli(capsys, *args)


@pytest.mark.parametrize("case", ["missing", "unloadable", "classes"])
def test_teacher_errors_are_one_line_exit_2(capsys, monkeypatch, tmp_path, coadvise_teachers, case):
    conv = str(coadvise_teachers / "conv.safetensors")
    inv = {"missing": str(tmp_path / "nope.safetensors"), "unloadable": str(tmp_path / "bad.safetensors"),
           "classes": str(coadvise_teachers / "inv5.safetensors")}[case]
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = _cli(capsys, monkeypatch, tmp_path, "distill", "--recipe", "coadvise", "--conv-teacher", conv,
                        "--inv-teacher", inv, "--epochs", "1", "--out", tmp_path / "out", "--no-progress")
    assert_one_line_error(code, err, "--inv-teacher", *(["5 classes", "10"] if case == "classes" else []))
    assert not (tmp_path / "out" / "student.safetensors").exists()


def test_missing_inv_teacher_flag(capsys, monkeypatch, tmp_path, coadvise_teachers):
    code, _, err = _cli(capsys, monkeypatch, tmp_path, "distill", "--recipe", "coadvise", "--conv-teacher",
                        coadvise_teachers / "conv.safetensors", "--out", tmp_path / "out")
    assert code == 2 and "--inv-teacher" in err and "Traceback" not in err


def _tiny_folder(root: Path) -> Path:
    """An ImageFolder of 2 random 32 px images for each CIFAR-10 class (evaluate only needs to read it)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for name in small_data(16, 8).class_names:
        (root / name).mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_train_teacher_writes_a_model_inspect_and_evaluate_read(capsys, monkeypatch, tmp_path):
    from vitshrink.supervised import train_teacher

    out = tmp_path / "teacher"
    result = train_teacher("rednet_cifar26", data=small_data(64, 32), out_dir=out, epochs=1, device="cpu",
                           model_kwargs={"base_chs": 16}, overrides=dict(FAST), progress=False)
    for name in ("model.safetensors", "model.onnx", "report.json", "report.md", "args.yaml"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["arch"] == "rednet_cifar26" and 0.0 <= report["top1"] <= 1.0 and report["params"] > 0
    assert len(onnx.load(str(out / "model.onnx")).graph.output) == 1
    code, stdout, err = _cli(capsys, monkeypatch, tmp_path, "inspect", out / "model.safetensors")
    assert code == 0, err
    assert "rednet_cifar26" in stdout
    code, stdout, err = _cli(capsys, monkeypatch, tmp_path, "evaluate", out / "model.safetensors", "--data",
                             _tiny_folder(tmp_path / "imgs"))
    assert code == 0, err
    assert "top-1" in stdout.lower() or "top1" in stdout.lower()
    assert result.report["top1"] == report["top1"]


def test_train_teacher_unknown_arch_is_a_user_error(tmp_path):
    from vitshrink.errors import UserError
    from vitshrink.supervised import train_teacher

    with pytest.raises(UserError, match="nosuchnet: unknown ARCH"):
        train_teacher("nosuchnet", data=small_data(16, 8), out_dir=tmp_path / "t", device="cpu", progress=False)
    assert not (tmp_path / "t" / "model.safetensors").exists()
