"""What a run may touch: no network ever, outputs apart from inputs, one run per output folder.

* ``go_offline()`` (called when ``vitshrink`` is imported) switches the Hugging Face libraries to their
  local cache; ``no_downloads()`` also stops torch.hub, which has no offline switch of its own, while timm
  builds a pretrained model. A model file is data: nothing in it can make vitshrink open a connection.
* ``check_outputs_apart(...)``: one check for every command; an output that is an input, holds one, or lies in
  an input folder (the data) is refused in one line before any work.
* ``run_lock(folder)``: a run takes its output folder with a lock file holding its pid; a second run on the
  folder is refused while the first lives, and a lock left by a dead process is taken over.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Mapping

from vitshrink.errors import UserError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
LOCK_NAME = ".vitshrink.lock"

PathLike = str | os.PathLike


def go_offline() -> None:
    """Point every Hugging Face library at its local cache only (also when one was imported before us)."""
    os.environ.update(OFFLINE_ENV)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported before vitshrink: it read the environment already
        constants.HF_HUB_OFFLINE = True


class DownloadRefused(OSError):
    """Raised in place of a download: vitshrink reads local files only."""


def _refuse_download(url: str, *args: object, **kwargs: object) -> None:
    raise DownloadRefused(f"vitshrink does not download ({url})")


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """While building a timm model: hub downloads fail at once (a cached file is still read)."""
    go_offline()
    import torch.hub

    targets = [torch.hub]
    hub = sys.modules.get("timm.models._hub")
    if hub is not None and hasattr(hub, "download_url_to_file"):
        targets.append(hub)  # imported the function by name
    saved = [(module, module.download_url_to_file) for module in targets]
    for module in targets:
        module.download_url_to_file = _refuse_download
    try:
        yield
    finally:
        for module, original in saved:
            module.download_url_to_file = original


# ------------------------------------------------------------------------------- outputs vs inputs
def _real(path: PathLike) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def input_paths(*specs: PathLike | None) -> list[str]:
    """The SPECs that are paths on disk (a timm model name is not)."""
    return [str(s) for s in specs if s is not None and str(s) and os.path.exists(os.path.expanduser(str(s)))]


def check_outputs_apart(*, out_dirs: Mapping[str, PathLike | None] = {}, out_files: Mapping[str, PathLike | None] = {},
                        inputs: Mapping[str, PathLike | None] = {}) -> None:
    """Refuse, in one line, an output that would replace or change an input.

    ``out_dirs``/``out_files``: flag -> output folder / file (None: not given). ``inputs``: flag -> a file or a
    folder the command reads (a folder counts whole: nothing may be written inside it). Refused: an empty path;
    an output file that is an input file or lies in an input folder; an output folder that is, holds, or lies in
    an input.
    """
    for flag, path in [*out_dirs.items(), *out_files.items()]:
        if path is not None and not str(path).strip():
            raise UserError(f"{flag}: empty path (give a folder or file name)")
    read = [(flag, _real(path), os.path.isdir(_real(path))) for flag, path in inputs.items()
            if path is not None and str(path) and os.path.exists(os.path.expanduser(str(path)))]
    for flag, path in out_files.items():
        if path is None:
            continue
        target = _real(path)
        for in_flag, source, is_dir in read:
            if target == source or (is_dir and _within(target, source)):
                where = "is" if target == source else "is inside"
                raise UserError(f"{flag} {path}: {where} the input {in_flag} {source}; choose another output file")
    for flag, path in out_dirs.items():
        if path is None:
            continue
        target = _real(path)
        for in_flag, source, is_dir in read:
            if _within(source, target):
                raise UserError(f"{flag} {path}: holds the input {in_flag} {source}, which the run could "
                                f"replace; choose another output folder")
            if is_dir and _within(target, source):
                raise UserError(f"{flag} {path}: is inside the input {in_flag} {source}, which the run would "
                                f"change; choose another output folder")


def check_no_empty_arguments(argv: list[str]) -> None:
    """An empty command-line value (``--out ""``) is refused: as a path it would mean the working directory."""
    for index, item in enumerate(argv):
        flag, sep, value = item.partition("=")
        if item.startswith("--") and sep and not value:
            raise UserError(f"{flag}: empty value")
        if not item.strip():
            before = argv[index - 1] if index and argv[index - 1].startswith("-") else "an argument"
            raise UserError(f"{before}: empty value (give a path or value)")


# ----------------------------------------------------------------------------------------- run lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # unreadable or half-written: a run that died while taking it


@contextlib.contextmanager
def run_lock(folder: PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold ``folder/.vitshrink.lock`` (our pid) for the block; refused while another live run holds it."""
    from vitshrink.validate import check_output_dir

    created = not Path(folder).exists()
    folder = check_output_dir(folder, flag)  # made if missing; a file or a read-only folder: one line
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield folder / LOCK_NAME  # under torchrun the run is rank 0's: the other ranks share its lock
        return
    lock = folder / LOCK_NAME
    mine = f"{os.getpid()}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None and holder != os.getpid() and _alive(holder):
                raise UserError(f"{flag} {folder}: another vitshrink run (pid {holder}) is using this folder; "
                                f"wait for it or choose another folder (its lock: {lock})") from None
            lock.unlink(missing_ok=True)  # a dead run's lock (or our own): take it over
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        break
    else:
        raise UserError(f"{flag} {folder}: cannot take the lock {lock}")
    try:
        yield lock
    finally:
        if _holder(lock) == os.getpid():
            lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a run refused before writing anything leaves no empty folder behind
