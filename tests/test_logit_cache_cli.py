"""``--logit-cache`` through the command line, recipe by recipe (issue 11).

Every run trains 3 steps of 32 images on a 200-image slice of the bundled CIFAR-10 data, so each takes seconds.
Spies wrap (and call through to) ``CachedTeacher.logits`` and ``LiveTeacher.logits`` to show which teacher the
training steps read: with a cache the cached role's teacher never runs in training.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli_support import assert_one_line_error, run_cli
from vitshrink.data import BUNDLED_VAL
from vitshrink.data.logit_cache import CachedTeacher
from vitshrink.distill.teachers import LiveTeacher

STEPS = 3
# deit and coadvise mix by default (official presets); a cache holds unmixed views, so these runs turn mixing off.
FAST = ["--mixup", "0", "--cutmix", "0", "--epochs", "1", "-b", "32", "--steps-per-epoch", str(STEPS), "--device", "cpu", "--no-progress", "-j", "0",
        "--set", "bench_batch_sizes=[1]", "--set", "eval_batch_size=100", "--set", "checkpoint_steps=0"]
TINY_CIT = "vitshrink_cit:img_size=32,patch_size=4,embed_dim=32,depth=2,num_heads=2,stem_chs=32"




@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """20 images per class of the bundled test_1k tar, as an ImageFolder (180 train / 20 val at --val-split 0.1)."""
    root = tmp_path_factory.mktemp("cache_cli_data")
    per_class: dict[str, int] = {}
    with tarfile.open(BUNDLED_VAL) as tar:
        for member in tar.getmembers():
            label = member.name.split("/")[0]
            if member.isfile() and per_class.get(label, 0) < 20:
                per_class[label] = per_class.get(label, 0) + 1
                tar.extract(member, root, filter="data")
    return root


@pytest.fixture()
def spies(monkeypatch):
    """Calls of the cached and live teachers' ``logits`` (cache folder or None per call)."""
    calls: dict[str, list] = {"cached": [], "live": []}
    cached_logits, live_logits = CachedTeacher.logits, LiveTeacher.logits

    def cached(self, images, extras=None):
        calls["cached"].append(self.path.name)
        return cached_logits(self, images, extras)

    def live(self, images, extras=None):
        calls["live"].append(len(images))
        return live_logits(self, images, extras)

    monkeypatch.setattr(CachedTeacher, "logits", cached)
    monkeypatch.setattr(LiveTeacher, "logits", live)
    return calls


def read_only(spies, *caches: str) -> bool:
    """Training read each of ``caches`` at every step (the loop also re-runs the last batch to check the
    weights) and never ran a live teacher."""
    return all(spies["cached"].count(name) >= STEPS for name in caches) and set(spies["cached"]) == set(caches) \
        and spies["live"] == []


def make_cache(capsys, teacher, data_dir, out: Path, *, topk: int = 10) -> Path:
    if not (out / "meta.json").exists():
        code, _, err = run_cli(capsys, "cache-logits", teacher, "--data", data_dir, "--epochs", 1, "--topk", topk,
                               "--out", out, "-b", 64, "--device", "cpu")
        assert code == 0, err
    return out



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


def _records(out: Path) -> tuple[dict, dict, str]:
    args = yaml.safe_load((out / "args.yaml").read_text())
    return args, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_deit_hard_from_cache_equals_live_and_records_the_cache(capsys, spies, tiny_teacher_path, data_dir, cache_dir,
                                                               tmp_path):
    cache = make_cache(capsys, tiny_teacher_path, data_dir, cache_dir / "tiny")
    spies["live"].clear()  # building the cache ran the live teacher
    common = ["distill", tiny_teacher_path, "--recipe", "deit", "--distill-type", "hard", "--data", data_dir, *FAST]
    # The deit preset mixes by default: the cache is refused, naming the flags that turn mixing off.
    code, _, err = run_cli(capsys, *common[:-len(FAST)], *FAST[4:], "--out", tmp_path / "mixed", "--logit-cache", cache)
    assert_one_line_error(code, err, "--logit-cache", "add --mixup 0 --cutmix 0")
    assert not (tmp_path / "mixed" / "student.safetensors").exists()
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "cached", "--logit-cache", cache)
    assert code == 0, err
    assert read_only(spies, "tiny")  # the teacher did not run in training
    spies["cached"].clear()
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "live")
    assert code == 0, err
    assert len(spies["live"]) >= STEPS and len(spies["cached"]) == 0
    # Hard targets: the cached top-1 (fp16 log-probabilities) is the live argmax, the replayed views are the live views, so
    # the two students are bit-identical.
    cached, live = (load_file(tmp_path / name / "student.safetensors") for name in ("cached", "live"))
    assert cached.keys() == live.keys() and all(torch.equal(cached[k], live[k]) for k in cached)
    args, report, markdown = _records(tmp_path / "cached")
    meta = json.loads((cache / "meta.json").read_text())
    for record in (args["logit_cache"]["teacher"], report["logit_cache"]["teacher"]):
        assert record == {"path": str(cache), "fingerprint": meta["fingerprint"], "epochs": 1}
    assert f"read from the logit cache {cache} (top-10, seed 0" in markdown
    assert "logit_cache" not in _records(tmp_path / "live")[1]


def test_deit_soft_reads_the_cache(capsys, spies, tiny_teacher_path, data_dir, cache_dir, tmp_path):
    cache = make_cache(capsys, tiny_teacher_path, data_dir, cache_dir / "tiny")
    spies["live"].clear()
    code, _, err = run_cli(capsys, "distill", tiny_teacher_path, "--recipe", "deit", "--distill-type", "soft",
                           "--data", data_dir, *FAST, "--out", tmp_path / "soft", "--logit-cache", cache)
    assert code == 0, err
    assert read_only(spies, "tiny")
    args, report, _ = _records(tmp_path / "soft")
    assert args["config"]["distill_type"] == "soft" and report["logit_cache"]["teacher"]["path"] == str(cache)


def test_uvc_search_runs_live_posttraining_reads_the_cache(capsys, spies, tiny_teacher_path, data_dir, cache_dir,
                                                          tmp_path):
    """uvc's search distils from its own unpruned copy of the teacher (it never reads ``Teachers``); only the
    post-training KD, the recipe's training task, reads the cache."""
    cache = make_cache(capsys, tiny_teacher_path, data_dir, cache_dir / "tiny")
    spies["live"].clear()
    common = ["distill", tiny_teacher_path, "--recipe", "uvc", "--flops-target", "0.5", "--search-steps", 3,
              "--set", "search_batch_size=32", "--data", data_dir, *FAST]
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "uvc", "--logit-cache", cache)
    assert code == 0, err
    assert (tmp_path / "uvc" / "uvc_plan.json").exists()
    assert read_only(spies, "tiny")
    assert _records(tmp_path / "uvc")[0]["logit_cache"]["teacher"]["epochs"] == 1
    # The official post-training objective runs the teacher on mixup images: refused before any work.
    code, _, err = run_cli(capsys, *common, "--posttrain-objective", "official", "--out", tmp_path / "official",
                           "--logit-cache", cache)
    assert code == 2 and err.count("\n") == 1 and "posttrain_objective official" in err
    assert not (tmp_path / "official" / "uvc_plan.json").exists()



def test_coadvise_one_cache_per_teacher_role(capsys, spies, coadvise_teachers, data_dir, cache_dir, tmp_path):
    conv, inv = coadvise_teachers / "conv.safetensors", coadvise_teachers / "inv.safetensors"
    conv_cache = make_cache(capsys, conv, data_dir, cache_dir / "conv", topk=5)
    inv_cache = make_cache(capsys, inv, data_dir, cache_dir / "inv", topk=5)
    spies["live"].clear()
    common = ["distill", "--recipe", "coadvise", "--student", TINY_CIT, "--conv-teacher", conv, "--inv-teacher", inv,
              "--data", data_dir, *FAST]
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "co", "--logit-cache", f"conv={conv_cache}",
                           "--logit-cache", f"inv={inv_cache}")
    assert code == 0, err
    assert read_only(spies, "conv", "inv")
    args, report, markdown = _records(tmp_path / "co")
    assert set(args["logit_cache"]) == set(report["logit_cache"]) == {"conv", "inv"}
    assert args["logit_cache"]["inv"]["fingerprint"]["topk"] == 5
    assert "Teacher logits (conv)" in markdown and "Teacher logits (inv)" in markdown
    # The caches swapped: each was made for the other teacher.
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "swapped", "--logit-cache", f"conv={inv_cache}",
                           "--logit-cache", f"inv={conv_cache}")
    assert code == 2 and err.count("\n") == 1 and "made for another teacher than this run" in err
    assert "Traceback" not in err
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "nope", "--logit-cache", f"cnn={inv_cache}")
    assert code == 2 and "has no teacher role 'cnn'" in err


@pytest.mark.parametrize("recipe", ["probe", "dearkd"])
def test_feature_recipes_refuse_the_cache(capsys, tiny_teacher_path, data_dir, cache_dir, tmp_path, recipe):
    cache = make_cache(capsys, tiny_teacher_path, data_dir, cache_dir / "tiny")
    code, out, err = run_cli(capsys, "distill", tiny_teacher_path, "--recipe", recipe, "--data", data_dir, *FAST,
                             "--out", tmp_path / recipe, "--logit-cache", cache)
    assert code == 2 and err.count("\n") == 1
    assert f"recipe {recipe} distils teacher features, which a logit cache does not hold" in err
    assert not (tmp_path / recipe / "args.yaml").exists()
