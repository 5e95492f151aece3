"""Image files of printed or scanned ECGs -> the page an image backbone reads: ``[3, H, W]`` float32 in [0, 1].

Each chain is one registered class (``IMAGE_PREPROCESSING``), named with every parameter in the model's config, so a
model trained on cleaned scans is only ever fed cleaned scans. Runs with numpy, scipy and Pillow where images are
decoded (the data loader's workers, ``ecgfm predict``), not on the device: connected components have no tensor op.

- ``none``: fit the image into the page (aspect kept, white padding), as is.
- ``eianet_cleanup``: the clean-up of EIANet's scans: grayscale, binarise (Otsu or a fixed threshold; the pink grid
  and the paper are lighter than the trace), denoise (median filter), remove small connected components (specks,
  grid crossings, text fragments), morphological opening; then black ink on white at the page's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from ecgfm.registry import IMAGE_PREPROCESSING

__all__ = ["IMAGE_SUFFIXES", "EIANetCleanup", "NoImagePreprocessing", "fit_page", "otsu_threshold", "read_image"]

#: Files read as ECG images (``ecgfm predict`` and the image data module).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageFileError(ValueError):
    """An image file that cannot be read as an ECG page; the message names the file."""


def read_image(path: str | Path) -> Image.Image:
    """The file as an RGB Pillow image, or one line naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # Pillow raises SyntaxError for some bad PNGs
        raise ImageFileError(
            f"image {path} cannot be read: {' '.join(str(err).split()) or type(err).__name__}"
        ) from None


def fit_page(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Scale the image into ``size = (H, W)`` keeping its aspect (area-averaging when shrinking), centred on white:
    ``[H, W, 3]`` float32 in [0, 1]. A scan is never stretched, so a millimetre stays as wide as it is tall."""
    height, width = size
    scale = min(height / image.height, width / image.width)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = np.asarray(image.resize(new, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC))
    page = np.ones((height, width, 3), np.float32)
    top, left = (height - new[1]) // 2, (width - new[0]) // 2
    page[top : top + new[1], left : left + new[0]] = resized.astype(np.float32) / 255.0
    return page


def grayscale(page: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an ``[H, W, 3]`` page in [0, 1]."""
    return page @ np.array([0.299, 0.587, 0.114], np.float32)


def otsu_threshold(gray: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance of the histogram."""
    hist, edges = np.histogram(gray, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


@IMAGE_PREPROCESSING.register("none")
class NoImagePreprocessing:
    """The image fitted into the page as it is (grid, colour and all): for models trained on such pages."""

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        return np.ascontiguousarray(fit_page(image, size).transpose(2, 0, 1))

    def config(self) -> dict[str, Any]:
        return {"name": "none"}


@IMAGE_PREPROCESSING.register("eianet_cleanup")
class EIANetCleanup:
    """EIANet's scan clean-up: binarise, denoise, remove small components, open; black trace on white paper.

    The steps run at ``work_scale`` times the page's resolution (traces a few pixels wide, so that opening and the
    component filter keep them), then the binary ink is area-averaged down to the page (anti-aliased edges).

    Args:
        threshold: ``"otsu"`` (per image) or a luma in (0, 1): darker pixels are ink.
        median_px: side of the median filter on the binary ink (odd; 1 = none): removes salt-and-pepper noise.
        min_component_px: 8-connected ink components with fewer pixels (at the working resolution) are removed.
        opening_px: side of the square structuring element of the morphological opening (1 = none).
        work_scale: working resolution as a multiple of the page's (an integer).
    """

    def __init__(
        self,
        threshold: float | str = "otsu",
        median_px: int = 3,
        min_component_px: int = 30,
        opening_px: int = 2,
        work_scale: int = 4,
    ) -> None:
        if threshold != "otsu" and not (isinstance(threshold, int | float) and 0 < float(threshold) < 1):
            raise ValueError(f"eianet_cleanup: threshold must be 'otsu' or a number in (0, 1), got {threshold!r}")
        if median_px < 1 or median_px % 2 == 0:
            raise ValueError(f"eianet_cleanup: median_px must be an odd number >= 1, got {median_px}")
        if min_component_px < 0 or opening_px < 1 or work_scale < 1:
            raise ValueError(
                "eianet_cleanup: min_component_px must be >= 0, opening_px and work_scale >= 1, got "
                f"{min_component_px}, {opening_px}, {work_scale}"
            )
        self.threshold = threshold if threshold == "otsu" else float(threshold)
        self.median_px = int(median_px)
        self.min_component_px = int(min_component_px)
        self.opening_px = int(opening_px)
        self.work_scale = int(work_scale)

    def ink(self, gray: np.ndarray) -> np.ndarray:
        """Luma ``[h, w]`` -> cleaned binary ink (True = trace), at the luma's resolution."""
        cut = otsu_threshold(gray) if self.threshold == "otsu" else self.threshold
        ink = gray < cut
        if self.median_px > 1:
            ink = ndimage.median_filter(ink.astype(np.uint8), size=self.median_px).astype(bool)
        if self.min_component_px > 0 and ink.any():
            labels, n = ndimage.label(ink, structure=np.ones((3, 3), bool))
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            keep = sizes >= self.min_component_px
            keep[0] = False
            ink = keep[labels]
        if self.opening_px > 1:
            ink = ndimage.binary_opening(ink, structure=np.ones((self.opening_px, self.opening_px), bool))
        return ink

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        height, width = size
        s = self.work_scale
        ink = self.ink(grayscale(fit_page(image, (height * s, width * s))))
        coverage = ink.reshape(height, s, width, s).mean(axis=(1, 3), dtype=np.float32)
        page = 1.0 - coverage
        return np.ascontiguousarray(np.broadcast_to(page, (3, height, width)))

    def config(self) -> dict[str, Any]:
        return {
            "name": "eianet_cleanup",
            "threshold": self.threshold,
            "median_px": self.median_px,
            "min_component_px": self.min_component_px,
            "opening_px": self.opening_px,
            "work_scale": self.work_scale,
        }


def create_image_preprocessing(spec: str | dict[str, Any] | None) -> NoImagePreprocessing | EIANetCleanup:
    """A chain from its name or ``{name: ..., **options}`` (None = ``none``)."""
    return IMAGE_PREPROCESSING.create(spec or "none")


def read_page(path: str | Path, size: tuple[int, int], preprocessing: Any) -> np.ndarray:
    """An image file -> ``[3, H, W]`` float32 page through ``preprocessing``; errors name the file."""
    return preprocessing(read_image(path), size)
