"""What the weights cannot tell, decided by behaviour: two 4-head ViTs trained on real MNIST images, one on
mean/std 0.5 and one on raw pixels, saved as plain state dicts; `convert --data` must pick 4 heads and the right
normalisation together (also under an --arch whose defaults say otherwise), show the wrong candidates scoring
lower, and refuse without images; the advice of that refusal writes a file equal to the original module."""
from __future__ import annotations

import re

import pytest
import torch

from resolve_support import (MNIST_TEST, MNIST_TRAIN, accuracy, mnist_tensors, small_image_folder,
                             trained_hand_written)
from test_cli import assert_one_line_error, run_cli
from vitshrink.io import data_config, load_model, record_of

pytestmark = pytest.mark.skipif(not (MNIST_TRAIN.exists() and MNIST_TEST.exists()), reason="shared MNIST not present")
HALF, RAW = ((0.5,), (0.5,)), ((0.0,), (1.0,))


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory) -> dict[str, tuple]:
    folder = tmp_path_factory.mktemp("resolve")
    return {name: trained_hand_written(folder / f"vit_{name}.pth", *norm, steps=200)
            for name, norm in (("half", HALF), ("raw", RAW))}


@pytest.fixture(scope="session")
def labelled(tmp_path_factory):
    """300 MNIST test images (30 a class) as a folder: cheaper to open than the 10,000-image tar."""
    return small_image_folder(tmp_path_factory.mktemp("mnist_300"), per_class=30)


def _table(err: str, n: int = 256) -> list[tuple[bool, str, float]]:
    rows = []
    for line in err.splitlines():
        match = re.match(rf"^([* ]) (.+)  ->  top-1 ([0-9.]+) on {n} images \(cross-entropy [0-9.]+\)$", line)
        if match:
            rows.append((match.group(1) == "*", match.group(2), float(match.group(3))))
    return rows


@pytest.mark.parametrize("name, arch", [("half", None), ("raw", "deit_tiny_patch16_224")])
def test_convert_decides_heads_and_normalisation_together(capsys, trained_pair, labelled, tmp_path, name, arch):
    path, original = trained_pair[name]
    out = tmp_path / "converted.safetensors"
    code, stdout, err = run_cli(capsys, "convert", str(path), "-o", str(out), "--data", str(labelled),
                                *(["--arch", arch] if arch else []))
    assert code == 0, err
    rows = _table(err)
    chosen = [r for r in rows if r[0]]
    assert len(chosen) == 1 and "num_heads=4" in chosen[0][1]
    expected_input = "input 0.5 (0.5 ± 0.5)" if name == "half" else "input none (0 ± 1)"
    assert expected_input in chosen[0][1]
    wrong = [r for r in rows if "num_heads=4" not in r[1] or expected_input not in r[1]]
    assert wrong and all(r[2] < chosen[0][2] for r in wrong if "norm_eps" not in r[1])
    model = load_model(out)
    assert record_of(model).kwargs["num_heads"] == 4
    cfg = data_config(model)
    assert tuple(cfg["mean"]) == (HALF if name == "half" else RAW)[0]
    # The written file, with its recorded normalisation, classifies as well as the original module with its own.
    # (Not logit parity: on a briefly trained model ReLU may score as well as the true GELU, and top-1 cannot
    # tell one LayerNorm eps from another; --module settles those, tests/test_module.py.)
    images, labels = mnist_tensors(MNIST_TEST, limit=500)
    norm = HALF if name == "half" else RAW
    original_top1 = accuracy(original, images, labels, *norm)
    assert accuracy(model, images, labels, tuple(cfg["mean"]), tuple(cfg["std"])) >= original_top1 - 0.02


def test_convert_without_images_refuses_and_its_advice_writes_the_right_file(capsys, trained_pair, tmp_path):
    path, original = trained_pair["raw"]
    out = tmp_path / "guess.safetensors"
    code, _, err = run_cli(capsys, "convert", str(path), "-o", str(out))
    assert_one_line_error(code, err, "num_heads, input normalisation, norm placement, activation",
                          "cannot be read from the weights", "num_heads=1 assumed", "--data",
                          "--num-heads N --mean M --std S --assume norm_placement=pre --assume act_layer=gelu",
                          "nothing written")
    assert not out.exists()
    code, stdout, err = run_cli(capsys, "convert", str(path), "-o", str(out), "--num-heads", "4", "--mean", "0",
                                "--std", "1", "--assume", "norm_placement=pre", "--assume", "act_layer=gelu")
    assert code == 0, err
    images, _ = mnist_tensors(MNIST_TEST, limit=16)
    with torch.no_grad():
        assert (load_model(out)(images) - original(images)).abs().max() <= 1e-4


def test_resolve_on_a_loading_command(capsys, trained_pair, labelled):
    path, original = trained_pair["half"]
    code, stdout, err = run_cli(capsys, "evaluate", str(path), "--resolve", "--data", str(labelled), "-j", "0",
                                "--device", "cpu")
    assert code == 0, err
    assert any(chosen and "num_heads=4" in label for chosen, label, _ in _table(err, n=256))
    assert float(stdout.split("top-1 ")[1].split()[0]) > 0.6
    code, _, err = run_cli(capsys, "inspect", str(path), "--resolve")
    assert_one_line_error(code, err, "--resolve", "needs labelled images", "pass --data")


# --- mismatch errors suggest the --key-map rule (names and shapes), never a shape complaint about a renamed tensor

def _renamed(tmp_path, renames: dict[str, str]):
    from resolve_support import hand_written_namespace

    torch.manual_seed(0)
    state = hand_written_namespace()["build"]().state_dict()
    for old, new in renames.items():
        state = {re.sub(old, new, k): v for k, v in state.items()}
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("renames, needles", [
    ({r"^pos_embed$": "pos_embed.pos_embedding"}, ["pos_embed.pos_embedding (1, 17, 32) looks like pos_embed"]),
    ({r"^norm\.": "final_ln.", r"^head\.": "predictor."}, ["--key-map '^final_ln\\.=norm.'",
                                                          "--key-map '^predictor\\.=head.'", "(4 of 4 unmatched"]),
    ({r"^head\.": "clf_layer."}, ["clf_layer.weight (10, 32) looks like head.weight"]),
    ({r"\.mlp\.0\.": ".mlp.lin_a.", r"\.mlp\.2\.": ".mlp.lin_b."}, ["mlp\\.lin_a\\.=mlp.fc1.",
                                                                    "mlp\\.lin_b\\.=mlp.fc2.", "(8 of 8 unmatched"]),
])
def test_mismatch_suggests_the_key_map_that_loads_the_file(tmp_path, renames, needles):
    from vitshrink.errors import UserError

    path = _renamed(tmp_path, renames)
    for arch in (None, "deit_tiny_patch16_224"):  # sizes read from the file, or an arch of another width
        with pytest.raises(UserError) as caught:
            load_model(path, arch=arch, num_heads=4)
        message = str(caught.value)
        assert "has shape" not in message and "try --key-map" in message, message
        for needle in needles:
            assert needle in message, message
    rules = re.findall(r"--key-map '([^']+)'", message)
    model = load_model(path, num_heads=4, key_map=rules)  # the advice loads the file
    assert model.num_classes == 10 and record_of(model).kwargs["embed_dim"] == 32


def test_the_issues_layouts_load_without_a_rule(tmp_path):
    # out_head.0/.1 (LayerNorm + Linear) and a misspelt classifer head are recognised layouts, not mismatches.
    for renames in ({r"^norm\.": "out_head.0.", r"^head\.": "out_head.1."}, {r"^head\.": "classifer."}):
        model = load_model(_renamed(tmp_path, renames), num_heads=4)
        assert model.num_classes == 10
