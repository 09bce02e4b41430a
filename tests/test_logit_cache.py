"""Logit cache (TinyViT-style): replay identity, KD-loss equality with K = classes, fingerprint refusal, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO
from vitshrink.data.logit_cache import CachedTeacher, cache_logits, check_fingerprint, rebuild_logits, run_fingerprint
from vitshrink.data.sources import SeededAugmentation, train_transform, with_transform
from vitshrink.distill import losses
from vitshrink.distill.teachers import LiveTeacher
from vitshrink.errors import UserError
from vitshrink.io import data_config, load_model
from vitshrink.pipeline import resolve_run_settings

N = 40


@pytest.fixture()
def setup(tiny_teacher_path):
    from vitshrink.data import resolve_data
    from torch.utils.data import Subset

    teacher = load_model(str(tiny_teacher_path))
    data = resolve_data()
    split = data.train
    split = type(split)(split.reader, split.indices[:N], None, target_map=split.target_map) \
        if hasattr(split, "target_map") else Subset(split, range(N))
    _, settings = resolve_run_settings("vanilla", overrides={"batch_size": 16})
    return teacher, split, dict(settings.values)


def _fill(teacher, path, split, cfg, out, *, epochs, topk):
    return cache_logits(teacher, split, out, cfg=cfg, epochs=epochs, topk=topk, seed=0, num_classes=10)


def test_cache_kd_loss_equals_live_and_view_is_replayed(setup, tiny_teacher_path, tmp_path):
    teacher, split, cfg = setup
    meta = _fill(teacher, tiny_teacher_path, split, cfg, tmp_path / "c", epochs=2, topk=10)
    assert meta["epochs_done"] == 2
    cached = CachedTeacher(tmp_path / "c")
    live = LiveTeacher(teacher, data_config(teacher))
    view = SeededAugmentation(with_transform(split, train_transform(teacher, cfg)), seed=0)
    items = [view[(1, i)] for i in range(0, N, 3)]
    images = torch.stack([item[0] for item in items])
    extras = {"key": torch.tensor([item[2] for item in items])}
    # Bit-identical replay: the same key gives the same view twice, and the live teacher on it gives the cached top-1.
    again = torch.stack([view[(1, i)][0] for i in range(0, N, 3)])
    assert torch.equal(images, again)
    t_live, t_cached = live.logits(images), cached.logits(images, extras)
    assert torch.equal(t_live.argmax(1), t_cached.argmax(1))
    student = torch.randn(len(items), 10)
    target = torch.tensor([item[1] for item in items])
    for temperature in (1.0, 4.0):
        a = losses.kd_loss(student, t_live, target, kd_weight=0.5, temperature=temperature)["loss"]
        b = losses.kd_loss(student, t_cached, target, kd_weight=0.5, temperature=temperature)["loss"]
        assert abs(float(a) - float(b)) <= 1e-3


def test_topk_spreads_leftover_mass_uniformly():
    logits = torch.randn(5, 10)
    top = logits.topk(3, dim=1)
    lse = torch.logsumexp(logits, 1)
    rebuilt = rebuild_logits(top.values - lse[:, None], top.indices, lse, 10)
    assert torch.allclose(rebuilt.gather(1, top.indices), top.values, atol=1e-5)  # the teacher's own top logits
    p, q = logits.softmax(1), rebuilt.softmax(1)
    assert torch.allclose(q.gather(1, top.indices), p.gather(1, top.indices), atol=1e-6)
    rest = q.scatter(1, top.indices, 0.0)
    expected = (1 - p.gather(1, top.indices).sum(1, keepdim=True)) / 7
    assert torch.allclose(rest[rest > 0].view(5, 7), expected.expand(5, 7), atol=1e-6)


def test_mismatched_fingerprint_refused(setup, tiny_teacher_path, tmp_path):
    teacher, split, cfg = setup
    _fill(teacher, tiny_teacher_path, split, cfg, tmp_path / "c", epochs=1, topk=5)
    same = run_fingerprint(teacher, split, data_config(teacher), cfg, seed=0, topk=5)
    check_fingerprint(tmp_path / "c", same, epochs=1)
    other_seed = run_fingerprint(teacher, split, data_config(teacher), cfg, seed=1, topk=5)
    with pytest.raises(UserError, match="another seed"):
        check_fingerprint(tmp_path / "c", other_seed, epochs=1)
    other_aug = run_fingerprint(teacher, split, data_config(teacher), {**cfg, "aug_hflip": 0.0},
                                seed=0, topk=5)
    with pytest.raises(UserError, match="another augmentation"):
        check_fingerprint(tmp_path / "c", other_aug, epochs=1)
    with pytest.raises(UserError, match="holds 1 epochs, this run trains 3"):
        check_fingerprint(tmp_path / "c", same, epochs=3)


def test_interrupted_cache_resumes(setup, tiny_teacher_path, tmp_path):
    teacher, split, cfg = setup
    full = _fill(teacher, tiny_teacher_path, split, cfg, tmp_path / "full", epochs=2, topk=4)
    calls = []

    def stop_in_epoch_1(epoch, done, rate):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_logits(teacher, split, tmp_path / "part", cfg=cfg, epochs=2, topk=4, seed=0,
                     num_classes=10, progress=stop_in_epoch_1)
    resumed_epochs = []
    meta = cache_logits(teacher, split, tmp_path / "part", cfg=cfg, epochs=2, topk=4, seed=0,
                        num_classes=10, progress=lambda e, d, r: resumed_epochs.append(e))
    assert meta["epochs_done"] == 2 and set(resumed_epochs) == {1}
    assert full["epochs_done"] == 2
    for name in ("values.f16", "indices.i2", "lse.f32"):
        assert np.array_equal(np.fromfile(tmp_path / "full" / name, dtype=np.uint8),
                              np.fromfile(tmp_path / "part" / name, dtype=np.uint8))


def test_distill_reads_cache_and_refuses_mismatch(capsys, tiny_teacher_path, tmp_path):
    """End to end through the CLI: a vanilla run on the cache records it in args.yaml; another seed is refused
    (exit 2, one line) by a real ``python -m vitshrink`` process. The cache and the run go through the same entry
    point in-process (no Python start to pay for each)."""
    import subprocess
    import sys

    import yaml

    from cli_support import run_cli

    data = REPO / "vitshrink" / "assets" / "cifar10_test_1k.tar"
    code, _, err = run_cli(capsys, "cache-logits", tiny_teacher_path, "--data", data, "--epochs", 1, "--topk", 10,
                           "--out", tmp_path / "c", "-b", 64, "--device", "cpu")
    assert code == 0, err
    # Two steps and one timed batch size: the test reads the run's records, not its accuracy or latency.
    common = ["--data", data, "--epochs", 1, "-b", 64, "--steps-per-epoch", 2, "--set", "bench_batch_sizes=[1]",
              "--device", "cpu", "--no-progress", "-j", 0, "--logit-cache", tmp_path / "c"]
    code, _, err = run_cli(capsys, "distill", tiny_teacher_path, "--out", tmp_path / "run", *common)
    assert code == 0, err
    args = yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())
    assert args["logit_cache"]["teacher"]["fingerprint"]["topk"] == 10
    other = subprocess.run([sys.executable, "-m", "vitshrink", "distill", *map(str, [
        tiny_teacher_path, "--out", tmp_path / "run2", "--seed", 1, *common])], cwd=REPO, capture_output=True,
        text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    # --seed also changes the hold-out split, so the data differs too
    assert other.returncode == 2 and "seed than this run" in other.stderr and "Traceback" not in other.stderr
    # probe / dearkd refusing the cache: tests/test_logit_cache_cli.py (in-process, seconds)


def test_fingerprint_mismatch_names_what_differs(setup, tiny_teacher_path, tmp_path):
    """One run setting changed at a time; the refusal names it (seed, augmentation and epochs: above)."""
    teacher, split, cfg = setup
    _fill(teacher, tiny_teacher_path, split, cfg, tmp_path / "c", epochs=1, topk=5)
    dcfg = data_config(teacher)
    torch.manual_seed(1)
    other_teacher = load_model(str(tiny_teacher_path)).apply(
        lambda m: m.reset_parameters() if isinstance(m, torch.nn.Linear) else None)
    fewer = type(split)(split.reader, split.indices[:N - 1], None, target_map=split.target_map)
    cases = {"teacher": run_fingerprint(other_teacher, split, dcfg, cfg, seed=0, topk=5),
             "data": run_fingerprint(teacher, fewer, dcfg, cfg, seed=0, topk=5),
             "input_size": run_fingerprint(teacher, split, {**dcfg, "input_size": (3, 48, 48)}, cfg,
                                           seed=0, topk=5)}
    for name, expected in cases.items():
        with pytest.raises(UserError, match=f"made for another {name} than this run"):
            check_fingerprint(tmp_path / "c", expected, epochs=1)
    # K is not part of the match: a run reads whatever K the cache holds.
    check_fingerprint(tmp_path / "c", run_fingerprint(teacher, split, dcfg, cfg, seed=0, topk=3), epochs=1)


def test_cached_teacher_refuses_images_without_keys_and_mixing_settings(setup, tiny_teacher_path, tmp_path):
    from vitshrink.data.logit_cache import check_replayable

    teacher, split, cfg = setup
    _fill(teacher, tiny_teacher_path, split, cfg, tmp_path / "c", epochs=1, topk=5)
    with pytest.raises(UserError, match="images other than the cached training views"):
        CachedTeacher(tmp_path / "c").logits(torch.zeros(2, 3, 32, 32))
    check_replayable("vanilla", {**cfg, "mixup": 0.0, "cutmix": 0.0})
    check_replayable("vanilla", {**cfg, "mixup": 0.8, "mixup_prob": 0.0})  # mixing never applied
    with pytest.raises(UserError, match="cutmix is on in the deit settings.*add --cutmix 0"):
        check_replayable("deit", {**cfg, "mixup": 0.0, "cutmix": 1.0})
    with pytest.raises(UserError, match="posttrain_objective official"):
        check_replayable("uvc", {**cfg, "posttrain_objective": "official"})
