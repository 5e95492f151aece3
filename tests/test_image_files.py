"""ECG image files: the EIANet clean-up as a named image preprocessing, the image data module over scans and a label
table, training and prediction through the same image model, and the contract that carries the clean-up."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecgfm.backbones.config import ContractError
from ecgfm.commands import main
from ecgfm.data.image_files import ImageFileDataModule
from ecgfm.data.page_cache import PageCache, PageCacheError, decode_page, encode_page
from ecgfm.ecg_paper import PaperECG
from ecgfm.image_preprocessing import (
    EIANetCleanup,
    ImageFileError,
    create_image_preprocessing,
    fit_page,
    otsu_threshold,
    read_image,
)
from ecgfm.registry import IMAGE_PREPROCESSING, UnknownNameError

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "images" / "image-files-resnet18.yaml"
CLEANUP = {"name": "eianet_cleanup", "min_component_px": 30, "opening_px": 2, "work_scale": 4}


def _page_from_traces() -> tuple[np.ndarray, np.ndarray]:
    """A rendered page of a sine in every lead (8 px/mm, as a 200-dpi scan; grid) and its ink (where the trace is)."""
    t = torch.arange(5000) / 500.0
    x = 0.8 * torch.sin(2 * torch.pi * 1.2 * t).expand(1, 12, 5000)
    renderer = PaperECG(pixels_per_mm=8.0)
    with torch.no_grad():
        page = renderer(x)[0].permute(1, 2, 0).numpy()
        ink = renderer.traces(x)[0].numpy()
    return page, ink


def test_registered_by_name_with_every_parameter():
    assert {"none", "eianet_cleanup"} <= set(IMAGE_PREPROCESSING.names())
    config = IMAGE_PREPROCESSING.create({"name": "eianet_cleanup", "median_px": 5}).config()
    assert config == {
        "name": "eianet_cleanup",
        "threshold": "otsu",
        "median_px": 5,
        "min_component_px": 30,
        "opening_px": 2,
        "work_scale": 4,
    }
    with pytest.raises(UnknownNameError, match="eianet_cleanup"):
        IMAGE_PREPROCESSING.create("cleanup")
    with pytest.raises(ValueError, match="median_px must be an odd number"):
        EIANetCleanup(median_px=2)


def test_otsu_separates_two_populations():
    values = np.concatenate([np.full(900, 0.9), np.full(100, 0.1)])
    assert 0.1 < otsu_threshold(values) <= 0.9


def test_cleanup_keeps_the_trace_and_drops_grid_specks_and_noise():
    page, ink = _page_from_traces()
    rng = np.random.default_rng(0)
    scan = page * np.array([0.97, 0.95, 0.88], np.float32) + rng.normal(0, 0.03, page.shape[:2])[..., None]
    specks = rng.integers(0, [page.shape[0] - 3, page.shape[1] - 3], (80, 2))
    for y, x in specks:
        scan[y : y + 2, x : x + 2] = 0.05
    image = Image.fromarray((scan.clip(0, 1) * 255).astype(np.uint8))
    size = (page.shape[0] // 4, page.shape[1] // 4)  # the model's 2 px/mm page (cleaned at 8 px/mm)
    cleaned = EIANetCleanup()(image, size)
    assert cleaned.shape == (3, *size) and cleaned.dtype == np.float32
    assert np.array_equal(cleaned[0], cleaned[1])  # gray: the colour of grid and paper is gone
    ink_small = ink.reshape(size[0], 4, size[1], 4).mean((1, 3))
    trace, paper = ink_small > 0.25, ink_small == 0
    assert (cleaned[0][trace] < 0.9).mean() > 0.95  # the trace survives
    assert (cleaned[0][paper] == 1.0).mean() > 0.995  # grid, noise and specks are gone
    plain = IMAGE_PREPROCESSING.create("none")(image, size)
    assert (plain[1][paper] < 0.95).mean() > 0.05  # without the clean-up the grid and noise are there


def test_fit_page_keeps_the_aspect_on_white():
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    page = fit_page(image, (50, 100))
    assert page.shape == (50, 100, 3)
    assert page[:, 25:75].max() == 0.0 and page[:, :24].min() == 1.0 and page[:, 76:].min() == 1.0


def test_unreadable_images_are_named(tmp_path: Path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageFileError, match=r"image .*scan\.png cannot be read"):
        read_image(bad)
    with pytest.raises(ImageFileError, match="does not exist"):
        read_image(tmp_path / "absent.jpg")


def test_data_module_splits_by_patient_and_reads_model_pages(ludb_scans: Path):
    data = ImageFileDataModule(
        str(ludb_scans), str(ludb_scans / "labels.csv"), patient_column="patient",
        multilabel={"diagnoses": ["diagnoses"]}, val_fraction=0.2, test_fraction=0.2, batch_size=4,
    )  # fmt: skip
    data.setup("fit")
    patients = {split: set(data.datasets[split].patient_ids) for split in ("train", "val", "test")}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert sum(len(data.datasets[s]) for s in ("train", "val", "test")) == len(data.datasets["all"]) == 120
    data.use_image_model((130, 260), CLEANUP)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 130, 260) and batch["image"].dtype == torch.float32
    assert batch["targets"]["diagnoses"].shape == (4, len(data.target_specs["diagnoses"].names))
    summary = data.target_summary("diagnoses")
    assert int(summary.count[0]) == len(data.datasets["train"])


def test_missing_image_named_with_the_table(tmp_path: Path):
    (tmp_path / "labels.csv").write_text("file,diagnoses\nscan-1.png,AF\n")
    data = ImageFileDataModule(str(tmp_path), str(tmp_path / "labels.csv"), multilabel={"diagnoses": ["diagnoses"]})
    with pytest.raises(FileNotFoundError, match=r"labels\.csv: image 'scan-1\.png' is not in"):
        data.setup("fit")


def _fit_argv(ludb_scans: Path, tmp_path: Path, *extra: str) -> list[str]:
    argv = ["fit", "--config", str(RECIPE), f"--data.root={ludb_scans}", f"--data.labels={ludb_scans / 'labels.csv'}"]
    argv += [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    argv += ["--trainer.enable_progress_bar=false", "--model.backbone=image-tiny", "--data.batch_size=8"]
    return [*argv, *extra]


def test_trains_from_image_files_and_predicts_them_through_the_same_model(ludb_scans: Path, tmp_path: Path):
    argv = _fit_argv(ludb_scans, tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3")
    argv += ["--trainer.limit_val_batches=2"]
    assert main(argv) == 0
    ckpt = sorted(tmp_path.rglob("*.ckpt"))[-1]
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["ecgfm"]  # the test's own file
    assert stored["backbone"]["architecture"]["image_preprocessing"]["name"] == "eianet_cleanup"

    folder = tmp_path / "published"
    assert main(["publish", str(ckpt), str(folder)]) == 0
    images = sorted(ludb_scans.glob("*.png"))[:3]
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(folder), *map(str, images), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [row["record_id"] for row in rows] == [p.stem for p in images]
    assert all(0 <= float(row["p_Sinus rhythm"]) <= 1 for row in rows)

    from ecgfm.pretrained import load

    model = load(folder)
    direct = model.predict_pages_numpy(model.read_image_pages(images))
    assert np.allclose(direct["p_Sinus rhythm"], [float(row["p_Sinus rhythm"]) for row in rows], atol=1e-6)


def test_predict_refuses_images_for_a_signal_model_and_names_bad_files(tmp_path: Path):
    scan = tmp_path / "scan.png"
    Image.new("RGB", (40, 20), (255, 255, 255)).save(scan)
    with pytest.raises(ValueError, match="reads signals, not images"):
        main(["--debug", "predict", "--model", "ludb-diagnoses-net1d-small", str(scan)])


def test_image_files_need_an_image_backbone(ludb_scans: Path, tmp_path: Path):
    argv = _fit_argv(ludb_scans, tmp_path, "--trainer.fast_dev_run=true", "--model.backbone=net1d-small")
    argv.append("--model.backbone_kwargs={}")
    with pytest.raises(ContractError, match="reads signals; use an image-\\* backbone"):
        main(["--debug", *argv])


def test_recipe_spells_out_the_cleanup():
    import yaml

    config = yaml.safe_load(RECIPE.read_text())
    assert config["model"]["backbone_kwargs"]["image_preprocessing"]["name"] == "eianet_cleanup"
    assert config["data"]["class_path"] == "ecgfm.data.image_files.ImageFileDataModule"
    json.dumps(config)  # plain YAML: no tags


def test_eianet_recipe_fine_tunes_one_batch_with_the_recall_loss(ludb_scans: Path, tmp_path: Path):
    recipe = REPO / "recipes" / "images" / "eianet-cardiac-arrest.yaml"
    argv = ["fit", "--config", str(recipe), f"--data.root={ludb_scans}", f"--data.labels={ludb_scans / 'labels.csv'}"]
    argv += [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    argv += ["--trainer.enable_progress_bar=false", "--trainer.fast_dev_run=true", "--data.batch_size=4"]
    argv += ["--data.num_workers=0", "--model.backbone=image-tiny", "--model.backbone_kwargs.pixels_per_mm=1.0"]
    assert main(argv) == 0


def _three_scans(ludb_scans: Path, folder: Path) -> Path:
    """Copies of the first three scans (PNG and JPEG) with their label rows, in a folder of the test's own."""
    folder.mkdir()
    lines = (ludb_scans / "labels.csv").read_text().splitlines()
    for line in lines[1:4]:
        shutil.copy2(ludb_scans / line.split(",")[0], folder)
    (folder / "labels.csv").write_text("\n".join(lines[:4]) + "\n")
    return folder


def _images(folder: Path, chain: dict | str, cache_dir: Path | None, size=(65, 130)) -> list[np.ndarray]:
    data = ImageFileDataModule(
        str(folder), str(folder / "labels.csv"), patient_column="patient", multilabel={"diagnoses": ["diagnoses"]},
        val_fraction=0.0, test_fraction=0.0, cache_dir=str(cache_dir) if cache_dir else None,
    )  # fmt: skip
    data.setup("fit")
    data.use_image_model(size, chain)
    dataset = data.datasets["all"]
    return [dataset[i]["image"].numpy() for i in range(len(dataset))]


def _bit_equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """The same float32 pages, bit for bit."""
    bits = [(x.dtype, y.dtype, np.array_equal(x.view(np.uint32), y.view(np.uint32))) for x, y in zip(a, b, strict=True)]
    return all(dx == dy == np.float32 and equal for dx, dy, equal in bits)


def test_page_encoding_is_bit_exact():
    rng = np.random.default_rng(0)
    many = rng.random((3, 200, 200), dtype=np.float32)  # 120,000 values: stored as they are
    many[0, 0, :3] = [-0.0, np.nan, np.inf]
    some = rng.random((3, 20, 30), dtype=np.float32)  # 1,800: a uint16 index
    gray = np.broadcast_to((rng.integers(0, 17, (20, 30)) / np.float32(16)).astype(np.float32), (3, 20, 30))
    colour = (rng.integers(0, 256, (3, 20, 30)) / np.float32(255)).astype(np.float32)
    for page, stored in ((many, None), (some, np.uint16), (np.ascontiguousarray(gray), np.uint8), (colour, np.uint8)):
        arrays = encode_page(page)
        assert arrays["index"].dtype == stored if stored else "bits" in arrays
        assert _bit_equal([decode_page(arrays)], [page])
    assert encode_page(np.ascontiguousarray(gray))["index"].shape == (1, 20, 30)  # one channel of a gray page


def test_page_cache_gives_the_computed_pages_and_computes_each_once(ludb_scans: Path, tmp_path: Path, monkeypatch):
    folder, cache = _three_scans(ludb_scans, tmp_path / "scans"), tmp_path / "cache"
    for chain in ("none", CLEANUP):
        assert _bit_equal(_images(folder, chain, cache), _images(folder, chain, None))
    calls = []
    clean = EIANetCleanup.__call__
    monkeypatch.setattr(
        EIANetCleanup, "__call__", lambda self, image, size: calls.append(1) or clean(self, image, size)
    )
    uncached = _images(folder, CLEANUP, None)
    assert len(calls) == 3
    cached = _images(folder, CLEANUP, cache)  # a second run: the pages of the first
    assert len(calls) == 3 and _bit_equal(cached, uncached)
    assert len(list(cache.rglob("*.npz"))) == 6  # two chains, three images


def test_page_cache_recomputes_edited_images_other_chains_and_broken_files(
    ludb_scans: Path, tmp_path: Path, monkeypatch
):
    folder, cache = _three_scans(ludb_scans, tmp_path / "scans"), tmp_path / "cache"
    calls = []
    clean = EIANetCleanup.__call__
    monkeypatch.setattr(
        EIANetCleanup, "__call__", lambda self, image, size: calls.append(1) or clean(self, image, size)
    )
    first = _images(folder, CLEANUP, cache)
    assert len(calls) == 3
    _images(folder, {**CLEANUP, "min_component_px": 10}, cache)  # another clean-up: its own pages
    assert len(calls) == 6
    _images(folder, CLEANUP, cache, size=(60, 130))  # another page size
    assert len(calls) == 9
    scan = sorted(folder.glob("*.png"))[0]
    stat = scan.stat()
    os.utime(scan, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: the image may have changed
    assert _bit_equal(_images(folder, CLEANUP, cache), first) and len(calls) == 10
    pages = PageCache(cache)
    chain = create_image_preprocessing(CLEANUP)
    files = sorted(p for p in folder.iterdir() if p.suffix != ".csv")
    broken = [pages.path_of(pages.key(path, (65, 130), chain)) for path in files[:2]]
    broken[0].write_bytes(broken[0].read_bytes()[:100])  # truncated (a torn write of an older ecgfm, a full disk)
    broken[1].write_bytes(b"")
    assert _bit_equal(_images(folder, CLEANUP, cache), first) and len(calls) == 12  # the two computed again ...
    assert _bit_equal(_images(folder, CLEANUP, cache), first) and len(calls) == 12  # ... and stored again
    assert not list(cache.rglob(".partial-*"))


def test_an_unwritable_page_cache_is_named_at_setup(ludb_scans: Path, tmp_path: Path):
    folder = _three_scans(ludb_scans, tmp_path / "scans")
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(PageCacheError, match=r"page cache folder .*taken.*cache cannot be written"):
        _images(folder, CLEANUP, tmp_path / "taken" / "cache")
