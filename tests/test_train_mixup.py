"""Mixup / cutmix in the training loop (vitshrink.train.mixup): timm's Mixup output, drawn per batch from the
batch's (epoch, index) keys, resumable bit for bit; every label-taking task accepts the soft targets."""
from __future__ import annotations

import json

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.task import ClassificationTask
from torch import nn
from typer.testing import CliRunner

from distill_support import small_data
from vitshrink.data.sources import labelled_source
from vitshrink.distill.tasks import FeatureKDTask, LogitKDTask, MultiTokenKDTask, TokenKDTask
from vitshrink.distill.teachers import Teachers
from vitshrink.errors import UserError
from vitshrink.io import create_model, set_data_config
from vitshrink.io.record import architecture_record
from vitshrink.train import Checkpointing, Evaluation, Schedule, TrainEnv, load_checkpoint, train
from vitshrink.train.mixup import MIXUP_KEYS, SeededMixup, check_mixup_allowed, mixup_from_settings

torch.set_num_threads(1)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=10)
DEIT_MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)


def tiny_vit(seed: int, arch: str = "vit_tiny_patch16_224", **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, **{**TINY, **kwargs})
    set_data_config(model, mean=CIFAR_MEAN, std=CIFAR_STD)
    return model


def keyed_batch(n: int = 8, epoch: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    targets = torch.randint(0, 10, (n,), generator=g)
    keys = torch.stack([torch.full((n,), epoch), torch.randperm(500, generator=g)[:n]], 1)
    return images, targets, {"key": keys}


def rng_snapshot():
    return (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state().clone())


# ---------------------------------------------------------------------------------------------- the mixer
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mix_equals_timm_mixup_drawn_from_the_batch_seed(mode):
    mixer = SeededMixup(**DEIT_MIX, mode=mode, num_classes=10, seed=7)
    images, targets, extras = keyed_batch()
    before = rng_snapshot()
    mixed, soft, _ = mixer(images.clone(), targets, extras)
    after = rng_snapshot()
    # The global numpy / python / torch RNGs are as they were: the draw came from the batch's own seed.
    assert np.array_equal(before[0], after[0]) and before[1] == after[1] and torch.equal(before[2], after[2])
    # timm's Mixup, seeded by hand the same way, on the same batch.
    reference = Mixup(**DEIT_MIX, mode=mode, label_smoothing=0.0, num_classes=10)
    np.random.seed(mixer.batch_seed(extras["key"]))
    ref_images, ref_soft = reference(images.clone(), targets)
    assert torch.equal(mixed, ref_images) and torch.equal(soft, ref_soft)
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8), atol=1e-6)
    assert not torch.equal(mixed, images)  # prob 1.0: every batch is mixed


def test_same_keys_mix_the_same_way_other_keys_differently():
    mixer = SeededMixup(**DEIT_MIX, mode="batch", num_classes=10, seed=0)
    images, targets, extras = keyed_batch()
    first = mixer(images.clone(), targets, extras)
    np.random.seed(123)  # whatever the global state, the same batch mixes the same way
    again = mixer(images.clone(), targets, extras)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    lams = set()
    for epoch in range(6):  # the same images at other epochs: other draws
        _, _, other = keyed_batch(epoch=epoch)
        lams.add(round(float(mixer(images.clone(), targets, other)[1].max()), 6))
    assert len(lams) > 1
    other_seed = SeededMixup(**DEIT_MIX, mode="batch", num_classes=10, seed=1)
    assert not torch.equal(other_seed(images.clone(), targets, extras)[0], first[0])


def test_odd_batch_drops_its_last_image_and_key():
    mixer = SeededMixup(**DEIT_MIX, mode="batch", num_classes=10, seed=0)
    images, targets, extras = keyed_batch(n=7)
    mixed, soft, kept = mixer(images.clone(), targets, extras)
    assert mixed.shape[0] == soft.shape[0] == kept["key"].shape[0] == 6
    assert torch.equal(kept["key"], extras["key"][:6])


def test_settings_turn_it_on_and_off():
    base = {"mixup": 0.0, "cutmix": 0.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "mixup_mode": "batch"}
    assert mixup_from_settings(base, num_classes=10, seed=0) is None
    mixer = mixup_from_settings({**base, "cutmix": 1.0}, num_classes=10, seed=3)
    assert (mixer.mixup_alpha, mixer.cutmix_alpha, mixer.seed) == (0.0, 1.0, 3)


def test_keys_are_settings_flags_and_listed():
    from vitshrink.cli import app
    from vitshrink.config import load_preset, resolve_settings

    deit = load_preset("deit")
    assert (deit["mixup"], deit["cutmix"], deit["mixup_prob"], deit["mixup_switch_prob"], deit["mixup_mode"]) == \
        (0.8, 1.0, 1.0, 0.5, "batch")
    assert load_preset("vanilla")["mixup"] == 0.0 and load_preset("uvc")["mixup"] == 0.0
    values = resolve_settings("deit", None, {"mixup": 0.2}, {"mixup_mode": "elem"}).values
    assert values["mixup"] == 0.2 and values["mixup_mode"] == "elem"
    with pytest.raises(UserError, match=r"^--mixup-mode .*must be batch, pair or elem"):
        resolve_settings("deit", None, None, {"mixup_mode": "row"})
    with pytest.raises(UserError, match=r"^--mixup-prob"):
        resolve_settings("deit", None, {"mixup_prob": 1.5}, None)
    shown = CliRunner().invoke(app, ["recipes", "show", "deit"])
    assert shown.exit_code == 0, shown.output
    for key in MIXUP_KEYS:
        assert f"--{key.replace('_', '-')} = " in shown.output, key
    assert "facebookresearch/deit main.py" in shown.output


# ---------------------------------------------------------------------------------------------- the loop
class RecordingKD(LogitKDTask):
    """Logit KD that keeps a copy of every batch it is given (what reached the task)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, input, target=None, extras=None):
        if self.training and torch.is_grad_enabled():
            self.seen.append((input.detach().clone(), target.clone(), extras["key"].clone()))
        return super().forward(input, target, extras)


class StopAfter:
    """A source that stops the run (an interruption) after ``batches`` batches in all."""

    def __init__(self, source, batches: int):
        self.source, self.left = source, batches

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __iter__(self):
        for batch in self.source:
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield batch


CFG = {"batch_size": 16, "workers": 0, "aug_scale": [0.35, 1.0], "aug_hflip": 0.5, "aug_color_jitter": 0.0,
       "aug_auto_augment": None, "aug_re_prob": 0.0}


def _run(out, *, mixing, stop_after=None, resume=False):
    student, teacher = tiny_vit(0), tiny_vit(1).eval()
    task = RecordingKD(student, teacher, kd_weight=0.5, temperature=4.0, smoothing=0.1)
    source = labelled_source(small_data(96, 16).train, student, CFG, seed=5)
    if stop_after is not None:
        source = StopAfter(source, stop_after)
    schedule = Schedule(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0, max_steps_per_epoch=4)
    arch_json = json.dumps(architecture_record(student))  # last.pt's record is validated on resume
    checkpointing = Checkpointing(out, 2, arch_json, lambda epoch, top1: None,
                                  load_checkpoint(out / "last.pt") if resume else None)
    env = TrainEnv(torch.device("cpu"), log=lambda message: None)
    train(task, source, schedule, checkpointing, evaluation=Evaluation(student, None), env=env, mixing=mixing)
    return task


def test_the_loop_feeds_the_task_timms_mix_and_nothing_without_it(tmp_path):
    mixer = SeededMixup(**DEIT_MIX, mode="batch", num_classes=10, seed=5)
    mixed_run = _run(tmp_path / "on", mixing=mixer)
    plain_run = _run(tmp_path / "off", mixing=None)
    # The source's own batches, drawn again, and mixed by timm's Mixup seeded from each batch's keys.
    source = labelled_source(small_data(96, 16).train, tiny_vit(0), CFG, seed=5)
    reference = Mixup(**DEIT_MIX, mode="batch", label_smoothing=0.0, num_classes=10)
    step = 0
    for epoch in range(2):
        source.set_epoch(epoch)
        for images, targets, extras in list(source)[:4]:
            seen_on, seen_off = mixed_run.seen[step], plain_run.seen[step]
            assert torch.equal(seen_off[0], images) and torch.equal(seen_off[1], targets)  # untouched
            np.random.seed(mixer.batch_seed(extras["key"]))
            ref_images, ref_soft = reference(images.clone(), targets)
            assert torch.equal(seen_on[0], ref_images) and torch.equal(seen_on[1], ref_soft)
            assert torch.equal(seen_on[2], extras["key"])
            assert torch.allclose(seen_on[1].sum(1), torch.ones(16), atol=1e-6)
            step += 1
    assert step == len(mixed_run.seen) == 8


def test_resume_mid_run_with_mixup_is_bit_identical(tmp_path):
    mixer = SeededMixup(**DEIT_MIX, mode="batch", num_classes=10, seed=5)
    _run(tmp_path / "whole", mixing=mixer)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", mixing=mixer, stop_after=7)  # epoch 2, after the step-6 checkpoint
    partial = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (partial["epoch"], partial["batch"], partial["global_step"]) == (1, 2, 6)
    np.random.seed(999), random.seed(999), torch.manual_seed(999)  # a new process: other global RNG states
    _run(tmp_path / "cut", mixing=mixer, resume=True)
    whole, resumed = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert resumed["global_step"] == whole["global_step"] == 8
    for key, value in whole["trainable"].items():
        assert torch.equal(resumed["trainable"][key], value), key


# ---------------------------------------------------------------------------------------------- soft targets
def _label_tasks():
    """Every task that takes labels, on tiny real models: (name, task, extras or None)."""
    from vitshrink.recipes.dearkd import DearKDTask

    student, teacher = tiny_vit(0), tiny_vit(1).eval()
    yield "LogitKD", LogitKDTask(student, teacher, kd_weight=0.5, temperature=4.0, smoothing=0.1), None
    deit = tiny_vit(2, "deit_tiny_distilled_patch16_224")
    yield "TokenKD", TokenKDTask(deit, teacher, distill_type="soft", kd_weight=0.1, temperature=3.0,
                                 smoothing=0.1), None
    cit = tiny_vit(3, "vitshrink_cit", patch_size=4, embed_dim=32, num_heads=2, mlp_ratio=4.0, stem_chs=32)
    live = Teachers.live({"teacher": teacher, "conv": tiny_vit(4).eval(), "inv": tiny_vit(5).eval()},
                         {"input_size": (3, 32, 32), "mean": CIFAR_MEAN, "std": CIFAR_STD})
    yield "MultiTokenKD", MultiTokenKDTask(cit, live, pairs=[(1, "conv", 1.0), (2, "inv", 1.0)],
                                           distill_type="soft", task_weight=1.0, smoothing=0.1), None
    yield "FeatureKD", FeatureKDTask(tiny_vit(6), teacher, pairs=[("blocks.0", "blocks.1")], widths=[(48, 48)],
                                     feature_weight=1.0, kd_weight=0.5, temperature=4.0), None
    cnn = create_model("cifar_resnet20", num_classes=10).eval()
    set_data_config(cnn, mean=CIFAR_MEAN, std=CIFAR_STD)
    dearkd_teachers = Teachers.live({"teacher": teacher, "cnn": cnn},
                                    {"input_size": (3, 32, 32), "mean": CIFAR_MEAN, "std": CIFAR_STD})
    dearkd = DearKDTask(tiny_vit(7, "deit_tiny_distilled_patch16_224"), dearkd_teachers, student_points=["blocks.0"],
                        cnn_points=["layer1"], widths=[(48, 16)], stage1_epochs=1, distill_type="soft",
                        kd_weight=0.5, temperature=3.0, feature_weight=1.0, smoothing=0.1)
    for epoch in (0, 1):  # stage I and stage II
        yield f"DearKD stage {epoch + 1}", dearkd, {"key": torch.tensor([[epoch, i] for i in range(6)])}
    yield "ClassificationTask", ClassificationTask(tiny_vit(8), criterion=nn.CrossEntropyLoss(label_smoothing=0.1),
                                                   verbose=False), None


def test_every_label_task_takes_soft_targets():
    """Each loss is affine in the targets: one-hot rows give the index loss, and a mix of two label sets gives
    the same mix of their losses (lam * L(y1) + (1 - lam) * L(y2), what SoftTargetCrossEntropy on a Mixup
    target means)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)
    y1, y2 = torch.randint(0, 10, (6,), generator=g), torch.randint(0, 10, (6,), generator=g)
    lam = 0.3
    soft = lam * F.one_hot(y1, 10).float() + (1 - lam) * F.one_hot(y2, 10).float()
    for name, task, extras in _label_tasks():
        assert check_mixup_allowed(task, {"mixup": 0.8}, recipe=name, uses_labels=True) is None
        task.train()

        def loss(target):
            torch.manual_seed(0)
            with torch.no_grad():
                return float(task(images, target, extras)["loss"] if extras is not None else task(images, target)["loss"])

        assert loss(F.one_hot(y1, 10).float()) == pytest.approx(loss(y1), abs=1e-5), name
        assert loss(soft) == pytest.approx(lam * loss(y1) + (1 - lam) * loss(y2), abs=1e-5), name


def test_uvc_official_objective_takes_soft_targets():
    from vitshrink.prune.uvc_objective import official_loss

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y1, y2 = torch.randint(0, 10, (6,), generator=g), torch.randint(0, 10, (6,), generator=g)
    one_hot = lambda y: F.one_hot(y, 10).float()  # noqa: E731
    loss = lambda y: float(official_loss(s, t, y)["loss"])  # noqa: E731
    kl = float(official_loss(s, t, one_hot(y1))["kd_loss"])
    assert loss(one_hot(y1)) == pytest.approx(0.9 * float(F.cross_entropy(s, y1)) + 0.1 * kl, abs=1e-6)
    assert loss(0.3 * one_hot(y1) + 0.7 * one_hot(y2)) == pytest.approx(0.3 * loss(one_hot(y1))
                                                                        + 0.7 * loss(one_hot(y2)), abs=1e-6)


def test_tasks_that_cannot_take_mixup_refuse_in_one_line():
    from vitshrink.recipes.uvc import OfficialUVCTask

    student, teacher = tiny_vit(0), tiny_vit(1).eval()
    cases = [
        (OfficialUVCTask(student, teacher), dict(recipe="uvc", uses_labels=True), "already mixes its batches"),
        (ClassificationTask(student, criterion=nn.NLLLoss(), verbose=False), dict(recipe="x", uses_labels=True),
         "cannot take mixup/cutmix"),
        (LogitKDTask(student, teacher, kd_weight=1.0, temperature=4.0), dict(recipe="probe", uses_labels=False),
         "trains without labels"),
    ]
    for task, where, message in cases:
        with pytest.raises(UserError) as caught:
            check_mixup_allowed(task, {"mixup": 0.0, "cutmix": 1.0}, **where)
        text = str(caught.value)
        assert "\n" not in text and text.startswith("--cutmix 1.0: ") and message in text, text


def test_task_smoothing_on_mixed_targets_equals_official_mixup_smoothing():
    """DeiT / co-advise official: Mixup(label_smoothing=e) targets + SoftTargetCrossEntropy. Ours: Mixup with
    no smoothing + the task's cross-entropy smoothing e. Smoothing is linear in the target, so they agree."""
    from timm.loss import SoftTargetCrossEntropy

    from vitshrink.distill import losses

    images, targets, extras = keyed_batch(n=16)
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(3)) * 3
    worst = 0.0
    for mode in ("batch", "pair", "elem"):
        mixer = SeededMixup(**DEIT_MIX, mode=mode, num_classes=10, seed=0)
        _, ours_targets, _ = mixer(images.clone(), targets, extras)
        official = Mixup(**DEIT_MIX, mode=mode, label_smoothing=0.1, num_classes=10)
        np.random.seed(mixer.batch_seed(extras["key"]))
        _, official_targets = official(images.clone(), targets)
        ours = losses.cross_entropy(logits, ours_targets, 0.1)
        reference = SoftTargetCrossEntropy()(logits, official_targets)
        worst = max(worst, float((ours - reference).abs()))
    assert worst < 1e-5  # measured: 9.5e-7 (float32)
    print(f"max abs diff {worst:.2e}")
