"""Resampling, windows and the preprocessing chains, checked against scipy on a real 12-lead recording."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from ecgfm.registry import PREPROCESSING
from ecgfm.signal import (
    ECGFounderPreprocessing,
    NoPreprocessing,
    ZScore,
    create_preprocessing,
    ecgfounder_preprocess_numpy,
    resample,
    segment_starts,
    to_millivolts,
)

DATA = Path(__file__).resolve().parent / "data"  # real recordings shipped with the tests (data/README.md)
CINC = DATA / "cinc2021"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def load_cinc_mv(record: str) -> np.ndarray:
    """A CinC 2021 record [12, 5000] in mV (the headers say gain 1000 per mV, baseline 0)."""
    return scipy.io.loadmat(CINC / f"{record}.mat")["val"].astype(np.float64) / 1000.0


@pytest.fixture(scope="module")
def ecg() -> np.ndarray:
    return load_cinc_mv("E07500")


@pytest.fixture(scope="module")
def chain() -> ECGFounderPreprocessing:
    return ECGFounderPreprocessing()


# --- resample / segment_starts / units ---


def test_resample_1000_to_500_halves_length_and_keeps_sine_amplitude() -> None:
    t = np.arange(10_000) / 1000.0
    x = np.stack([np.sin(2 * np.pi * 5 * t), 0.5 * np.sin(2 * np.pi * 5 * t)])
    y = resample(x, 1000.0, 500.0)
    assert y.shape == (2, 5000) and y.dtype == np.float32
    expected = np.stack([np.sin(2 * np.pi * 5 * np.arange(5000) / 500.0)] * 2) * [[1.0], [0.5]]
    inner = slice(100, -100)  # polyphase filters ring a little at the record edges
    np.testing.assert_allclose(y[:, inner], expected[:, inner], atol=1e-3)
    np.testing.assert_allclose(np.abs(y[:, inner]).max(axis=1), [1.0, 0.5], rtol=1e-3)


def test_resample_250_to_500_doubles_length() -> None:
    x = np.random.default_rng(0).standard_normal((12, 2500))
    assert resample(x, 250.0, 500.0).shape == (12, 5000)


def test_resample_odd_rates_use_exact_ratio() -> None:
    assert resample(np.zeros((1, 3600)), 360.0).shape == (1, 5000)  # 25/18
    assert resample(np.zeros((1, 2570)), 257.0).shape == (1, 5000)  # INCART


def test_resample_same_rate_is_identity_in_float32() -> None:
    x = np.random.default_rng(0).standard_normal((3, 100))
    y = resample(x, 500.0, 500.0)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32))


@pytest.mark.parametrize("fs_in, fs_out", [(0.0, 500.0), (-250.0, 500.0), (500.0, 0.0)])
def test_resample_rejects_non_positive_rates(fs_in: float, fs_out: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        resample(np.zeros((1, 10)), fs_in, fs_out)


def test_segment_starts() -> None:
    assert segment_starts(int(38.4 * 500)) == [0, 5000, 10000]
    assert segment_starts(4999) == []
    assert segment_starts(5000) == [0]
    assert segment_starts(10_000, stride=2500) == [0, 2500, 5000]
    assert segment_starts(1000, n_samples=250) == [0, 250, 500, 750]


def test_to_millivolts() -> None:
    x = torch.tensor([[1000, -500, 0]], dtype=torch.int16)
    assert to_millivolts(x).dtype == torch.float32
    torch.testing.assert_close(to_millivolts(x), torch.tensor([[1.0, -0.5, 0.0]]))
    torch.testing.assert_close(to_millivolts(x, lsb_uv=5.0), torch.tensor([[5.0, -2.5, 0.0]]))


# --- ECGFounder chain: torch vs scipy ---


def test_numpy_reference_is_standardised(ecg: np.ndarray) -> None:
    y = ecgfounder_preprocess_numpy(ecg)
    assert y.shape == ecg.shape
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1.0) < 1e-5


def test_torch_chain_matches_scipy_on_real_ecg(ecg: np.ndarray, chain: ECGFounderPreprocessing) -> None:
    ref = ecgfounder_preprocess_numpy(ecg)
    out = chain(torch.tensor(ecg, dtype=torch.float32)[None])[0].numpy()
    assert np.abs(out - ref).max() < 1e-3  # whole record, edges included (measured ~5e-6)


def test_torch_chain_matches_scipy_per_record_in_a_batch(chain: ECGFounderPreprocessing) -> None:
    records = np.stack([load_cinc_mv("E07500"), load_cinc_mv("E07501")])
    out = chain(torch.tensor(records, dtype=torch.float32)).numpy()
    for got, record in zip(out, records, strict=True):
        assert np.abs(got - ecgfounder_preprocess_numpy(record)).max() < 1e-3


@pytest.mark.parametrize("n_time", [3001, 10_000])  # shorter and longer than the band-pass impulse response
def test_torch_chain_matches_scipy_for_other_lengths(n_time: int, chain: ECGFounderPreprocessing) -> None:
    x = np.concatenate([load_cinc_mv("E07500"), load_cinc_mv("E07501")], axis=1)[:, :n_time]
    out = chain(torch.tensor(x)[None])[0].numpy()
    assert np.abs(out - ecgfounder_preprocess_numpy(x)).max() < 1e-3


def test_torch_chain_rejects_too_short_records(chain: ECGFounderPreprocessing) -> None:
    with pytest.raises(ValueError, match="more than"):
        chain(torch.zeros(1, 12, 20))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_dtype_and_device_follow_input(
    device: str, dtype: torch.dtype, ecg: np.ndarray, chain: ECGFounderPreprocessing
) -> None:
    x = torch.tensor(ecg, dtype=dtype, device=device)[None]
    for module in (chain, ZScore(), NoPreprocessing()):
        y = module(x)
        assert y.dtype == dtype and y.device == x.device and y.shape == x.shape
    ref = ecgfounder_preprocess_numpy(ecg)
    assert np.abs(chain(x)[0].cpu().numpy() - ref).max() < 1e-3


def test_lead_mask_zero_scores_present_leads_and_keeps_absent_ones_zero(
    ecg: np.ndarray, chain: ECGFounderPreprocessing
) -> None:
    present = np.zeros(12, dtype=bool)
    present[:6] = True  # a limb-lead device: precordial leads missing
    x = ecg.copy()
    x[~present] = 0.0
    mask = torch.tensor(present)[None]
    out = chain(torch.tensor(x, dtype=torch.float32)[None], lead_mask=mask)[0].numpy()
    assert np.all(out[~present] == 0.0)
    assert abs(float(out[present].mean())) < 1e-5 and abs(float(out[present].std()) - 1.0) < 1e-5
    # the absent leads do not count: same as preprocessing only the six present leads
    assert np.abs(out[present] - ecgfounder_preprocess_numpy(ecg[present])).max() < 1e-3

    z = ZScore()(torch.tensor(x)[None], lead_mask=mask)[0].numpy()
    assert np.all(z[~present] == 0.0)
    assert abs(z[present].mean()) < 1e-9 and abs(z[present].std() - 1.0) < 1e-6


def test_zscore_per_lead_standardises_each_lead(ecg: np.ndarray) -> None:
    z = ZScore(per_lead=True)(torch.tensor(ecg)[None])[0].numpy()
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.std(axis=1), 1.0, atol=1e-6)


def test_no_preprocessing_returns_input_unchanged() -> None:
    x = torch.randn(2, 12, 100)
    assert torch.equal(NoPreprocessing()(x), x)


# --- registry and configs ---


def test_build_preprocessing_by_name_dict_and_none() -> None:
    assert {"ecgfounder", "zscore", "none"} <= set(PREPROCESSING.names())
    assert isinstance(create_preprocessing("ecgfounder"), ECGFounderPreprocessing)
    assert isinstance(create_preprocessing(None), NoPreprocessing)
    z = create_preprocessing({"name": "zscore", "per_lead": True})
    assert isinstance(z, ZScore) and z.per_lead
    us = create_preprocessing({"name": "ecgfounder", "notch_hz": 60.0, "fs": 250.0})
    assert us.config()["notch_hz"] == 60.0 and us.config()["fs"] == 250.0


def test_build_preprocessing_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown preprocessing name 'butterworth'.*ecgfounder.*none.*zscore"):
        create_preprocessing("butterworth")


@pytest.mark.parametrize("spec", ["ecgfounder", "zscore", "none", {"name": "ecgfounder", "band_hz": [0.5, 45]}])
def test_config_round_trips_through_json(spec: str | dict) -> None:
    module = create_preprocessing(spec)
    config = json.loads(json.dumps(module.config()))  # what a checkpoint stores
    assert config["name"] == (spec if isinstance(spec, str) else spec["name"])
    assert create_preprocessing(config).config() == module.config()


def test_ecgfounder_config_records_every_filter_parameter() -> None:
    assert ECGFounderPreprocessing().config() == {
        "name": "ecgfounder",
        "fs": 500.0,
        "notch_hz": 50.0,
        "notch_q": 30.0,
        "band_hz": [0.67, 40.0],
        "order": 4,
        "baseline_window_s": 0.4,
        "zscore": True,
        "eps": 1e-8,
    }
    assert ECGFounderPreprocessing().median_kernel == 201
    assert ECGFounderPreprocessing(fs=128.0).median_kernel % 2 == 1  # int(0.4 * 128) + 1 = 52, made odd


def test_median_filter_gpu_path_equals_cpu_path():
    """The unfold+median path (used on accelerators) gives the same medians as scipy's on the CPU."""
    from ecgfm.signal import _median_filter

    x = torch.randn(6, 1200, dtype=torch.float64)
    fast = _median_filter(x, 201)
    unfold = _median_filter(x.clone().requires_grad_(True), 201).detach()  # requires_grad forces the torch path
    torch.testing.assert_close(fast, unfold, rtol=0, atol=0)


def test_under_torch_compile_the_chain_breaks_only_around_the_cpu_median_and_gives_the_same_values(
    chain: ECGFounderPreprocessing,
) -> None:
    """scipy's next_fast_len (C, behind an lru_cache) broke the graph in every filter pass; the FFT length is now
    plain Python, and only the CPU median (scipy, run as it is) stays outside the graph."""
    import scipy.fft

    from ecgfm.signal import _next_fast_len

    assert all(_next_fast_len(m) == scipy.fft.next_fast_len(m, real=True) for m in range(1, 20000))
    x = torch.randn(2, 12, 5000, generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(chain)(x)
    assert explained.graph_break_count == 1, [str(b.reason)[:200] for b in explained.break_reasons]
    assert "_median_filter_scipy" in str(explained.break_reasons[0].reason)
    torch._dynamo.reset()
    compiled = torch.compile(chain, backend="eager")  # dynamo's graphs run eagerly: the test checks tracing
    torch.testing.assert_close(compiled(x), chain(x), rtol=0, atol=0)
