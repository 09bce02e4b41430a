"""`--module FILE.py:CALLABLE`: the user's own model code as ground truth. Parity with their module on real
images is proven before anything runs; a computation vitshrink cannot reproduce is refused with where the two
first diverge; a missing file/callable, bad JSON, or a module that fails to build or load is one error line."""
from __future__ import annotations

import pytest
import torch

from resolve_support import HAND_WRITTEN_VIT, MNIST_TEST, hand_written_namespace, mnist_tensors
from test_cli import assert_one_line_error, run_cli
from vitshrink.io import load_model, record_of

pytestmark = pytest.mark.skipif(not MNIST_TEST.exists(), reason="shared MNIST not present")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """The module file, and two checkpoints of it (random weights suffice for parity): 4-head pre-norm, and
    a norm on each branch output (before the residual add), which no vitshrink reading reproduces."""
    folder = tmp_path_factory.mktemp("module")
    (folder / "my_vit.py").write_text(HAND_WRITTEN_VIT)
    build = hand_written_namespace()["build"]
    torch.manual_seed(0)
    pre = build(heads=4)
    torch.save(pre.state_dict(), folder / "pre.pth")
    torch.manual_seed(1)
    torch.save(build(heads=4, placement="res_post").state_dict(), folder / "res_post.pth")
    return folder, pre


def test_module_proves_parity_and_the_converted_file_equals_the_users_module(capsys, user_files, tmp_path):
    folder, pre = user_files
    out = tmp_path / "mine.safetensors"
    code, stdout, err = run_cli(capsys, "convert", str(folder / "pre.pth"), "-o", str(out), "--module",
                                f"{folder / 'my_vit.py'}:build", "--module-args", '{"heads": 4}', "--mean", "0.5",
                                "--std", "0.5")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "logits match your module within" in flat
    assert "(num_heads=4, norm_placement=pre, act_layer=gelu, head_softmax=False, norm_eps=1e-05)" in flat
    images, _ = mnist_tensors(MNIST_TEST, limit=16)
    with torch.no_grad():
        assert (load_model(out)(images) - pre(images)).abs().max() <= 1e-4
    assert record_of(load_model(out)).kwargs["num_heads"] == 4


def test_module_names_where_a_misplaced_norm_diverges(capsys, user_files, tmp_path):
    folder, _ = user_files
    code, _, err = run_cli(capsys, "inspect", str(folder / "res_post.pth"), "--module",
                           f"{folder / 'my_vit.py'}:build", "--module-args", '{"placement": "res_post"}')
    assert_one_line_error(code, err, "no reading of", "reproduces your module's logits",
                          "block 0 output differs by", "its input matches", "norm placement")


@pytest.mark.parametrize("module, args, needles", [
    ("missing.py:build", None, ["missing.py is not a Python file (not found)"]),
    ("my_vit.py", None, ["expected FILE.py:CALLABLE"]),
    ("my_vit.py:nothing", None, ["defines no callable nothing", "build"]),
    ("my_vit.py:build", "{heads: 4}", ["--module-args: not valid JSON"]),
    ("my_vit.py:build", "[4]", ["expected a JSON object"]),
    ("my_vit.py:build", '{"widht": 8}', ["build(**{'widht': 8}) failed (TypeError"]),
    ("my_vit.py:build", '{"heads": 4, "dim": 64}', ["does not load strictly into the module it builds"]),
])
def test_module_errors_are_one_line(capsys, user_files, module, args, needles):
    folder, _ = user_files
    path = module if module.startswith("missing") else f"{folder}/{module}"
    code, _, err = run_cli(capsys, "inspect", str(folder / "pre.pth"), "--module", path,
                           *(["--module-args", args] if args else []))
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("layout, callable_name", [("torch_encoder", "TorchEncoderViT"), ("per_head", "PerHeadViT")])
def test_module_settles_what_behaviour_cannot(capsys, tmp_path, layout, callable_name):
    # nn.TransformerEncoder (post-norm, ReLU) and per-head attention ending in a softmax: the module's logits pick
    # the reading (a softmax at the end and ReLU vs GELU are invisible to top-1), and the file equals the module.
    from pathlib import Path

    from handwritten_vits import LAYOUTS

    torch.manual_seed(0)
    original = LAYOUTS[layout](img_size=28, patch_size=7, in_chans=1).eval()
    checkpoint, out = tmp_path / f"{layout}.pth", tmp_path / f"{layout}.safetensors"
    torch.save(original.state_dict(), checkpoint)
    module_file = Path(__file__).with_name("handwritten_vits.py")
    code, _, err = run_cli(capsys, "convert", str(checkpoint), "-o", str(out), "--module",
                           f"{module_file}:{callable_name}", "--module-args",
                           '{"img_size": 28, "patch_size": 7, "in_chans": 1}', "--mean", "0.5", "--std", "0.5")
    assert code == 0, err
    assert "logits match your module within" in " ".join(err.split())
    images, _ = mnist_tensors(MNIST_TEST, limit=16)
    with torch.no_grad():
        assert (load_model(out)(images) - original(images)).abs().max() <= 1e-4
