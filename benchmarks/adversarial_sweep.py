"""Adversarial sweep (issue 13): run the CLI on 100+ hostile inputs and faults, each for real, and classify.

Each case crafts its input in a fresh folder, runs ``python -m vitshrink ...`` in a subprocess and checks:
  * an expected refusal: exit code 2, exactly one stderr line "error: ..." (naming ``needle`` when given);
  * an expected success: exit code 0 and the case's own check of the result (e.g. the right counts);
  * always: no "Traceback" anywhere, and nothing outside the case's output folder changed (a "victim" folder
    beside it and every shared input are hashed before and after).
Anything else is a defect. Prints a table and writes JSON (default benchmarks/results/adversarial_sweep.json).

    nice -n 5 python benchmarks/adversarial_sweep.py [--only SUBSTRING] [--json PATH]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------- inputs
def write_images(folder: Path, n: int, size: int = 16, seed: int = 0, prefix: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{prefix}{i:03d}.png")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shared(work: Path) -> dict[str, str]:
    """Models and data every case may read (hashed before and after each case)."""
    import torch

    from vitshrink.io import create_model, save_model

    shared = work / "shared"
    shared.mkdir(parents=True)

    def vit(classes: int):
        torch.manual_seed(0)
        return create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                            mlp_ratio=2.0, num_classes=classes).eval()

    save_model(vit(3), shared / "vit3.safetensors", class_names=["cat", "dog", "fish"])
    save_model(vit(2), shared / "vit2.safetensors", class_names=["cat", "dog"])
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        model = vit(3)
        with torch.no_grad():
            model.blocks[1].mlp.fc1.weight[0, 0] = value
        save_model(model, shared / f"{name}.safetensors", class_names=["cat", "dog", "fish"])
    write_images(shared / "pool" / "a", 5)
    write_images(shared / "pool" / "b", 5, seed=1)
    write_images(shared / "data" / "cat", 12, seed=2)
    write_images(shared / "data" / "dog", 12, seed=3)
    (shared / "a_file").write_text("a plain file")
    return {"vit": str(shared / "vit3.safetensors"), "vit2": str(shared / "vit2.safetensors"),
            "nan": str(shared / "nan.safetensors"), "inf": str(shared / "inf.safetensors"),
            "pool": str(shared / "pool"), "data": str(shared / "data"), "a_file": str(shared / "a_file"),
            "shared": str(shared)}


def digest(root: Path) -> dict[str, str]:
    found = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# -------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    group: str
    args: list[str]
    expect: str = "error"  # "error" (exit 2, one line) or "ok" (exit 0)
    needle: str | None = None
    setup: Callable[[Path, dict], None] | None = None  # (case dir, shared) -> crafts the input
    check: Callable[[Path, str, str], str | None] | None = None  # (case dir, stdout, stderr) -> problem
    pre: list[str] = field(default_factory=list)  # a CLI run that prepares the case (must exit 0)
    before: Callable[[Path, dict], None] | None = None  # crafts what ``pre`` needs
    env: dict[str, str] = field(default_factory=dict)
    limit_fsize: int | None = None


def E(group: str, name: str, args: str, needle: str | None = None, **kw) -> Case:
    return Case(name, group, args.split(), "error", needle, **kw)


def OK(group: str, name: str, args: str, check=None, **kw) -> Case:
    return Case(name, group, args.split(), "ok", None, check=check, **kw)


def contains(*needles: str):
    def check(case_dir: Path, out: str, err: str) -> str | None:
        text = " ".join((out + " " + err).split())
        missing = [n for n in needles if n not in text]
        return f"missing {missing} in output" if missing else None
    return check


SEL = "select-wild --teacher {vit} --pool {pool} --num 3 --criterion confidence -j 0 --device cpu --out {out}"
DST = "distill {vit2} --data {data} --out {out} --epochs 1 -b 8 -j 0 --no-progress"


def numeric_cases() -> list[Case]:
    cases = []
    spec_flags = [("--num-heads", ["0", "-1", "abc", "1000000"]), ("--img-size", ["0", "-5", "99999999", "nan"]),
                  ("--in-chans", ["0", "-2"]), ("--num-classes", ["0", "-1"])]
    for flag, values in spec_flags:
        for value in values:
            cases.append(E("numbers", f"inspect {flag} {value}", f"inspect {{vit}} {flag} {value}", flag))
    for flag, values in (("--mean", ["nan", "inf", "a,b", "0.5,,0.5"]), ("--std", ["0", "-1", "nan", "1,0,1", "inf"])):
        for value in values:
            cases.append(E("numbers", f"evaluate {flag} {value}", f"evaluate {{vit}} --data {{data}} {flag} {value}", flag))
    for flag, value in (("-b", "0"), ("-b", "-4"), ("-b", "x"), ("-j", "-1"), ("-j", "100000")):
        cases.append(E("numbers", f"evaluate {flag} {value}", f"evaluate {{vit}} --data {{data}} {flag} {value}"))
    for flag, value in (("--batch-sizes", "0"), ("--batch-sizes", "-1"), ("--batch-sizes", "1,,2"),
                        ("--batch-sizes", "100000"), ("--threads", "0"), ("--threads", "-1"),
                        ("--min-time", "nan"), ("--min-time", "-1"), ("--min-time", "inf")):
        cases.append(E("numbers", f"benchmark {flag} {value}", f"benchmark {{vit}} {flag} {value}", flag))
    for extra, flag in (("--num 0", "--num"), ("--num -1", "--num"), ("--fraction 0", "--fraction"),
                        ("--fraction 1.5", "--fraction"), ("--fraction nan", "--fraction"),
                        ("--fraction -0.1", "--fraction"), ("-b 0", "--batch-size"), ("-j -1", "--workers"),
                        ("--blocks x", "--blocks"), ("--blocks 99", "--blocks"), ("--blocks -1", "--blocks")):
        args = SEL.replace("--num 3", "") if extra.startswith(("--num", "--fraction")) else SEL
        cases.append(E("numbers", f"select-wild {extra}", f"{args} {extra}", flag))
    for extra, flag in (("--lr nan", "--lr"), ("--lr 0", "--lr"), ("--lr -1", "--lr"), ("--lr inf", "--lr"),
                        ("--seed -1", "--seed"), ("--seed 99999999999", "--seed"), ("--epochs 0", "--epochs"),
                        ("--epochs -1", "--epochs"), ("-b 0", "--batch-size"), ("-j -1", "--workers"),
                        ("--val-split 0", "--val-split"), ("--val-split 1", "--val-split"),
                        ("--val-split nan", "--val-split"), ("--flops-target 0", "--flops-target"),
                        ("--flops-target 1.5", "--flops-target"), ("--clip-grad -1", "--clip-grad"),
                        ("--clip-grad 0", "--clip-grad"), ("--clip-grad nan", "--clip-grad"),
                        ("--smoothing -0.1", "--smoothing"), ("--smoothing 1.5", "--smoothing"),
                        ("--steps-per-epoch 0", "--steps-per-epoch"), ("--steps-per-epoch -3", "--steps-per-epoch"),
                        ("--warmup-epochs -1", "--warmup-epochs"), ("--weight-decay -1", "--weight-decay"),
                        ("--weight-decay inf", "--weight-decay"), ("--set lr=abc", "lr"), ("--set lr=.nan", "lr"),
                        ("--set eval_batch_size=0", "eval_batch_size"), ("--set aug_scale=[0.9,0.1]", "aug_scale"),
                        ("--set aug_scale=5", "aug_scale"), ("--set no_such_key=1", "no_such_key"),
                        ("--set noequals", "--set"), ("--set checkpoint_steps=-1", "checkpoint_steps"),
                        ("--set warmup_lr=-1", "warmup_lr"), ("--set epochs=[1,2]", "epochs")):
        cases.append(E("numbers", f"distill {extra}", f"{DST} {extra}".replace("--epochs 1 ", "")
                       if extra.startswith("--epochs") else f"{DST} {extra}", flag))
    cases.append(E("numbers", "distill deit --set kd_weight=2", f"{DST} --recipe deit --set kd_weight=2", "kd_weight"))
    cases.append(E("numbers", "distill deit --set temperature=0", f"{DST} --recipe deit --set temperature=0",
                   "temperature"))
    return cases


def _edit_summary(value) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        write_images(case_dir / "victim", 2)
        path = case_dir / "out" / "selection.json"
        record = json.loads(path.read_text())
        record["class_dirs"] = value
        path.write_text(json.dumps(record))
    return setup


def _write_summary(text: str) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        (case_dir / "out" / "selection.json").write_text(text)
    return setup


def _edit_scores(path_value: str) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        scores = case_dir / "out" / "scores.csv"
        lines = scores.read_text().splitlines()
        first = lines[1].split(",")
        first[0] = path_value
        scores.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    return setup


def _own_pool(build: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        shutil.copytree(shared["pool"], case_dir / "pool")
        write_images(case_dir / "victim", 2)
        build(case_dir, shared)
    return setup


def _rows(n: int, out_dir: str = "out"):
    def check(case_dir: Path, out: str, err: str) -> str | None:
        rows = (case_dir / out_dir / "scores.csv").read_text().splitlines()[1:]
        return None if len(rows) == n else f"scores.csv has {len(rows)} rows, expected {n}"
    return check


def path_cases() -> list[Case]:
    cases = []
    for label, value in (("../victim", ["../victim"]), ("/abs victim", ["{case}/victim"]), ("..", [".."]),
                         (".", ["."]), ("string", "victim"), ("number", [7]), ("dict", {"a": 1}),
                         ("nested ../", ["a/../../victim"]), ("scores.csv", ["scores.csv"])):
        def setup(case_dir, shared, value=value):
            value = json.loads(json.dumps(value).replace("{case}", str(case_dir)))
            _edit_summary(value)(case_dir, shared)
        cases.append(E("paths", f"selection.json class_dirs {label}", SEL, "selection.json", pre=SEL.split(),
                       setup=setup))
    # An unreadable record cannot vouch for the class folders: the run refuses before any work.
    cases.append(E("paths", "selection.json not JSON", SEL, "selection.json", pre=SEL.split(),
                   setup=_write_summary("{not json")))
    cases.append(E("paths", "selection.json a list", SEL, "selection.json", pre=SEL.split(),
                   setup=_write_summary("[1, 2]")))
    for value in ("../victim/img000.png", "/etc/passwd", "a/../../victim/img000.png", ""):
        cases.append(E("paths", f"scores.csv path {value or 'empty'}", SEL, "scores.csv", pre=SEL.split(),
                       setup=lambda d, s, v=value: (write_images(d / "victim", 2), _edit_scores(v)(d, s))))

    def previous_dir_symlink(case_dir: Path, shared: dict) -> None:
        write_images(case_dir / "victim", 2)
        record = json.loads((case_dir / "out" / "selection.json").read_text())
        name = record["class_dirs"][0]
        shutil.rmtree(case_dir / "out" / name)
        (case_dir / "out" / name).symlink_to(case_dir / "victim")
    cases.append(E("paths", "previous class dir is a symlink to a victim", SEL, "symlink", pre=SEL.split(),
                   setup=previous_dir_symlink))

    def staging_symlink(case_dir: Path, shared: dict) -> None:
        write_images(case_dir / "victim", 2)
        (case_dir / "out").mkdir()
        (case_dir / "out" / ".selection.partial").symlink_to(case_dir / "victim")
    cases.append(OK("paths", "stale staging folder is a symlink to a victim", SEL, setup=staging_symlink))
    own = SEL.replace("{pool}", "{case}/pool")
    cases.append(OK("paths", "symlink loop in pool", own, check=_rows(10),
                    setup=_own_pool(lambda d, s: (d / "pool" / "a" / "loop").symlink_to(d / "pool"))))
    cases.append(OK("paths", "symlinks out of the pool", own, check=_rows(10),
                    setup=_own_pool(lambda d, s: ((d / "pool" / "out1").symlink_to(d / "victim"),
                                                  (d / "pool" / "b" / "x.png").symlink_to(d / "victim" / "img000.png")))))
    cases.append(OK("paths", "second name of a pool file", own, check=_rows(10),
                    setup=_own_pool(lambda d, s: (d / "pool" / "b" / "dup.png").symlink_to(d / "pool" / "a" / "img000.png"))))
    cases.append(E("paths", "--out equal to --pool", own.replace("{out}", "{case}/pool"), "--pool",
                   setup=_own_pool(lambda d, s: None)))
    cases.append(E("paths", "--out parent of --pool", own.replace("{out}", "{case}"), "--pool",
                   setup=_own_pool(lambda d, s: None)))
    cases.append(E("paths", "--out equal to --pool via ..", own.replace("{out}", "{case}/pool/a/.."), "--pool",
                   setup=_own_pool(lambda d, s: None)))
    inside = own.replace("{out}", "{case}/pool/sel2")
    cases.append(OK("paths", "earlier selection inside the pool is not scored", inside, check=_rows(10, "pool/sel2"),
                    pre=own.replace("{out}", "{case}/pool/sel1").split(), before=_own_pool(lambda d, s: None)))
    return cases


def _tar(members: list[tuple[str, bytes]]) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        with tarfile.open(case_dir / "d.tar", "w") as tar:
            for name, data in members:
                add_member(tar, name, data)
    return setup


def _img(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def _folder(build: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        build(case_dir / "d")
    return setup


def data_cases() -> list[Case]:
    good = [("cat/a.png", _img(0)), ("cat/b.png", _img(1)), ("dog/c.png", _img(2)), ("dog/d.png", _img(3))]
    ev = "evaluate {vit2} --data {case}/d.tar -j 0"
    evf = "evaluate {vit2} --data {case}/d -j 0"
    cases = [
        OK("data", "tar member ../../x/y.png", ev, contains("4 images, 1 unreadable"),
           setup=_tar(good + [("../../x/y.png", _img(4))])),
        OK("data", "tar member /abs/y.png", ev, contains("4 images, 1 unreadable"),
           setup=_tar(good + [("/abs/y.png", _img(4))])),
        OK("data", "tar member without class folder", ev, contains("4 images, 1 unreadable"),
           setup=_tar(good + [("root.png", _img(4))])),
        OK("data", "tar member cat/../../z.png", ev, contains("4 images, 1 unreadable"),
           setup=_tar(good + [("cat/../../z.png", _img(4))])),
        E("data", "tar with only unsafe members", ev, "d.tar", setup=_tar([("../x/a.png", _img(0)),
                                                                          ("/y/b.png", _img(1))])),
        OK("data", "tar with a bomb", ev, contains("4 images, 1 unreadable"),
           setup=_tar(good + [("dog/bomb.png", bomb_png())])),
        OK("data", "tar with a truncated png", ev, contains("4 images, 1 unreadable"),
           setup=_tar(good + [("dog/cut.png", _img(5)[:60])])),
        E("data", "tar that is garbage", ev, "d.tar", setup=lambda d, s: (d / "d.tar").write_bytes(b"x" * 3000)),
        E("data", "empty tar", ev, "d.tar", setup=_tar([])),
        OK("data", "folder with a bomb", evf, contains("4 images, 1 unreadable"),
           setup=_folder(lambda d: (write_images(d / "cat", 2), write_images(d / "dog", 2, seed=1),
                                    (d / "cat" / "bomb.png").write_bytes(bomb_png())))),
        OK("data", "folder with empty and text-as-png files", evf, contains("4 images, 2 unreadable"),
           setup=_folder(lambda d: (write_images(d / "cat", 2), write_images(d / "dog", 2, seed=1),
                                    (d / "cat" / "e.png").write_bytes(b""), (d / "dog" / "t.png").write_text("hi")))),
        OK("data", "first validation images unreadable (export sample)",
           "export {vit2} --data {case}/d -o {out}/m.onnx", contains("on 4 real images"),
           setup=_folder(lambda d: [(write_images(d / c, 2, seed=i), [(d / c / f"aa{j}.png").write_bytes(b"bad")
                                                                     for j in range(9)])
                                    for i, c in enumerate(("cat", "dog"))])),
        E("data", "validation set with one readable image (export)", "export {vit2} --data {case}/d -o {out}/m.onnx",
          "readable", setup=_folder(lambda d: (write_images(d / "cat", 1), (d / "dog").mkdir(),
                                               (d / "dog" / "x.png").write_bytes(b"bad")))),
        E("data", "data folder without images", evf, "d", setup=_folder(lambda d: ((d / "cat").mkdir(parents=True),
                                                                               (d / "cat" / "x.txt").write_text("x")))),
        E("data", "data is a text file", "evaluate {vit2} --data {a_file} -j 0", "a_file"),
        E("data", "data path missing", "evaluate {vit2} --data {case}/nope -j 0", "nope"),
        E("data", "val-data missing a training class", f"{DST} --val-data {{case}}/d",
          "class", setup=_folder(lambda d: write_images(d / "cat", 3))),
        E("data", "pool without images", SEL.replace("{pool}", "{case}/d"), "no images",
          setup=_folder(lambda d: (d.mkdir(), (d / "x.txt").write_text("x")))),
        OK("data", "pool with a bomb", SEL.replace("{pool}", "{case}/d") + " --mode list",
           contains("too large (decompression bomb)"),
           setup=_folder(lambda d: (write_images(d, 3), (d / "bomb.png").write_bytes(bomb_png())))),
        OK("data", "16-bit PNGs are scaled, not white", "inspect {vit2}", setup=lambda d, s: None,
           check=_check_16_bit),
    ]
    return cases


def _check_16_bit(case_dir: Path, out: str, err: str) -> str | None:
    from vitshrink.data.folders import ImageSplit, _open_reader

    values = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    (case_dir / "d" / "grey").mkdir(parents=True)
    Image.fromarray(values).save(case_dir / "d" / "grey" / "w.png")
    img, _ = ImageSplit(_open_reader(case_dir / "d"), img_mode="L")[0]
    got = np.asarray(img)
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return None if np.array_equal(got, expected) else f"16-bit image decoded as {got.min()}..{got.max()}"


def _onnx(build: str) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        import onnx
        from onnx import TensorProto, helper

        path = case_dir / "m.onnx"
        if build == "garbage":
            path.write_bytes(b"\x08\x07not protobuf" * 20)
            return
        if build == "empty":
            path.write_bytes(b"")
            return
        if build == "dir":
            path.mkdir()
            return
        elem, shape, nodes, inputs = TensorProto.FLOAT, [1, 3, 16, 16], None, None
        if build == "rank2":
            shape = [1, 10]
        elif build == "int64":
            elem = TensorProto.INT64
        elif build == "two_inputs":
            inputs = [helper.make_tensor_value_info("x", elem, shape), helper.make_tensor_value_info("z", elem, shape)]
            nodes = [helper.make_node("Add", ["x", "z"], ["y"])]
        elif build == "nan_output":
            zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
            nodes = [helper.make_node("Constant", [], ["c"], value=zero), helper.make_node("Div", ["x", "c"], ["y"])]
        graph = helper.make_graph(nodes or [helper.make_node("Identity", ["x"], ["y"])], "g",
                                  inputs or [helper.make_tensor_value_info("x", elem, shape)],
                                  [helper.make_tensor_value_info("y", elem, shape)])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return setup


def model_cases() -> list[Case]:
    cases = []
    for which in ("nan", "inf"):
        cases += [
            E("models", f"{which} weights: evaluate", f"evaluate {{{which}}} --data {{data}} -j 0", "fc1.weight"),
            E("models", f"{which} weights: export", f"export {{{which}}} -o {{out}}/m.onnx", "fc1.weight"),
            E("models", f"{which} weights: benchmark", f"benchmark {{{which}}} --min-time 0", "fc1.weight"),
            E("models", f"{which} weights: distill teacher", DST.replace("{vit2}", f"{{{which}}}"), "fc1.weight"),
            E("models", f"{which} weights: select-wild teacher", SEL.replace("{vit}", f"{{{which}}}"), "fc1.weight"),
        ]
    tiny_std = "--std 1e-39"
    cases += [
        E("models", "NaN logits (tiny std): evaluate", f"evaluate {{vit}} --data {{data}} -j 0 {tiny_std}", "NaN"),
        E("models", "NaN logits (tiny std): export", f"export {{vit}} -o {{out}}/m.onnx {tiny_std}", "NaN"),
        E("models", "NaN logits (tiny std): select-wild", f"{SEL} {tiny_std}", "NaN"),
    ]
    for build, needle in (("garbage", "not a valid ONNX"), ("empty", "ONNX"), ("dir", "ONNX"),
                          ("rank2", "image tensor"), ("int64", "image tensor"), ("two_inputs", "one image input"),
                          ("nan_output", "NaN")):
        cases.append(E("models", f"benchmark ONNX {build}", "benchmark {case}/m.onnx --min-time 0", needle,
                       setup=_onnx(build)))
    cases.append(E("models", "benchmark missing ONNX", "benchmark {case}/missing.onnx --min-time 0", "missing.onnx"))

    def write(name: str, data: bytes):
        return lambda d, s: (d / name).write_bytes(data)
    cases += [
        E("models", "safetensors of random bytes", "inspect {case}/x.safetensors", "x.safetensors",
          setup=write("x.safetensors", os.urandom(4000))),
        E("models", "truncated safetensors", "inspect {case}/x.safetensors", "x.safetensors",
          setup=lambda d, s: (d / "x.safetensors").write_bytes(Path(s["vit"]).read_bytes()[:3000])),
        E("models", ".pt that is text", "inspect {case}/x.pt --arch vit_tiny_patch16_224", "x.pt",
          setup=write("x.pt", b"hello")),
        E("models", "empty .pt", "inspect {case}/x.pt --arch vit_tiny_patch16_224", "x.pt", setup=write("x.pt", b"")),
        E("models", "unknown file type", "inspect {a_file}", "a_file"),
        E("models", "unknown timm name", "inspect vit_no_such_model_xyz", "vit_no_such_model_xyz"),
    ]
    return cases


def output_cases() -> list[Case]:
    cases = [
        E("outputs", "distill --out is a file", DST.replace("{out}", "{a_file}"), "--out"),
        E("outputs", "distill --out under a file", DST.replace("{out}", "{a_file}/sub"), "--out"),
        E("outputs", "select-wild --out is a file", SEL.replace("{out}", "{a_file}"), "--out"),
        E("outputs", "export -o is a directory", "export {vit} -o {case}", "--output"),
        E("outputs", "export -o under a file", "export {vit} -o {a_file}/m.onnx", "--output"),
        E("outputs", "inspect --json under a file", "inspect {vit} --json {a_file}/x.json", "--json"),
        E("outputs", "benchmark --json is a directory", "benchmark {vit} --min-time 0 --json {case}", "--json"),
        E("outputs", "export -o in /proc", "export {vit} -o /proc/vitshrink_x.onnx", "vitshrink_x.onnx"),
        E("outputs", "export hits a file-size limit", "export {vit} -o {out}/m.onnx", "m.onnx", limit_fsize=20_000),
        E("outputs", "select-wild hits a file-size limit", SEL.replace("--num 3", "--num 10"), None,
          limit_fsize=700),
    ]
    return cases


def _report(**edits) -> dict:
    model = {"top1": 0.9, "params": 1000, "gmacs": 0.01, "ort_p50_ms": {"1": 1.0, "32": 8.0}}
    report = {"recipe": "vanilla", "distill_seconds": 12.0, "teacher": dict(model),
              "student": {**model, "top1": 0.8, "params": 500, "ort_p50_ms": {"1": 0.6, "32": 4.0}},
              "ratios": {"ort_speedup": {"1": 1.6, "32": 2.0}}}
    for key, value in edits.items():
        target = report
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    return report


def _runs(*reports) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        for index, report in enumerate(reports):
            (case_dir / f"run{index}").mkdir()
            text = report if isinstance(report, str) else json.dumps(report)
            (case_dir / f"run{index}" / "report.json").write_text(text)
    return setup


def compare_cases() -> list[Case]:
    two = "compare {case}/run0 {case}/run1"
    good = _report()
    cases = [OK("compare", "two good runs", two, contains("3 models", "Pareto front"), setup=_runs(good, _report(**{"student.top1": 0.7})))]
    for label, edits, needle in (("top1 a string", {"student.top1": "abc"}, "top1"),
                                 ("top1 NaN", {"student.top1": float("nan")}, "top1"),
                                 ("top1 above 1", {"student.top1": 85.0}, "top1"),
                                 ("negative params", {"student.params": -5}, "params"),
                                 ("latency zero", {"student.ort_p50_ms": {"1": 0, "32": 4.0}}, "ort_p50_ms"),
                                 ("latency batch not a number", {"student.ort_p50_ms": {"x": 1.0}}, "ort_p50_ms"),
                                 ("teacher a list", {"teacher": [1, 2]}, "report.json"),
                                 ("speedup a string", {"ratios.ort_speedup": "fast"}, "report.json"),
                                 ("recipe a number", {"recipe": 7}, "recipe")):
        cases.append(E("compare", f"report.json {label}", two, needle, setup=_runs(good, _report(**edits))))
    cases += [
        E("compare", "report.json is a list", two, "report.json", setup=_runs(good, "[1, 2]")),
        E("compare", "report.json is not JSON", two, "report.json", setup=_runs(good, "{oops")),
        E("compare", "--batch 0", two + " --batch 0", "--batch", setup=_runs(good, good)),
        E("compare", "benchmark file =2", "compare {case}/b.json=2", "TOP1",
          setup=lambda d, s: (d / "b.json").write_text("{}")),
        E("compare", "benchmark file without model", "compare {case}/b.json", "b.json",
          setup=lambda d, s: (d / "b.json").write_text('{"model": 3}')),
        E("compare", "benchmark batches not a list", "compare {case}/b.json", "b.json",
          setup=lambda d, s: (d / "b.json").write_text(
              '{"model": {"runtimes": {"onnxruntime": {"batches": [1, 2]}}, "params": 5, "gmacs": 0.1}}')),
        E("compare", "--plot under a file", two + " --plot {a_file}/p.png", "--plot", setup=_runs(good, good)),
    ]
    return cases


def synthesize_cases() -> list[Case]:
    syn = "synthesize {vit2} --num 2 --out {out} --iterations 2 -b 2 --device cpu"

    def evil_names(case_dir: Path, shared: dict) -> None:
        import torch

        from vitshrink.io import create_model, save_model

        torch.manual_seed(0)
        model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                             num_classes=2)
        save_model(model, case_dir / "evil.safetensors", class_names=["../victim", "zz"])
        (case_dir / "victim").mkdir()

    cases = [E("synthesize", f"synthesize {extra}", f"{syn} {extra}", flag)
             for extra, flag in (("--num 0", "--num"), ("--iterations -1", "--iterations"), ("-b 0", "--batch-size"),
                                 ("--seed -1", "--seed"), ("--num-heads 0", "--num-heads"))]
    cases += [
        E("synthesize", "synthesize --out is a file", syn.replace("{out}", "{a_file}"), "--out"),
        E("synthesize", "synthesize NaN teacher", syn.replace("{vit2}", "{nan}"), "fc1.weight"),
        E("synthesize", "synthesize damaged synthesis.json", syn, "synthesis.json", pre=syn.split(),
          setup=lambda d, s: (d / "out" / "synthesis.json").write_text("{oops")),
        E("synthesize", "synthesize into a foreign folder", syn, "--out",
          setup=lambda d, s: ((d / "out").mkdir(), (d / "out" / "mine.txt").write_text("x"))),
        OK("synthesize", "synthesize with class names '../victim'", "synthesize {case}/evil.safetensors --num 2 "
           "--out {out} --iterations 2 -b 2 --device cpu", check=lambda d, o, e: None if not any(
               (d / "victim").iterdir()) else "wrote into the victim folder", setup=evil_names),
    ]
    return cases


def resume_cases() -> list[Case]:
    run = DST + " --checkpoint-steps 1"
    cases = [E("resume", f"--resume with {extra}", f"{run} --resume {extra}", needle, pre=run.split())
             for extra, needle in (("--seed 1", "seed"), ("-b 4", "batch_size"), ("--recipe ce", "recipe"))]
    cases.append(E("resume", "--resume with other --data", run.replace("{data}", "{case}/d") + " --resume", "data",
                   pre=run.split(), setup=lambda d, s: shutil.copytree(s["data"], d / "d")))
    for label, data in (("truncated", None), ("empty", b""), ("zip garbage", b"PK\x03\x04xx")):
        def damage(case_dir: Path, shared: dict, data=data) -> None:
            last = case_dir / "out" / "last.pt"
            last.write_bytes(data if data is not None else last.read_bytes()[:2000])
        cases.append(E("resume", f"--resume from a {label} last.pt", f"{run} --resume", "damaged", pre=run.split(),
                       setup=damage))
    cases.append(E("resume", "--resume without last.pt", f"{run} --resume", "not found"))
    cases.append(Case("NaN loss at the first step", "resume", f"{run} --std 1e-39".split(), "error", "first step"))
    return cases


# ------------------------------------------------------------------------------- issue 21 cases
def _forged(edit: Callable[[dict], None], name: str = "forged.safetensors", source: str = "vit"):
    """A copy of a shared model whose vitshrink record is edited by ``edit`` (the tensors unchanged)."""
    def setup(case_dir: Path, shared: dict) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(shared[source], framework="pt") as handle:
            raw = json.loads(handle.metadata()["vitshrink"])
        edit(raw)
        save_file(load_file(shared[source]), str(case_dir / name), metadata={"vitshrink": json.dumps(raw)})
    return setup


def _kw(**extra) -> Callable[[dict], None]:
    return lambda raw: raw["kwargs"].update(extra)


def _raw_record(text: str):
    def setup(case_dir: Path, shared: dict) -> None:
        from safetensors.torch import load_file, save_file

        save_file(load_file(shared["vit"]), str(case_dir / "forged.safetensors"), metadata={"vitshrink": text})
    return setup


def _hf_dir(config: dict | None = None, pre: dict | None = None, shard: str | None = None):
    """A one-layer Hugging Face ViT folder at CASE/hf (zeros), optionally with a shard index naming ``shard``."""
    def setup(case_dir: Path, shared: dict) -> None:
        from safetensors.torch import save_file

        folder = case_dir / "hf"
        folder.mkdir()
        base = {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "image_size": 16, "patch_size": 8, "intermediate_size": 32}
        (folder / "config.json").write_text(json.dumps({**base, **(config or {})}))
        if pre is not None:
            (folder / "preprocessor_config.json").write_text(json.dumps(pre))
        sys.path.insert(0, str(ROOT / "tests"))
        from hf_support import tiny_hf_vit_state

        state = tiny_hf_vit_state()
        if shard is None:
            save_file(state, str(folder / "model.safetensors"))
            return
        save_file(state, str(case_dir / "outside.safetensors"))
        (folder / "link.safetensors").symlink_to(case_dir / "outside.safetensors")
        target = shard.replace("{case}", str(case_dir))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": target}}))
    return setup


def _always_dog(case_dir: Path, shared: dict) -> None:
    """CASE/dog.safetensors predicts class 0 ("dog" in its record); CASE/d has cat 1, dog 3, fish 2 images."""
    import torch

    from vitshrink.io import create_model, save_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                         num_classes=3).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    save_model(model, case_dir / "dog.safetensors", class_names=["dog", "cat", "fish"])
    for name, n in (("cat", 1), ("dog", 3), ("fish", 2)):
        write_images(case_dir / "d" / name, n, seed=n)


def _qk_norm_teacher(case_dir: Path, shared: dict) -> None:
    import torch

    from vitshrink.io import create_model, save_model

    torch.manual_seed(0)
    save_model(create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                            num_classes=2, qk_norm=True).eval(), case_dir / "qk.safetensors", class_names=["cat", "dog"])


def _logit_cache(damage: Callable[[Path], None]):
    def setup(case_dir: Path, shared: dict) -> None:
        damage(case_dir / "cache")
    return setup


def _meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(cache: Path) -> None:
        meta = json.loads((cache / "meta.json").read_text())
        edit(meta)
        (cache / "meta.json").write_text(json.dumps(meta))
    return damage


def _last_pt(field_name: str, value) -> Callable[[Path, dict], None]:
    def setup(case_dir: Path, shared: dict) -> None:
        import torch

        state = torch.load(case_dir / "out" / "last.pt", weights_only=True)
        state[field_name] = value
        torch.save(state, case_dir / "out" / "last.pt")
    return setup


def _check_no_lock(case_dir: Path, out: str, err: str) -> str | None:
    return "lock file left behind" if (case_dir / "out" / ".vitshrink.lock").exists() else None


def record_cases() -> list[Case]:
    """A model file is data: no record field reaches the network, a file, or a hub id."""
    url = {"url": "http://127.0.0.1:9/w.pth"}
    forged = {
        "pretrained true": _kw(pretrained=True), "pretrained_cfg_overlay url": _kw(pretrained_cfg_overlay=url),
        "pretrained + url overlay": _kw(pretrained=True, pretrained_cfg_overlay=url),
        "overlay file": _kw(pretrained_cfg_overlay={"file": "/etc/passwd"}), "checkpoint_path": _kw(
            checkpoint_path="/etc/passwd"), "pretrained_cfg hub id": _kw(pretrained_cfg={"hf_hub_id": "timm/x"}),
        "cache_dir": _kw(cache_dir="/tmp"), "features_only": _kw(features_only=True),
        "scriptable": _kw(scriptable=True), "act_layer dotted": _kw(act_layer="torch.nn.Module"),
        "global_pool path": _kw(global_pool="../x"), "unknown key": _kw(evil=1),
        "model hf-hub:": lambda raw: raw.update(model="hf-hub:timm/vit_tiny_patch16_224"),
        "model hub path": lambda raw: raw.update(model="timm/vit_tiny_patch16_224"),
        "model ../x": lambda raw: raw.update(model="../x"),
        "kwargs img_size 100000": _kw(img_size=100000), "crop_pct 0.001": lambda raw: raw.update(crop_pct=0.001),
        "input_size 100000": lambda raw: raw.update(input_size=[3, 100000, 100000]),
    }
    cases = [E("records", f"record {label}", "inspect {case}/forged.safetensors", "forged.safetensors",
               setup=_forged(edit)) for label, edit in forged.items()]
    cases.append(E("records", "record nested 100000 deep", "inspect {case}/forged.safetensors", "forged.safetensors",
                   setup=_raw_record("[" * 100000 + "]" * 100000)))
    cases.append(E("records", "record a JSON list", "inspect {case}/forged.safetensors", "forged.safetensors",
                   setup=_raw_record("[1, 2]")))
    url_record = _forged(_kw(pretrained=True, pretrained_cfg_overlay=url))
    m = "{case}/forged.safetensors"
    for command, args in (("evaluate", f"evaluate {m} --data {{data}} -j 0"), ("export", f"export {m} -o {{out}}/m.onnx"),
                          ("benchmark", f"benchmark {m} --min-time 0"),
                          ("distill TEACHER", f"distill {m} --data {{data}} --out {{out}} --device cpu"),
                          ("select-wild", f"select-wild --teacher {m} --pool {{pool}} --num 2 --out {{out}}"),
                          ("synthesize", f"synthesize {m} --num 2 --out {{out}} --iterations 1"),
                          ("cache-logits", f"cache-logits {m} --epochs 1 --data {{data}} --out {{out}}"),
                          ("convert", f"convert {m} -o {{out}}/c.safetensors")):
        cases.append(E("records", f"{command} on a url record", args, "kwargs.pretrained", setup=url_record))
    two = "{case}/forged2.safetensors"
    cases.append(E("records", "distill --student url record", f"distill {{vit2}} --student {two} --data {{data}} "
                   "--out {out} --device cpu -b 4", "kwargs.pretrained",
                   setup=_forged(_kw(pretrained=True, pretrained_cfg_overlay=url), "forged2.safetensors", "vit2")))
    cases += [
        E("records", "timm name --pretrained, empty cache", "inspect vit_tiny_patch16_224 --pretrained",
          "does not download", env={"HF_HUB_OFFLINE": "0", "TORCH_HOME": "/nonexistent/torch"}),
        E("records", "--student spec pretrained=true", "distill {vit2} --student vit_tiny_patch16_224:pretrained=true "
          "--data {data} --out {out} --device cpu", "--student"),
        E("records", "--student spec checkpoint_path", "distill {vit2} --student "
          "vit_tiny_patch16_224:checkpoint_path=/etc/passwd --data {data} --out {out}", "--student"),
        E("records", "train-teacher hf-hub:", "train-teacher hf-hub:timm/resnet18.a1_in1k --data {data} --out {out}",
          "hf-hub:timm/resnet18.a1_in1k"),
        E("records", "train-teacher timm/ path", "train-teacher timm/resnet18 --data {data} --out {out}",
          "timm/resnet18"),
    ]
    for label, shard in (("../", "../outside.safetensors"), ("absolute", "{case}/outside.safetensors"),
                         ("symlink out", "link.safetensors"), ("a/../..", "a/../../outside.safetensors")):
        cases.append(E("records", f"HF shard index {label}", "inspect {case}/hf", "model.safetensors.index.json",
                       setup=_hf_dir(shard=shard)))
    return cases


def _copy_vit(name: str = "m.safetensors", folder: str = ""):
    def setup(case_dir: Path, shared: dict) -> None:
        (case_dir / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared["vit"], case_dir / folder / name)
        if folder:
            (case_dir / folder / "report.json").write_text(json.dumps(_report()))
    return setup


def _own_data(case_dir: Path, shared: dict) -> None:
    shutil.copytree(shared["data"], case_dir / "d")


def outputs21_cases() -> list[Case]:
    """Outputs never replace inputs; one run per folder."""
    m = "{case}/m.safetensors"
    cases = [
        E("outputs21", "inspect --json = SPEC", f"inspect {m} --json {m}", "--json", setup=_copy_vit()),
        E("outputs21", "export -o = SPEC", f"export {m} -o {m}", "--output", setup=_copy_vit()),
        E("outputs21", "benchmark --json = SPEC", f"benchmark {m} --json {m} --min-time 0", "--json",
          setup=_copy_vit()),
        E("outputs21", "benchmark --json = --baseline", f"benchmark {{vit}} --baseline {m} --json {m} --min-time 0",
          "--json", setup=_copy_vit()),
        E("outputs21", "convert -o = SPEC", f"convert {m} -o {m}", "--output", setup=_copy_vit()),
        E("outputs21", "export -o inside --data", "export {vit} --data {case}/d -o {case}/d/cat/m.onnx", "--output",
          setup=_own_data),
        E("outputs21", "compare --plot = a report.json", "compare {case}/run1 --plot {case}/run1/report.json",
          "--plot", setup=_copy_vit("student.safetensors", "run1")),
        E("outputs21", "distill TEACHER inside --out", "distill {case}/run1/student.safetensors --data {data} "
          "--out {case}/run1", "--out", setup=_copy_vit("student.safetensors", "run1")),
        E("outputs21", "distill --out = --data", "distill {vit2} --data {case}/d --out {case}/d", "--out",
          setup=_own_data),
        E("outputs21", "distill --out inside --data", "distill {vit2} --data {case}/d --out {case}/d/cat", "--out",
          setup=_own_data),
        E("outputs21", "distill --out holds --data", "distill {vit2} --data {case}/d --out {case}", "--out",
          setup=_own_data),
        E("outputs21", "distill --out = --config", "distill {vit2} --data {data} -c {case}/c.yaml --out {case}/c.yaml",
          "--out", setup=lambda d, s: (d / "c.yaml").write_text("lr: 0.001\n")),
        E("outputs21", "train-teacher --out = --data", "train-teacher cifar_resnet20 --data {case}/d --out {case}/d",
          "--out", setup=_own_data),
        E("outputs21", "synthesize --out holds TEACHER", f"synthesize {m} --num 2 --out {{case}}", "--out",
          setup=_copy_vit()),
        E("outputs21", "cache-logits --out = --data", "cache-logits {vit2} --epochs 1 --data {case}/d --out {case}/d",
          "--out", setup=_own_data),
        E("outputs21", "select-wild --out holds --teacher", "select-wild --teacher {case}/run1/student.safetensors "
          "--pool {pool} --num 2 --out {case}/run1", "--out", setup=_copy_vit("student.safetensors", "run1")),
        Case("distill --out ''", "outputs21", ["distill", "{vit2}", "--data", "{data}", "--out", ""], "error",
             "--out"),
        Case("inspect --json=", "outputs21", ["inspect", "{vit}", "--json="], "error", "--json"),
        E("outputs21", "run folder locked by a live run", "synthesize {vit2} --num 2 --out {out} --iterations 1 -b 2 "
          "--device cpu", "another vitshrink run",
          setup=lambda d, s: ((d / "out").mkdir(), (d / "out" / ".vitshrink.lock").write_text(f"{os.getpid()}\n"))),
        OK("outputs21", "stale lock of a dead run is taken over", "synthesize {vit2} --num 2 --out {out} "
           "--iterations 1 -b 2 --device cpu", check=_check_no_lock,
           setup=lambda d, s: ((d / "out").mkdir(), (d / "out" / ".vitshrink.lock").write_text("999999999\n"))),
        OK("outputs21", "damaged lock file is taken over", "synthesize {vit2} --num 2 --out {out} --iterations 1 "
           "-b 2 --device cpu", check=_check_no_lock,
           setup=lambda d, s: ((d / "out").mkdir(), (d / "out" / ".vitshrink.lock").write_text("garbage"))),
    ]
    return cases


def _yaml_bomb() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(9):
        prev, cur = chr(97 + i), chr(98 + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _strip(width: int, height: int, mode: str = "L"):
    def setup(case_dir: Path, shared: dict) -> None:
        shutil.copytree(shared["data"], case_dir / "d")
        Image.new(mode, (width, height)).save(case_dir / "d" / "cat" / "strip.png")
    return setup


def bounded_cases() -> list[Case]:
    dst = "distill {vit2} --data {data} --out {out} --device cpu"
    evd = "evaluate {vit2} --data {case}/d -j 0"
    return [
        E("bounded", "-c YAML alias bomb", dst + " -c {case}/bomb.yaml", "aliases",
          setup=lambda d, s: (d / "bomb.yaml").write_text(_yaml_bomb())),
        E("bounded", "-c YAML nested 5000 deep", dst + " -c {case}/bomb.yaml", "nested",
          setup=lambda d, s: (d / "bomb.yaml").write_text("lr: " + "[" * 5000 + "]" * 5000 + "\n")),
        E("bounded", "-c YAML of 2 MB", dst + " -c {case}/bomb.yaml", "bytes",
          setup=lambda d, s: (d / "bomb.yaml").write_text("# " + "x" * (2 << 20) + "\n")),
        Case("--set alias bomb", "bounded", dst.split() + ["--set", "lr=[&a [1, 1], " + ", ".join(["*a"] * 66) + "]"],
             "error", "aliases"),
        OK("bounded", "1 x 1,000,000 PNG", evd, contains("24 images, 1 unreadable"), setup=_strip(1_000_000, 1)),
        OK("bounded", "60,000 x 1 RGB PNG", evd, contains("24 images, 1 unreadable"), setup=_strip(1, 60_000, "RGB")),
        OK("bounded", "50:1 PNG is still read", evd, contains("25 images, 0 unreadable"), setup=_strip(800, 16)),
        E("bounded", "--img-size 8192", "inspect {vit} --img-size 8192", "--img-size"),
        E("bounded", "--img-size 4096 (262144 tokens)", "inspect {vit} --img-size 4096", "tokens"),
        E("bounded", "timm name --img-size 4000", "inspect vit_tiny_patch16_224 --img-size 4000", "tokens"),
        E("bounded", "train-teacher --img-size 100000", "train-teacher cifar_resnet20 --img-size 100000 --out {out}",
          "--img-size"),
        E("bounded", "--key-map (a+)+$", "inspect {vit} --key-map (a+)+$=x", "--key-map"),
        E("bounded", "--key-map backreference", "inspect {vit} --key-map (blocks)\\1=x", "--key-map"),
        E("bounded", "--key-map alternation in a repeat", "inspect {vit} --key-map (a|ab)*c=x", "--key-map"),
        E("bounded", "--key-map 5 quantifiers", "inspect {vit} --key-map a*b*c*d*e=x", "--key-map"),
        E("bounded", "--key-map 300 characters", "inspect {vit} --key-map " + "a" * 300 + "=x", "--key-map"),
        E("bounded", "HF crop 1 of 4000 px", "inspect {case}/hf", "crop_size.height", setup=_hf_dir(
            pre={"do_center_crop": True, "size": {"height": 4000}, "crop_size": {"height": 1}})),
    ]


def silent_cases() -> list[Case]:
    run = DST + " --checkpoint-steps 1"
    loop = _folder(lambda d: (shutil.copytree(Path(os.environ["SWEEP_SHARED"]) / "data", d),
                              (d / "cat" / "loop").symlink_to(d)))
    formats = _folder(lambda d: (shutil.copytree(Path(os.environ["SWEEP_SHARED"]) / "data", d),
                                 [Image.new("RGB", (16, 16)).save(d / "cat" / f"x{ext}")
                                  for ext in (".tif", ".gif", ".webp", ".bmp")]))
    return [
        OK("silent", "class folders in another order: matched by name", "evaluate {case}/dog.safetensors --data "
           "{case}/d -j 0", contains("top-1 0.5000"), setup=_always_dog),
        E("silent", "class names that do not match", "evaluate {case}/dog.safetensors --data {case}/d -j 0",
          "[cat, dog, horse]", setup=lambda d, s: (_always_dog(d, s), (d / "d" / "fish").rename(d / "d" / "horse"))),
        E("silent", "more data classes than the model", "evaluate {vit2} --data {case}/d -j 0", "3 classes",
          setup=lambda d, s: (_own_data(d, s), write_images(d / "d" / "fish", 2))),
        OK("silent", "symlink loop in --data", "evaluate {vit2} --data {case}/d -j 0",
           contains("24 images, 0 unreadable"), setup=loop),
        OK("silent", ".tif/.gif/.webp/.bmp are read", "evaluate {vit2} --data {case}/d -j 0",
           contains("28 images, 0 unreadable"), setup=formats),
        E("silent", "--set search_steps=-5", DST + " --recipe uvc --set search_steps=-5", "search_steps"),
        E("silent", "--search-steps 0", DST + " --recipe uvc --search-steps 0", "--search-steps"),
        E("silent", "--set gate_momentum=2", DST + " --recipe uvc --set gate_momentum=2", "gate_momentum"),
        E("silent", "--set synth_num=0", DST + " --set synth_num=0", "synth_num"),
        E("silent", "cache-logits --seed -1", "cache-logits {vit2} --epochs 1 --data {data} --out {out} --seed -1",
          "--seed"),
        E("silent", "select-wild --fraction 1e-9", SEL.replace("--num 3", "--fraction 1e-9"), "--fraction"),
        E("silent", "--resume with another --student", f"{run} --resume --student vit_tiny_patch16_224:img_size=16,"
          "patch_size=8,embed_dim=16,depth=1,num_heads=2,num_classes=2", "student", pre=run.split()),
        E("silent", "--resume with another --mean", f"{run} --resume --mean 0.1", "normalisation", pre=run.split()),
        OK("silent", "report says how the epoch was chosen", DST, contains("last epoch")),
    ]


def forged_cases() -> list[Case]:
    cache = "cache-logits {vit2} --epochs 1 --topk 2 --data {data} -b 8 --out {case}/cache --device cpu"
    use = DST + " --logit-cache {case}/cache"
    run = DST + " --checkpoint-steps 1"
    cases = []
    for label, damage, needle in (
            ("meta.json not JSON", lambda c: (c / "meta.json").write_text("{oops"), "meta.json"),
            ("meta.json nested", lambda c: (c / "meta.json").write_text("[" * 50000 + "]" * 50000), "meta.json"),
            ("meta topk 99", _meta(lambda m: m.update(topk=99)), "topk"),
            ("meta epochs a string", _meta(lambda m: m.update(epochs="1")), "epochs"),
            ("meta images 1e8", _meta(lambda m: m.update(images=10**8)), "values.f16"),
            ("meta fingerprint a list", _meta(lambda m: m.update(fingerprint=[1])), "fingerprint"),
            ("values.f16 truncated", lambda c: (c / "values.f16").write_bytes(b"12"), "values.f16"),
            ("lse.f32 missing", lambda c: (c / "lse.f32").unlink(), "lse.f32")):
        cases.append(E("forged", f"logit cache {label}", use, needle, pre=cache.split(),
                       setup=_logit_cache(damage)))
    cases.append(E("forged", "cache-logits resumes onto a forged meta.json", cache, "meta.json", pre=cache.split(),
                   setup=_logit_cache(lambda c: (c / "meta.json").write_text("[]"))))
    for label, field_name, value, needle in (("arch not JSON", "arch", "{oops", "arch"),
                                             ("arch asks for pretrained", "arch", json.dumps(
                                                 {"model": "vit_tiny_patch16_224", "kwargs": {"pretrained": True}}),
                                              "kwargs.pretrained"),
                                             ("weights of another model", "trainable", {}, "damaged")):
        cases.append(E("forged", f"last.pt {label}", f"{run} --resume", needle, pre=run.split(),
                       setup=_last_pt(field_name, value)))
    cases += [
        E("forged", "report.json nested 100000 deep", "compare {case}/run0", "report.json",
          setup=_runs("[" * 100000 + "]" * 100000)),
        E("forged", "synthesis.json nested", "synthesize {vit2} --num 2 --out {out} --iterations 1 -b 2 --device cpu",
          "synthesis.json", pre="synthesize {vit2} --num 2 --out {out} --iterations 1 -b 2 --device cpu".split(),
          setup=lambda d, s: (d / "out" / "synthesis.json").write_text("[" * 50000 + "]" * 50000)),
        E("forged", "HF config hidden_size a string", "inspect {case}/hf", "hidden_size",
          setup=_hf_dir({"hidden_size": "16"})),
        E("forged", "HF config hidden_act a list", "inspect {case}/hf", "hidden_act",
          setup=_hf_dir({"hidden_act": ["gelu"]})),
        E("forged", "HF config model_type a list", "inspect {case}/hf", "model_type",
          setup=_hf_dir({"model_type": ["vit"]})),
        E("forged", "HF preprocessor resample a list", "inspect {case}/hf", "image_mean",
          setup=_hf_dir(pre={"resample": [3], "image_mean": "x"})),
        E("forged", "HF config nested", "inspect {case}/hf", "config.json",
          setup=lambda d, s: (_hf_dir()(d, s), (d / "hf" / "config.json").write_text("[" * 50000 + "]" * 50000))),
        E("forged", "--set opt=nosuch", DST + " --set opt=nosuch", "opt"),
        E("forged", "--set sched=nosuch", DST + " --set sched=nosuch", "sched"),
        E("forged", "--set select_epoch=first", DST + " --set select_epoch=first", "select_epoch"),
    ]
    return cases


def early_cases() -> list[Case]:
    return [
        E("early", "--data-free batch above --synth-num", "distill {vit2} --data-free --synth-num 4 -b 8 --out {out} "
          "--device cpu --no-progress", "--synth-num"),
        E("early", "uvc on a qk-norm teacher", "distill {case}/qk.safetensors --recipe uvc --data {data} --out {out} "
          "--device cpu --no-progress", "qk_norm", setup=_qk_norm_teacher),
        E("early", "--dim-multiple makes the target unreachable", DST + " --recipe uvc --flops-target 0.05 "
          "--dim-multiple 16", "--dim-multiple"),
    ]


ISSUE21_CASES = record_cases() + outputs21_cases() + bounded_cases() + silent_cases() + forged_cases() + early_cases()


ALL_CASES = numeric_cases() + path_cases() + data_cases() + model_cases() + output_cases() + compare_cases() + synthesize_cases() + resume_cases() + ISSUE21_CASES


# ---------------------------------------------------------------------------------------------- run
@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_cli(args: list[str], cwd: Path, env: dict[str, str], limit: int | None, use_fork: bool = True) -> Finished:
    """``vitshrink ARGS`` in a child process: forked from this one (torch already imported: ~10x faster on a
    busy 2-core box) or, with ``use_fork=False``, a fresh interpreter. ``limit``: RLIMIT_FSIZE in bytes."""
    def limit_file_size() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    if not use_fork:
        run = subprocess.run([sys.executable, "-m", "vitshrink", *args], capture_output=True, text=True, timeout=600,
                             env=env, cwd=cwd, preexec_fn=limit_file_size if limit is not None else None)
        return Finished(run.returncode, run.stdout, run.stderr)
    out_path, err_path = cwd / ".sweep_stdout", cwd / ".sweep_stderr"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: become "vitshrink ARGS"
        code = 1
        try:
            os.chdir(cwd)
            os.environ.update(env)
            with open(out_path, "w") as out, open(err_path, "w") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
            if limit is not None:
                limit_file_size()
            _guard_sockets(cwd / ".connections")
            from vitshrink.cli import main as cli_main

            sys.argv = ["vitshrink", *args]
            try:
                cli_main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001  (what escapes main is exactly what a user would see)
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    out_path.unlink()
    err_path.unlink()
    return Finished(code, stdout, stderr)


def _guard_sockets(record: Path) -> None:
    """In the child: every outgoing connection attempt is written to ``record`` and fails (issue 21)."""
    import socket

    def refuse(*args, **kwargs):
        with open(record, "a") as handle:
            handle.write(f"{args[1:2] or args[:1]}\n")
        raise OSError("network disabled by the sweep")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse


def run_case(case: Case, work: Path, shared: dict, index: int) -> dict:
    case_dir = work / "cases" / f"{index:03d}"
    case_dir.mkdir(parents=True)
    values = {**shared, "case": str(case_dir), "out": str(case_dir / "out")}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200", **case.env}

    def cli(args: list[str], limit: int | None = None):
        return run_cli([a.format(**values) for a in args], case_dir, env, limit)

    problems: list[str] = []
    if case.before is not None:
        case.before(case_dir, shared)
    if case.pre:
        prep = cli(case.pre)
        if prep.returncode != 0:
            return {"case": case.name, "group": case.group, "ok": False, "rc": prep.returncode,
                    "problems": [f"preparation failed: {prep.stderr.strip()[-300:]}"], "stderr": prep.stderr[-500:]}
    if case.setup is not None:
        case.setup(case_dir, shared)
    guarded = {"shared": digest(Path(shared["shared"])), "victim": digest(case_dir / "victim")}
    start = time.perf_counter()
    run = cli(case.args, case.limit_fsize)
    seconds = time.perf_counter() - start
    err_lines = [line for line in run.stderr.splitlines() if line.strip()]
    if "Traceback" in run.stderr or "Traceback" in run.stdout:
        problems.append("traceback")
    if case.expect == "error":
        if run.returncode != 2:
            problems.append(f"exit {run.returncode}, expected 2")
        if len(err_lines) != 1 or not err_lines[0].startswith("error: "):
            problems.append(f"{len(err_lines)} stderr lines, expected one 'error:' line")
        elif case.needle and case.needle not in err_lines[0]:
            problems.append(f"message does not name {case.needle!r}")
    else:
        if run.returncode != 0:
            problems.append(f"exit {run.returncode}, expected 0")
        elif case.check is not None:
            try:
                problem = case.check(case_dir, run.stdout, run.stderr)
            except Exception as exc:  # noqa: BLE001  (a result the check cannot even read is a defect)
                problem = f"check failed: {type(exc).__name__}: {exc}"
            if problem:
                problems.append(problem)
    if (case_dir / ".connections").exists():
        problems.append("tried to open a network connection: " + (case_dir / ".connections").read_text()[:100])
    if digest(Path(shared["shared"])) != guarded["shared"]:
        problems.append("changed a shared input outside --out")
    if digest(case_dir / "victim") != guarded["victim"]:
        problems.append("changed the victim folder beside --out")
    message = next((line for line in err_lines if line.startswith("error: ")), err_lines[-1] if err_lines else "")
    return {"case": case.name, "group": case.group, "expect": case.expect, "ok": not problems, "rc": run.returncode,
            "seconds": round(seconds, 2), "problems": problems, "message": message[:300]}


def main() -> None:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--groups", help="comma-separated groups to run (default: all)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "adversarial_sweep.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout whose vitshrink is tried (default: this one), e.g. an older commit's")
    args = parser.parse_args()
    ROOT = args.root.resolve()
    sys.path.insert(0, str(ROOT))
    import torch

    import importlib

    # Imported once here; each case runs in a fork of this process.
    for module in ("vitshrink.cli", "vitshrink.io", "vitshrink.data.wild", "vitshrink.measure"):
        importlib.import_module(module)

    torch.set_num_threads(1)
    cases = [c for c in ALL_CASES if (not args.only or args.only in c.name)
             and (not args.groups or c.group in args.groups.split(","))]
    work = Path(tempfile.mkdtemp(prefix="vitshrink-sweep-"))
    started = time.time()
    try:
        shared = make_shared(work)
        os.environ["SWEEP_SHARED"] = shared["shared"]
        results = []
        for index, case in enumerate(cases):
            result = run_case(case, work, shared, index)
            results.append(result)
            mark = "OK " if result["ok"] else "DEFECT"
            print(f"{index + 1:3d}/{len(cases)} {mark:6s} [{case.group}] {case.name}: "
                  f"{'; '.join(result['problems']) or result.get('message', '')[:120]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    defects = [r for r in results if not r["ok"]]
    groups = sorted({r["group"] for r in results})
    print(f"\n{'group':10s} {'tried':>6s} {'OK':>6s} {'defects':>8s}")
    for group in groups:
        rows = [r for r in results if r["group"] == group]
        print(f"{group:10s} {len(rows):6d} {sum(r['ok'] for r in rows):6d} {sum(not r['ok'] for r in rows):8d}")
    print(f"{'total':10s} {len(results):6d} {len(results) - len(defects):6d} {len(defects):8d}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "machine": f"{os.cpu_count()}-core CPU",
        "command": "nice -n 5 python benchmarks/adversarial_sweep.py", "root": str(ROOT), "tried": len(results),
        "ok": len(results) - len(defects), "defects": len(defects), "seconds": round(time.time() - started, 1),
        "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
