"""Carry CIFAR-10 to a GPU machine inside the 64 MiB a device run may take, byte for byte.

Every CIFAR-10 JPEG in ``../shared/data/cifar10`` starts with the same 623 bytes (quantisation and Huffman
tables, frame and scan headers), so ``pack`` stores that common prefix once and each file's remainder
(about 300 bytes): the full train.tar + test.tar fit in ~18 MB instead of 92 MB. ``unpack`` rebuilds tars whose
members have the original names and exactly the original bytes (checked against each member's SHA-256).

    python benchmarks/device_data.py pack      # here: writes .device_data/cifar10_{train,test}.npz (git-ignored)
    python benchmarks/device_data.py unpack    # there: writes /tmp/vitshrink_data/{train,test}.tar
"""
from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CARRY = ROOT / ".device_data"
SPLITS = ("train", "test")


def _scan_header_end(data: bytes) -> int:
    sos = data.find(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def pack(split: str) -> Path:
    names, bodies, whole = [], [], []
    prefix: bytes | None = None
    with tarfile.open(SHARED / "cifar10" / f"{split}.tar") as tar:
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            end = _scan_header_end(data)
            prefix = prefix if prefix is not None else data[:end]
            same = data[:end] == prefix
            names.append(member.name)
            bodies.append(data[end:] if same else data)
            whole.append(not same)
    lengths = np.array([len(b) for b in bodies], dtype=np.int32)
    digest = hashlib.sha256(b"".join(hashlib.sha256(prefix + b if not w else b).digest()
                                     for b, w in zip(bodies, whole))).hexdigest()
    CARRY.mkdir(exist_ok=True)
    path = CARRY / f"cifar10_{split}.npz"
    np.savez(path, prefix=np.frombuffer(prefix, dtype=np.uint8), names=np.array(names), lengths=lengths,
             whole=np.array(whole), blob=np.frombuffer(b"".join(bodies), dtype=np.uint8), digest=np.array(digest))
    print(f"{split}: {len(names)} files, {sum(whole)} stored whole, {path.stat().st_size / 1e6:.1f} MB -> {path}")
    return path


def unpack(split: str, out_dir: Path) -> Path:
    packed = np.load(CARRY / f"cifar10_{split}.npz")
    prefix, blob = packed["prefix"].tobytes(), packed["blob"].tobytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{split}.tar"
    tmp = target.with_suffix(".tar.tmp")
    offset, hashes = 0, []
    with tarfile.open(tmp, "w") as tar:
        for name, length, whole in zip(packed["names"], packed["lengths"], packed["whole"]):
            body = blob[offset:offset + int(length)]
            offset += int(length)
            data = body if whole else prefix + body
            hashes.append(hashlib.sha256(data).digest())
            info = tarfile.TarInfo(str(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if hashlib.sha256(b"".join(hashes)).hexdigest() != str(packed["digest"]):
        raise SystemExit(f"{split}: unpacked bytes differ from the packed digest")
    shutil.move(tmp, target)
    print(f"{split}: {len(hashes)} files -> {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/vitshrink_data"), help="unpack: folder for the tars")
    args = parser.parse_args()
    for split in SPLITS:
        pack(split) if args.action == "pack" else unpack(split, args.out)
    if args.action == "pack":
        for name in ("cifar10_resnet56_akamaster.th",):
            shutil.copy(SHARED / "checkpoints" / name, CARRY / name)
    sys.exit(0)


if __name__ == "__main__":
    main()
