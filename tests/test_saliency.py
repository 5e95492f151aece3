"""Saliency (``ecgfm.evaluation.saliency``) on the shipped zoo model and real recordings: captum's attributions equal
gradients taken directly, integrated gradients are complete, masked leads get nothing, R peaks are the beats a
reader counts, and the paper-grid figures are real images."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import ecgfm
from ecgfm.evaluation.saliency import (
    SaliencyError,
    attribute,
    attribution_space,
    beat_average,
    detect_r_peaks,
    plot_saliency,
    save_figure,
)
from ecgfm.leads import STANDARD_LEADS
from ecgfm.pretrained import ECGModel
from ecgfm.record_windows import model_windows
from ecgfm.registry import BACKBONES, SOURCES

DOCS = Path(__file__).resolve().parents[1] / "docs"
ZOO = "ludb-diagnoses-net1d-small"
OUTPUT = "p_Sinus rhythm"


def read(test_data: Path, record_id: str):
    """A CinC 2021 record through ecgfm's source reader."""
    return SOURCES.create("challenge").read(test_data / "cinc2021" / record_id)


def window(model: ECGModel, record) -> torch.Tensor:
    """A record's first window as the model reads it: [1, L, T] mV."""
    return torch.tensor(model_windows(record, model.input_contract.to_dict()).signal[:1])


@pytest.fixture(scope="module")
def zoo() -> ECGModel:
    return ecgfm.load(ZOO)


@pytest.fixture(scope="module")
def hr06000(test_data, zoo) -> torch.Tensor:
    return window(zoo, read(test_data, "HR06000"))


@pytest.fixture(scope="module")
def gradient(zoo, hr06000) -> torch.Tensor:
    return attribute(zoo, hr06000, OUTPUT, "gradient")


def tiny_model(preprocessing: dict, seed: int = 0) -> ECGModel:
    """A net1d-tiny with a potassium head (a regression output in mmol/L) built from a contract."""
    config = BACKBONES.create("net1d-tiny").model_config
    contract = {
        "backbone": config.to_dict(),
        "input": {**config.input.to_dict(), "preprocessing": preprocessing},
        "adapter": "identity",
        "heads": {"potassium": {"kind": "potassium", "labels": ["potassium"]}},
    }
    torch.manual_seed(seed)
    model = ECGModel(contract)
    with torch.no_grad():
        model.heads["potassium"].mean.fill_(4.6)
        model.heads["potassium"].std.fill_(0.8)
    return model


def score(model: ECGModel, signal: torch.Tensor, output: str) -> torch.Tensor:
    with torch.no_grad():
        return model.predict(signal)[output]


# ------------------------------------------------------------------------------------------------ attributions


def test_the_gradient_is_the_autograd_gradient_of_the_probability_through_the_preprocessing(zoo, hr06000, gradient):
    assert gradient.shape == hr06000.shape == (1, 12, 5000) and gradient.dtype == torch.float32
    x = hr06000.clone().requires_grad_(True)
    (direct,) = torch.autograd.grad(zoo.predict(x)[OUTPUT].sum(), x)
    assert torch.allclose(gradient, direct, rtol=1e-4, atol=1e-9)
    assert gradient.abs().amax() > 0
    assert attribution_space(zoo, hr06000, "gradient") == "input"


def test_gradient_x_input_is_the_gradient_times_the_raw_input(zoo, hr06000, gradient):
    product = attribute(zoo, hr06000, OUTPUT, "gradient_x_input")
    assert torch.allclose(product, gradient * hr06000, rtol=1e-4, atol=1e-10)
    # the z-score makes the model blind to the record's scale, so sum(grad * x) = 0 (Euler): why integrated
    # gradients of such a model are taken at the preprocessed input
    assert abs(float(product.sum())) < 1e-3 * float(product.abs().sum())


def test_the_ecgfounder_preprocessing_passes_exact_gradients(zoo, hr06000):
    x = hr06000.double()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((zoo.preprocessing(xg) * w).sum(), xg)
    h = 1e-6  # the running median is piecewise linear: a step this small stays on one piece
    with torch.no_grad():
        numeric = ((zoo.preprocessing(x + h * v) - zoo.preprocessing(x - h * v)) * w).sum() / (2 * h)
    assert float((grad * v).sum()) == pytest.approx(float(numeric), rel=1e-5)


def test_integrated_gradients_of_the_zoo_model_are_complete_at_the_preprocessed_input(zoo, hr06000):
    assert attribution_space(zoo, hr06000, "integrated_gradients") == "preprocessed"
    ig = attribute(zoo, hr06000, OUTPUT, n_steps=16, internal_batch_size=16)
    assert ig.shape == hr06000.shape
    expected = score(zoo, hr06000, OUTPUT) - score(zoo, torch.zeros_like(hr06000), OUTPUT)
    assert abs(float(expected)) > 0.05
    assert float(ig.sum()) == pytest.approx(float(expected), rel=0.01)


@pytest.mark.parametrize(
    ("preprocessing", "space"), [({"name": "none"}, "input"), ({"name": "zscore"}, "preprocessed")]
)
def test_integrated_gradients_of_a_potassium_value_are_complete(test_data, preprocessing, space):
    model = tiny_model(preprocessing)
    x = window(model, read(test_data, "E07500"))
    assert model.score_names()[0] == "potassium_mmol_l"
    assert attribution_space(model, x, "integrated_gradients") == space
    ig = attribute(model, x, "potassium_mmol_l", n_steps=32, internal_batch_size=32)
    expected = score(model, x, "potassium_mmol_l") - score(model, torch.zeros_like(x), "potassium_mmol_l")
    assert (expected.abs() > 1e-3).all()
    assert torch.allclose(ig.sum(dim=(1, 2)), expected, rtol=0.01, atol=1e-4)


def test_a_masked_lead_gets_zero_attribution(zoo, hr06000, test_data):
    mask = torch.ones(1, 12, dtype=torch.bool)
    v1 = STANDARD_LEADS.index("V1")
    mask[0, v1] = False
    grad = attribute(zoo, hr06000, OUTPUT, "gradient", lead_mask=mask)
    assert not grad[0, v1].any() and grad[0, :v1].abs().amax() > 0
    model = tiny_model({"name": "zscore"})
    x = window(model, read(test_data, "E07500"))
    ig = attribute(model, x, "potassium_mmol_l", lead_mask=mask, n_steps=8)
    assert not ig[0, v1].any() and ig[0, :v1].abs().amax() > 0


def test_attribution_errors_name_the_output_or_method(zoo, hr06000):
    with pytest.raises(SaliencyError, match=r"no output 'p_AF'; its scores are: p_Sinus rhythm, p_Atrial"):
        attribute(zoo, hr06000, "p_AF")
    with pytest.raises(
        SaliencyError, match=r"'Atrial fibrillation' .* 0/1 decision .* attribute p_Atrial fibrillation"
    ):
        attribute(zoo, hr06000, "Atrial fibrillation")
    with pytest.raises(SaliencyError, match="unknown attribution method 'lime'"):
        attribute(zoo, hr06000, OUTPUT, "lime")
    with pytest.raises(ValueError, match=r"reads \[batch, 12 leads"):
        attribute(zoo, hr06000[:, :, :4000], OUTPUT, "gradient")


# ------------------------------------------------------------------------------------------------ beats


@pytest.mark.parametrize(
    ("record_id", "beats"),
    # counted by eye on lead II: HR06000 ~72 bpm; E07500 sinus bradycardia with T waves almost as tall as its
    # narrow R waves; E07514 sinus tachycardia (~114 bpm)
    [("HR06000", 12), ("E07500", 9), ("E07514", 19)],
)
def test_r_peaks_are_the_beats_a_reader_counts(test_data, record_id, beats):
    record = read(test_data, record_id)
    lead_ii = record.signal[list(record.lead_names).index("II")]
    peaks = detect_r_peaks(lead_ii, record.fs)
    assert len(peaks) == beats
    rr = np.diff(peaks) / record.fs
    assert rr.min() > 0.4 and rr.max() < 1.3


def test_beat_averaging_aligns_every_whole_beat_on_its_r_peak(test_data):
    record = read(test_data, "HR06000")
    signal = record.signal.astype(np.float64)
    average = beat_average(signal, signal * 2, record.fs)  # the attribution is averaged exactly as the signal
    # 12 R peaks, the first (0.05 s) and last (9.63 s) too near the edges for a -0.25..0.45 s window
    assert len(average.r_peaks) == 12 and average.n_beats == 10
    assert average.signal.shape == average.attribution.shape == (12, 350)
    np.testing.assert_allclose(average.attribution, 2 * average.signal)
    ii = average.signal[1]
    r = int(np.argmin(np.abs(average.times)))
    assert abs(int(np.argmax(ii)) - r) <= 2 and ii[r] - np.median(ii) > 0.5  # the mean beat's R peak, ~0.6 mV
    with pytest.raises(SaliencyError, match="lead 'V7' is not among"):
        beat_average(signal, signal, record.fs, lead="V7")
    flat = signal.copy()
    flat[1] = 0
    with pytest.raises(SaliencyError, match="no whole beat in lead II"):
        beat_average(flat, flat, record.fs)


# ------------------------------------------------------------------------------------------------ drawing


def png_pixels(path: Path) -> np.ndarray:
    return matplotlib.image.imread(path)[..., :3]


@pytest.mark.parametrize("beat_averaged", [False, True])
def test_the_figures_are_real_paper_ecgs_with_a_heat_overlay(zoo, hr06000, gradient, tmp_path, beat_averaged):
    fig = plot_saliency(
        hr06000[0], gradient[0], 500.0, zoo.leads, title="HR06000: p_Sinus rhythm", beat_averaged=beat_averaged
    )
    assert isinstance(fig, Figure)
    path = save_figure(fig, tmp_path / "figure.png")
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]  # written atomically, nothing left beside it
    pixels = png_pixels(path)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 900
    assert pixels.var() > 0.01
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((red > 0.8) & (green < 0.9) & (blue < 0.9) & (np.abs(green - blue) < 0.05)).mean() > 0.002  # pink grid
    assert ((red > 0.6) & (blue < 0.5) & (green - blue > 0.15)).mean() > 0.001  # the orange heat band
    assert (pixels.max(-1) < 0.2).mean() > 0.002  # black traces and text


def test_signed_figures_and_bad_inputs(zoo, hr06000, gradient, tmp_path):
    fig = plot_saliency(hr06000[0].numpy(), gradient[0].numpy(), 500.0, zoo.leads, signed=True)
    assert png_pixels(save_figure(fig, tmp_path / "signed.png")).var() > 0.01
    with pytest.raises(SaliencyError, match=r"name the file \*\.png"):
        save_figure(fig, tmp_path / "signed.svg")
    with pytest.raises(SaliencyError, match=r"must both be \[12 leads, samples\]"):
        plot_saliency(hr06000[0], gradient[0, :6], 500.0, zoo.leads)


def test_a_model_reading_fewer_leads_leaves_the_other_panels_empty(hr06000, tmp_path):
    limb = list(STANDARD_LEADS[:6])
    fig = plot_saliency(hr06000[0, :6], hr06000[0, :6], 500.0, limb, title="limb leads")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("(not read by the model)") == 6
    assert png_pixels(save_figure(fig, tmp_path / "limb.png")).var() > 0.01


def test_the_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "saliency.md").read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "images").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(Path(__file__).parent / "data")  # the page runs from the repository
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "docs/saliency.md example", "exec"), {"__name__": "docs_saliency"})
    expected = [m.group(1) for b in blocks for m in re.finditer(r"^print\(.*\)  # (.+)$", b, flags=re.M)]
    assert out.getvalue().splitlines() == expected
    assert (tmp_path / "docs" / "images" / "saliency-example.png").stat().st_size > 10_000


def test_a_decimating_scale_free_preprocessing_refuses_integrated_gradients_but_gives_gradients(test_data):
    model = tiny_model({"name": "hubert_ecg"})  # min-max per lead, then 500 -> 100 Hz
    x = window(model, read(test_data, "E07500"))
    with pytest.raises(SaliencyError, match=r"integrated gradients of .* cannot be drawn over the record"):
        attribute(model, x, "potassium_mmol_l", n_steps=4)
    grad = attribute(model, x, "potassium_mmol_l", "gradient")
    assert grad.shape == x.shape and grad.abs().amax() > 0
