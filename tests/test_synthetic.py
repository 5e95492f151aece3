"""Synthetic ECGs: reproducible, physiologically shaped (potassium, calcium), leak-free labs, valid shards."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import find_peaks

from ecgfm.data.datamodule import ShardDataModule
from ecgfm.data.dataset import ShardDataset
from ecgfm.data.shards import Manifest, to_int16_microvolts, verify_shards
from ecgfm.data.synthetic import (
    ELECTROLYTE_CLASSES,
    SYNTHETIC_LABS,
    electrolyte_class,
    lab_keys,
    synthesize,
    write_synthetic_shards,
)
from ecgfm.leads import STANDARD_LEADS

FS = 500
LEAD = {name: i for i, name in enumerate(STANDARD_LEADS)}
UNLINKED = [key for key, spec in zip(lab_keys(), SYNTHETIC_LABS.values(), strict=True) if not spec["linked"]]


def beat_features(signals: np.ndarray) -> dict[str, np.ndarray]:
    """What a reader measures on an averaged beat: R and T heights, T-peak time, RR and late (U-wave) energy.

    Heights are the spatial magnitude over the 12 leads, so they do not depend on the electrical axis.
    """
    rows = []
    for seg in signals:
        energy = np.convolve((np.diff(seg, axis=1) ** 2).sum(0), np.ones(15), mode="same")
        peaks, _ = find_peaks(energy, height=0.4 * energy.max(), distance=int(0.3 * FS))
        rr = np.median(np.diff(peaks)) / FS
        peaks = peaks[(peaks > 0.3 * FS) & (peaks < seg.shape[1] - 0.7 * FS)]
        beat = np.stack([seg[:, p - 150 : p + 350] for p in peaks]).mean(0)  # R peak at sample 150
        beat -= np.median(beat, axis=1, keepdims=True)
        magnitude = np.sqrt((beat**2).sum(0))
        t_window = magnitude[150 + 50 : 150 + 220]  # 100-440 ms after R
        late = magnitude[150 + 200 : 150 + 300]  # 400-600 ms after R: the U wave at slow rates
        rows.append((magnitude[140:160].max(), t_window.max(), (50 + t_window.argmax()) / FS, rr, (late**2).mean()))
    r_amp, t_amp, t_time, rr, u_energy = np.array(rows).T
    return {"r_amp": r_amp, "t_amp": t_amp, "t_peak_s": t_time, "rr_s": rr, "u_energy": u_energy}


@pytest.fixture(scope="module")
def population() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """2,000 segments reduced to their ground truth and measured beat features (the signals are not kept)."""
    signals, truth = synthesize(2000, seed=3)
    return truth, beat_features(signals)


def test_same_seed_gives_the_same_data_and_shorter_runs_are_prefixes():
    a, truth_a = synthesize(6, seed=5)
    b, truth_b = synthesize(6, seed=5)
    np.testing.assert_array_equal(a, b)
    for key in truth_a:
        np.testing.assert_array_equal(truth_a[key], truth_b[key])
    c, truth_c = synthesize(3, seed=5)
    np.testing.assert_array_equal(c, a[:3])
    np.testing.assert_array_equal(truth_c["potassium_mmol_l"], truth_a["potassium_mmol_l"][:3])
    assert not np.array_equal(synthesize(3, seed=6)[0], c)


def test_signals_are_12_lead_millivolts_with_ground_truth_per_segment():
    signals, truth = synthesize(8, seed=1)
    assert signals.shape == (8, 12, 5000) and signals.dtype == np.float32
    peak = np.abs(signals).max(axis=(1, 2))
    assert (peak > 0.3).all() and (peak < 8.0).all()  # a few mV, far inside int16 µV
    expected = {"potassium_mmol_l", *lab_keys(), "heart_rate_bpm", "electrolyte_class", "patient_index"}
    assert set(truth) == expected
    assert all(v.shape == (8,) for v in truth.values())
    assert truth["electrolyte_class"].dtype == np.int64
    assert synthesize(2, seed=1, fs=250.0, n_samples=2500)[0].shape == (2, 12, 2500)


def test_limb_leads_obey_einthoven_and_goldberger():
    x, _ = synthesize(4, seed=2)
    i, ii = x[:, LEAD["I"]], x[:, LEAD["II"]]
    np.testing.assert_allclose(x[:, LEAD["III"]], ii - i, atol=1e-5)
    np.testing.assert_allclose(x[:, LEAD["aVR"]], -(i + ii) / 2, atol=1e-5)
    np.testing.assert_allclose(x[:, LEAD["aVL"]], i - ii / 2, atol=1e-5)
    np.testing.assert_allclose(x[:, LEAD["aVF"]], ii - i / 2, atol=1e-5)


def test_measured_heart_rate_matches_the_truth(population):
    truth, feats = population
    measured = 60.0 / feats["rr_s"]
    assert np.median(np.abs(measured - truth["heart_rate_bpm"])) < 2.0


def test_t_wave_grows_with_potassium_and_u_wave_marks_hypokalemia(population):
    truth, feats = population
    k = truth["potassium_mmol_l"]
    groups = {"hypo": k < 3.5, "normal": (k >= 3.5) & (k <= 5.5), "hyper": k > 5.5}
    t_ratio = feats["t_amp"] / feats["r_amp"]
    means = [np.median(t_ratio[m]) for m in groups.values()]
    assert means[0] < 0.8 * means[1] and means[1] < 0.5 * means[2], means  # flat -> normal -> peaked T
    severe = np.median(t_ratio[k > 7.0])
    assert severe > np.median(t_ratio[(k > 5.5) & (k < 6.5)])
    slow = feats["rr_s"] > 0.8  # at slow rates the U wave is not hidden by the next P wave
    u_hypo = np.median(feats["u_energy"][groups["hypo"] & slow])
    u_normal = np.median(feats["u_energy"][groups["normal"] & slow])
    assert u_hypo > 4 * u_normal


def test_calcium_moves_the_t_wave_and_unlinked_labs_shape_nothing(population):
    truth, feats = population
    k = truth["potassium_mmol_l"]
    qt_like = feats["t_peak_s"] / np.sqrt(feats["rr_s"])  # rate-corrected R-to-T-peak time
    normokalemic = (k >= 3.5) & (k <= 5.5)
    assert np.corrcoef(truth["calcium_mmol_l"][normokalemic], qt_like[normokalemic])[0, 1] < -0.8
    waveform = {"T/R": feats["t_amp"] / feats["r_amp"], "T": feats["t_amp"], "QT": qt_like, "U": feats["u_energy"]}
    waveform["HR"] = 60.0 / feats["rr_s"]
    for lab in UNLINKED:
        for name, feature in waveform.items():
            r = np.corrcoef(truth[lab], feature)[0, 1]
            assert abs(r) < 0.1, f"{lab} correlates with {name} (r={r:.3f}): a leak into the waveform"
    # creatinine is linked only through potassium, as in renal failure
    assert np.corrcoef(np.log(truth["creatinine_umol_l"]), k)[0, 1] > 0.5


def test_handcrafted_features_predict_potassium_far_better_than_the_mean(population):
    truth, feats = population
    k = truth["potassium_mmol_l"].astype(np.float64)
    x = np.column_stack(
        [
            np.log(feats["t_amp"] / feats["r_amp"]),
            np.log(feats["t_amp"]),
            feats["t_peak_s"] / np.sqrt(feats["rr_s"]),
            np.log(feats["u_energy"]),
            np.ones_like(k),
        ]
    )
    train, test = slice(0, 1500), slice(1500, None)
    w = np.linalg.solve(x[train].T @ x[train] + 1e-3 * np.eye(x.shape[1]), x[train].T @ k[train])
    mae = np.abs(x[test] @ w - k[test]).mean()
    mae_of_mean = np.abs(k[train].mean() - k[test]).mean()
    assert mae < 0.65 * mae_of_mean, (mae, mae_of_mean)


def test_electrolyte_classes_follow_the_thresholds(population):
    truth, _ = population
    k, na, cls = truth["potassium_mmol_l"], truth["sodium_mmol_l"], truth["electrolyte_class"]
    np.testing.assert_array_equal(cls == 1, k < 3.5)
    np.testing.assert_array_equal(cls == 2, k > 5.5)
    np.testing.assert_array_equal(cls == 3, (na < 135) & (k >= 3.5) & (k <= 5.5))
    assert np.bincount(cls, minlength=4).min() > 100  # every class is represented
    # potassium takes precedence over sodium; the thresholds themselves are normal
    classes = electrolyte_class(np.array([3.5, 5.5, 6.0, 3.0, 4.0]), np.array([140, 140, 130, 130, 130]))
    assert classes.tolist() == [0, 0, 2, 1, 3]


def test_written_shards_verify_load_and_split_by_patient(tmp_path):
    root = tmp_path / "synth"
    manifest = write_synthetic_shards(
        root, 600, seed=2, segments_per_shard=256, segments_per_patient=3, lab_missing_fraction=0.7, progress=False
    )
    assert [s["n_segments"] for s in manifest.shards] == [256, 256, 88]
    assert verify_shards(root) == []
    loaded = Manifest.load(root)
    assert loaded.targets["labs"].names == list(SYNTHETIC_LABS)
    assert loaded.targets["electrolyte"].kind == "multiclass"
    assert loaded.targets["electrolyte"].names == list(ELECTROLYTE_CLASSES)
    assert loaded.targets["potassium"].units == "mmol/L"

    signals, truth = synthesize(600, seed=2, segments_per_patient=3)
    ds = ShardDataset(root)
    for i in (0, 300, 599):
        item = ds[i]
        assert str(item["signal"].dtype) == "torch.int16" and tuple(item["signal"].shape) == (12, 5000)
        np.testing.assert_array_equal(item["signal"].numpy(), to_int16_microvolts(signals[i]))
        assert item["lead_mask"].all()
        assert item["patient_id"] == f"synth-{i // 3:06d}" and item["record_id"] == f"synth-{i // 3:06d}-{i % 3:02d}"
    potassium = ds.target_array("potassium")[:, 0]
    np.testing.assert_allclose(potassium, truth["potassium_mmol_l"])
    np.testing.assert_array_equal(ds.target_array("hyperkalemia")[:, 0], truth["potassium_mmol_l"] > 5.5)
    np.testing.assert_array_equal(ds.target_array("electrolyte").argmax(1), truth["electrolyte_class"])
    labs = ds.target_array("labs")
    missing = np.isnan(labs)
    assert 0.65 < missing.mean() < 0.75
    expected = np.stack([truth[key] for key in lab_keys()], axis=1)
    np.testing.assert_allclose(labs[~missing], expected[~missing])
    np.testing.assert_array_equal(ds[5]["target_masks"]["labs"].numpy(), ~missing[5])
    assert ds[5]["target_masks"]["potassium"].all()

    splits = ShardDataModule(str(root), val_fraction=0.2, test_fraction=0.2).split_indices()
    patients = ds.patient_ids()
    seen: dict[str, str] = {}
    for split, idx in splits.items():
        assert len(idx) > 0
        for pid in patients[idx]:
            assert seen.setdefault(pid, split) == split, f"{pid} is in {seen[pid]} and {split}"
    assert sum(len(idx) for idx in splits.values()) == 600 and len(seen) == 200
    ds.close()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lab_missing_fraction"):
        write_synthetic_shards(tmp_path, 10, lab_missing_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="fs"):
        synthesize(2, fs=100.0)
