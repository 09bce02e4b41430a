"""Decoding one image safely: every failure becomes a reason to skip it, never an exception or a wrong picture.

Shared by the labelled loaders (folders.py) and select-wild (wild.py), so that the same files are skipped and
counted everywhere: unreadable or truncated data, decompression bombs (more pixels than PIL's
``Image.MAX_IMAGE_PIXELS``, checked from the header before any pixel is decoded), images more elongated than
``MAX_ASPECT``:1 (also from the header: resizing them costs like a bomb), and tar members whose
names would leave the archive's folder tree.
"""
from __future__ import annotations

import os
import warnings
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

# Every extension a loader reads (PIL decodes them all); timm's folder reader alone takes only png/jpg/jpeg.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
TOO_LARGE = "too large (decompression bomb)"
# A 1 x 1,000,000 strip passes the pixel count but resizing its short side to the input size costs gigabytes.
MAX_ASPECT = 50
TOO_ELONGATED = f"too elongated (more than {MAX_ASPECT}:1)"
# 16-bit greyscale modes: PIL's convert() clips them to 0..255, which turns most photos pure white.
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` ('RGB' or 'L'), with 16-bit (and 32-bit integer) images scaled to 8 bits."""
    if img.mode in _WIDE_MODES:
        values = np.asarray(img, dtype=np.float64)
        # "I" can hold 8-bit data too (some PNG/TIFF writers): scale only what exceeds 8 bits.
        top = 65535.0 if img.mode != "I" or values.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return img.convert(mode)


def decode_image(source: str | os.PathLike | IO[bytes], mode: str) -> tuple[Image.Image | None, str]:
    """Decode an image fully in ``mode``; on failure return ``(None, reason)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and img.width * img.height > limit:
                    return None, TOO_LARGE
                if max(img.size) > MAX_ASPECT * max(1, min(img.size)):
                    return None, TOO_ELONGATED
                img.load()  # decodes every pixel, so truncated data fails here
                return to_mode(img, mode), ""
    except UnidentifiedImageError:
        return None, "not an image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, TOO_LARGE
    except OSError as exc:
        return None, "truncated" if "truncated" in str(exc).lower() else "corrupt"
    except Exception:  # noqa: BLE001  (a crafted file can make any decoder raise anything: skip it)
        return None, "corrupt"


def safe_member_name(name: str) -> bool:
    """True for a tar member name that stays inside the archive's tree: relative, no '..', a class folder."""
    if not name or "\x00" in name or name.startswith(("/", "\\")) or os.path.isabs(name):
        return False
    parts = name.replace("\\", "/").split("/")
    if any(part == ".." for part in parts):
        return False
    return len([p for p in parts if p not in ("", ".")]) >= 2  # <class>/<image>: a label is needed
