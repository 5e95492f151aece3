"""A folder of finished pages: an image file read through a model's image preprocessing once, then read back.

The EIANet clean-up (binarise, median filter, connected components, opening at ``work_scale`` times the page's
resolution) costs far more than reading its result; an image model trained for 30 epochs would pay it 30 times.
:class:`PageCache` stores each page the first time a chain makes it and reads it back in later epochs and runs.

A page is found by the sha256 of its key, which holds everything the page depends on, so a stale page is never read:

- the image file: resolved path, size, ``mtime_ns`` and ``ctime_ns`` (an edit changes the mtime; an mtime set back
  by ``touch -d``/``cp -p``/``tar`` changes the ctime, which no user can set). Hashing the file instead would read every
  image in every epoch for nothing: a file's content cannot change without its ctime changing;
- the page size and the chain's full ``config()``;
- the code that makes pages: the sha256 of the chain's module and of :mod:`ecgfm.image_preprocessing` (decoding and
  fitting), and the numpy, scipy and Pillow versions; an edit or an upgrade starts afresh;
- :data:`FORMAT`, the version of the file layout.

The key is also stored in the file and compared on reading. Pages are stored exactly (a page read back is bit for bit
the page the chain returned): the distinct float32 values of a page as a palette and a ``uint8``/``uint16`` index into
it (a chain's pages hold few values: ``k / work_scale**2`` after the clean-up, ``k / 255`` without it), one channel
when the three are equal (gray chains), compressed (``.npz``); a page of more than 65,536 values is stored as it is.
Files are written atomically (:mod:`ecgfm.io`), so workers or ranks writing the same page at once leave one complete
file; an unreadable or mismatched file is recomputed and rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm.image_preprocessing import read_page
from ecgfm.io import atomic_write, atomic_write_bytes

__all__ = ["FORMAT", "PageCache", "PageCacheError", "decode_page", "encode_page"]

#: Version of the cache's file layout and key; a change makes every earlier file unreachable (never misread).
FORMAT = 1


class PageCacheError(OSError):
    """A page cache folder that cannot be written; the message names it (and ``filename`` is the folder)."""

    def __init__(self, message: str, folder: str | os.PathLike):
        super().__init__(message)
        self.filename = str(folder)

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):  # to and from a worker or rank: OSError's own reduce would pass (errno, strerror, filename)
        return type(self), (self.args[0], self.filename)


def encode_page(page: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays that store ``[C, H, W]`` float32 ``page`` bit for bit: ``palette`` (the distinct float32 bit
    patterns) and ``index`` into it, one channel when all are equal; or ``bits`` when there are too many values."""
    if page.dtype != np.float32 or page.ndim != 3:
        raise ValueError(f"a page is [C, H, W] float32, got {page.dtype} {page.shape}")
    bits = np.ascontiguousarray(page).view(np.uint32)  # bit patterns: -0.0 and NaNs kept as they are
    if all(np.array_equal(bits[0], channel) for channel in bits[1:]):
        bits = bits[:1]
    channels = np.array(page.shape[0], np.int64)
    palette, index = np.unique(bits.ravel(), return_inverse=True)
    if palette.size > 1 << 16:
        return {"bits": bits, "channels": channels}
    dtype = np.uint8 if palette.size <= 1 << 8 else np.uint16
    return {"palette": palette, "index": index.astype(dtype).reshape(bits.shape), "channels": channels}


def decode_page(arrays: Any) -> np.ndarray:
    """The float32 page :func:`encode_page` stored; ValueError when the arrays are not such a page."""
    if "bits" in arrays:
        bits = arrays["bits"]
    else:
        palette, index = arrays["palette"], arrays["index"]
        if palette.dtype != np.uint32 or index.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"palette {palette.dtype} / index {index.dtype}")
        bits = palette[index]  # an index beyond the palette raises IndexError
    channels = int(arrays["channels"])
    if bits.dtype != np.uint32 or bits.ndim != 3 or bits.shape[0] not in (1, channels):
        raise ValueError(f"stored page {bits.dtype} {bits.shape} for {channels} channels")
    page = bits if bits.shape[0] == channels else np.repeat(bits, channels, axis=0)
    return np.ascontiguousarray(page).view(np.float32)


@functools.cache
def _code_fingerprint(module: str) -> str:
    """sha256 of the sources that make pages with a chain of ``module``, and of the libraries' versions."""
    import PIL
    import scipy

    digest = hashlib.sha256()
    for name in sorted({module, "ecgfm.image_preprocessing"}):
        source = getattr(sys.modules.get(name), "__file__", None)
        digest.update(name.encode() + b"\0")
        digest.update(Path(source).read_bytes() if source and Path(source).is_file() else b"no source")
    digest.update(f"numpy {np.__version__} scipy {scipy.__version__} Pillow {PIL.__version__}".encode())
    return digest.hexdigest()


class PageCache:
    """Pages of image files through a chain, stored in ``folder`` as ``<2 hex>/<sha256 of the key>.npz``.

    :meth:`read` is :func:`ecgfm.image_preprocessing.read_page` with a memory: the first read of a file at a size
    through a chain computes the page and stores it, later reads (other epochs, workers, ranks and runs) load it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._write_failed = False

    def check_writable(self) -> None:
        """Create the folder and write and remove a file in it; a :class:`PageCacheError` naming it if that fails."""
        probe = self.folder / f".write-test-{secrets.token_hex(8)}"  # ranks on several machines check at once
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(probe, b"")
            probe.unlink()
        except OSError as err:
            raise PageCacheError(
                f"page cache folder {self.folder} cannot be written ({err.strerror or err}); give data.cache_dir a "
                "folder this user can write, or leave it unset to clean every image in every epoch",
                self.folder,
            ) from err

    def key(self, path: str | os.PathLike, size: tuple[int, int], preprocessing: Any) -> str:
        """The JSON of everything the page of ``path`` at ``size`` through ``preprocessing`` depends on."""
        config = getattr(preprocessing, "config", None)
        if config is None:
            raise TypeError(f"{type(preprocessing).__name__} has no config(): its pages cannot be cached by it")
        resolved = Path(path).resolve()
        stat = resolved.stat()
        return json.dumps(
            {
                "format": FORMAT,
                "file": [str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns],
                "page_size": [int(n) for n in size],
                "preprocessing": config(),
                "code": _code_fingerprint(type(preprocessing).__module__),
            },
            sort_keys=True,
        )

    def path_of(self, key: str) -> Path:
        """Where the page of ``key`` is stored."""
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.npz"

    def load(self, key: str, size: tuple[int, int]) -> np.ndarray | None:
        """The stored page of ``key``; None when there is none or the file is unreadable or not this key's page."""
        try:
            with np.load(self.path_of(key), allow_pickle=False) as arrays:
                if str(arrays["key"]) != key:
                    return None
                page = decode_page(arrays)
        except Exception:  # none yet, or a torn, truncated or foreign file (zip, zlib, npy, key, index): recompute
            return None
        return page if page.shape == (3, *size) else None

    def store(self, key: str, page: np.ndarray) -> None:
        """Write ``page`` under ``key`` atomically; a full or vanished disk warns once and training goes on."""
        try:
            with atomic_write(self.path_of(key)) as f:
                np.savez_compressed(f, key=np.array(key), **encode_page(page))
        except OSError as err:
            if not self._write_failed:
                self._write_failed = True
                warnings.warn(f"page cache {self.folder}: cannot store pages ({err}); computing them", stacklevel=2)

    def read(self, path: str | os.PathLike, size: tuple[int, int], preprocessing: Any) -> np.ndarray:
        """``read_page(path, size, preprocessing)``, from the cache when it holds the page, else computed and kept."""
        try:
            key = self.key(path, size, preprocessing)
        except FileNotFoundError:
            return read_page(path, size, preprocessing)  # its error names the image
        page = self.load(key, size)
        if page is None:
            page = read_page(path, size, preprocessing)
            self.store(key, page)
        return page
