"""Physiology-shaped synthetic 12-lead ECGs with known serum potassium, lab values and electrolyte classes.

No open ECG data set carries potassium or lab values, so scale tests, benchmarks and tests of task heads use these
signals, whose ground truth is known by construction. Each beat is a sum of Gaussian waves (P, Q, R, S, an ST
component, T, U) in the spirit of McSharry et al. (IEEE TBME 2003), each wave with a 3-D cardiac dipole direction that
is projected onto the 12 lead vectors, so the inter-lead relations hold (III = II - I, aVR = -(I + II) / 2, ...).
The serum electrolytes change the waveform as the clinical literature describes (Diercks et al., J Emerg Med 2004;
Wald, Emerg Med Clin N Am 2006):

- potassium > 5.5 mmol/L: taller, narrower, symmetric ("tented") T waves; above ~6.5 the P wave flattens and
  disappears, the PR interval lengthens and the QRS widens;
- potassium < 3.5 mmol/L: flatter T waves, ST depression and a prominent U wave that outgrows the T wave;
- calcium: hypocalcaemia lengthens the ST segment (a later T wave, longer QT), hypercalcaemia shortens it;
- creatinine: no waveform effect; correlated with potassium, as in renal failure;
- sodium, haemoglobin, glucose, magnesium: deliberately no effect (negative controls, drawn from their own random
  stream), so a model that predicts them better than chance has found a leak.

Every effect is a smooth, monotonic function of the lab value, so a network can regress it. The noise is realistic in
kind (baseline wander < 0.5 Hz, 50 or 60 Hz mains hum, white noise on each recorded lead) but the model has no
arrhythmias beyond sinus rate variability, no sine-wave pattern and no conduction blocks. docs/synthetic.md has the
details, the lab table and an example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ecgfm.data.shards import Manifest, ShardWriter, TargetSpec, to_int16_microvolts
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES

#: Segments drawn from one set of random streams: synthesize(n) is a prefix of synthesize(m) for m > n, and the
#: shards hold exactly what synthesize returns for the same seed.
BLOCK = 256

HYPOKALEMIA_BELOW = 3.5  # mmol/L
HYPERKALEMIA_ABOVE = 5.5  # mmol/L
HYPONATREMIA_BELOW = 135.0  # mmol/L
ELECTROLYTE_CLASSES: tuple[str, ...] = ("normal", "hypokalemia", "hyperkalemia", "hyponatremia")

#: Serum potassium: a mixture so that hypo-, normo- and hyperkalaemia all occur (weight, mean, sd), clipped.
POTASSIUM: dict[str, Any] = {
    "unit": "mmol/L",
    "reference": (3.5, 5.5),
    "mixture": ((0.6, 4.3, 0.4), (0.2, 3.0, 0.35), (0.2, 6.3, 0.75)),
    "clip": (2.0, 8.0),
}

#: The lab values stored in the ``labs`` target, in this order. ``distribution`` is ("normal", mean, sd) or
#: ("lognormal", median, sigma), clipped to ``clip``; ``linked`` says whether an ECG carries information about it.
SYNTHETIC_LABS: dict[str, dict[str, Any]] = {
    "calcium": {
        "unit": "mmol/L",
        "reference": (2.15, 2.55),
        "distribution": ("normal", 2.35, 0.22),
        "clip": (1.5, 3.3),
        "linked": True,
        "effect": "total calcium: low lengthens the ST segment and QT, high shortens them",
    },
    "creatinine": {
        "unit": "µmol/L",
        "reference": (60.0, 110.0),
        "distribution": ("lognormal", 85.0, 0.3),
        "clip": (30.0, 1200.0),
        "linked": True,
        "effect": "none directly; log-creatinine rises 0.35 per mmol/L of potassium (renal failure)",
    },
    "sodium": {
        "unit": "mmol/L",
        "reference": (135.0, 145.0),
        "distribution": ("normal", 139.0, 4.5),
        "clip": (115.0, 160.0),
        "linked": False,
        "effect": "none (negative control)",
    },
    "hemoglobin": {
        "unit": "g/dL",
        "reference": (12.0, 16.0),
        "distribution": ("normal", 13.5, 1.8),
        "clip": (5.0, 20.0),
        "linked": False,
        "effect": "none (negative control)",
    },
    "glucose": {
        "unit": "mmol/L",
        "reference": (3.9, 7.8),
        "distribution": ("lognormal", 5.8, 0.25),
        "clip": (2.0, 30.0),
        "linked": False,
        "effect": "none (negative control)",
    },
    "magnesium": {
        "unit": "mmol/L",
        "reference": (0.7, 1.0),
        "distribution": ("normal", 0.85, 0.12),
        "clip": (0.3, 1.6),
        "linked": False,
        "effect": "none (negative control)",
    },
}
CREATININE_LOG_PER_POTASSIUM = 0.35

# Random streams, each seeded by (seed, stream, block): unlinked labs never share a stream with the waveform.
_WAVE, _NOISE, _LABS, _MISSING, _ANATOMY = 1, 2, 3, 4, 5

# Lead vectors, x = patient's left, y = inferior, z = anterior. Limb leads lie in the frontal plane (I at 0 deg,
# II at 60 deg); III, aVR, aVL and aVF are derived from I and II as an electrocardiograph does. The chest leads lie
# in the horizontal plane, from V6 (left, 0 deg) to V1 (right of the sternum, 115 deg), closer to the heart (gain).
_CHEST_ANGLES = np.deg2rad([115.0, 95.0, 75.0, 55.0, 30.0, 0.0])
_CHEST_GAINS = np.array([1.2, 1.7, 1.8, 1.8, 1.7, 1.4])
_RECORDED_LEADS = np.array(
    [[1.0, 0.0, 0.0], [0.5, np.sqrt(3) / 2, 0.0]]
    + [[g * np.cos(a), 0.0, g * np.sin(a)] for a, g in zip(_CHEST_ANGLES, _CHEST_GAINS, strict=True)],
    dtype=np.float32,
)  # I, II, V1..V6
_RECORDED_SLOTS = [STANDARD_LEADS.index(name) for name in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")]

# Waves of one beat and their mean dipole directions (normalised below); amplitudes and timing are set in _block.
_WAVES = ("P", "Q", "R", "S", "ST", "T", "U")
_DIRECTIONS = np.array(
    [
        [0.55, 0.80, 0.20],  # P: atria, leftward and inferior
        [-0.55, -0.25, 0.80],  # Q: septum, rightward and anterior (q in I and V6, r in V1)
        [0.62, 0.72, -0.15],  # R: left ventricle, leftward, inferior, slightly posterior
        [-0.45, -0.35, -0.82],  # S: basal segments, rightward, superior, posterior
        [0.68, 0.62, 0.40],  # ST: along the T wave (negative amplitude = depression)
        [0.68, 0.62, 0.40],  # T: leftward, inferior, anterior (upright in I, II, V2-V6)
        [0.68, 0.62, 0.40],  # U: follows the T wave
    ]
)
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)
_PRE_S, _POST_S = 0.36, 0.76  # the beat template spans R - 0.36 s .. R + 0.76 s
_MAX_HR = 110.0


def _softplus(x: np.ndarray, sharpness: float = 3.0) -> np.ndarray:
    """A smooth ramp: ~0 below 0, ~x above; used so each effect sets in gradually, not at a threshold."""
    return np.logaddexp(0.0, sharpness * x) / sharpness


def _draw_lab(rng: np.random.Generator, spec: dict[str, Any], size: int) -> np.ndarray:
    kind, centre, spread = spec["distribution"]
    z = rng.standard_normal(size)
    values = centre + spread * z if kind == "normal" else centre * np.exp(spread * z)
    return np.clip(values, *spec["clip"])


def _anatomy(seed: int, patients: np.ndarray) -> dict[str, np.ndarray]:
    """Per-patient traits (axis, amplitudes, PR, QRS width), shared by all segments of one patient."""
    out: dict[str, np.ndarray] = {}
    for block in np.unique(patients // BLOCK):
        rng = np.random.default_rng([seed, _ANATOMY, int(block)])
        traits = {
            "axis": np.deg2rad(np.clip(rng.normal(0.0, 25.0, BLOCK), -70.0, 70.0)),  # frontal rotation
            "rotation": np.deg2rad(rng.normal(0.0, 12.0, BLOCK)),  # horizontal rotation (transition zone)
            "scale": rng.lognormal(0.0, 0.2, BLOCK),  # body habitus: all waves
            "wave_scale": rng.lognormal(0.0, 0.15, (BLOCK, len(_WAVES))),
            "jitter": rng.normal(0.0, 0.12, (BLOCK, len(_WAVES), 3)),  # wave directions
            "pr": np.clip(rng.normal(0.155, 0.018, BLOCK), 0.11, 0.21),  # P peak to R peak, s
            "qrs": np.clip(rng.normal(1.0, 0.08, BLOCK), 0.8, 1.25),  # QRS width factor
        }
        selected = patients // BLOCK == block
        for key, value in traits.items():
            out.setdefault(key, np.empty((len(patients), *value.shape[1:])))
            out[key][selected] = value[patients[selected] % BLOCK]
    return out


def _wave_directions(anatomy: dict[str, np.ndarray]) -> np.ndarray:
    """Unit dipole direction of each wave per segment [n, 7, 3], rotated by the patient's electrical axis."""
    d = _DIRECTIONS[None] + anatomy["jitter"]
    a, b = anatomy["axis"][:, None], anatomy["rotation"][:, None]
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    x, y = x * np.cos(a) - y * np.sin(a), x * np.sin(a) + y * np.cos(a)  # frontal plane, + toward aVF
    x, z = x * np.cos(b) - z * np.sin(b), x * np.sin(b) + z * np.cos(b)  # horizontal plane
    d = np.stack([x, y, z], axis=-1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def _noise_basis(fs: float, n_samples: int) -> np.ndarray:
    """sin/cos at 0.05..0.45 Hz (baseline wander) and at 50 and 60 Hz (mains hum): [22, T] float32."""
    t = np.arange(n_samples) / fs
    freqs = [*np.arange(0.05, 0.46, 0.05), 50.0, 60.0]
    rows = [f(2 * np.pi * freq * t) for freq in freqs for f in (np.sin, np.cos)]
    return np.asarray(rows, dtype=np.float32)


def _block(
    seed: int, block: int, n: int, fs: float, n_samples: int, segments_per_patient: int, out: np.ndarray
) -> dict[str, np.ndarray]:
    """Fill ``out`` [n, 12, T] with segments block*BLOCK .. block*BLOCK + n - 1; return their ground truth.

    Every per-segment parameter is drawn for the whole block, so a shorter n gives a prefix of the same data.
    """
    wave = np.random.default_rng([seed, _WAVE, block])
    first = block * BLOCK
    patients = (first + np.arange(n)) // segments_per_patient

    # Record-level physiology (the waveform stream).
    weights, means, sds = np.array(POTASSIUM["mixture"]).T
    component = np.searchsorted(np.cumsum(weights), wave.random(BLOCK) * weights.sum())
    k = np.clip(means[component] + sds[component] * wave.standard_normal(BLOCK), *POTASSIUM["clip"])[:n]
    ca = _draw_lab(wave, SYNTHETIC_LABS["calcium"], BLOCK)[:n]
    hr = wave.uniform(50.0, _MAX_HR, BLOCK)[:n]
    t_scale = wave.lognormal(0.0, 0.08, BLOCK)[:n]  # T amplitude varies between recordings of one patient
    resp_f = wave.uniform(0.15, 0.35, BLOCK)[:n]
    resp_phase = wave.uniform(0.0, 2 * np.pi, BLOCK)[:n]
    first_beat = wave.random(BLOCK)[:n]
    max_beats = int(np.ceil((n_samples / fs + _PRE_S + _POST_S) * _MAX_HR / 60.0 / 0.9)) + 2
    beat_noise = wave.standard_normal((BLOCK, max_beats))[:n]
    anatomy = _anatomy(seed, patients)

    # Wave timing (s from the R peak), widths and amplitudes; each a smooth function of K and Ca.
    zero = np.zeros_like(k)
    rr = 60.0 / hr
    sqrt_rr = np.sqrt(rr)
    widen = anatomy["qrs"] * (1.0 + 0.4 * _softplus(k - 6.5))  # QRS widening above ~6.5
    p_delay = anatomy["pr"] + 0.035 * _softplus(k - 6.0)  # PR prolongation above ~6
    t_peak = (0.27 - 0.10 * (ca - 2.35)) * sqrt_rr  # calcium moves the T wave (Bazett-like rate scaling)
    j_point = 0.045 * widen
    st_len = np.maximum(t_peak - j_point, 0.04)
    t_right = 0.042 * np.exp(-0.13 * (k - 4.3)) * sqrt_rr  # narrower T as K rises
    t_left = t_right * (1.0 + 0.6 / (1.0 + np.exp((k - 5.3) / 0.4)))  # asymmetric T, symmetric when peaked
    hypo = _softplus(3.6 - k)  # grows below ~3.6
    centres = np.stack(
        [-p_delay, -0.022 * widen, zero, 0.026 * widen, j_point + 0.45 * st_len, t_peak, t_peak + 0.18 * sqrt_rr],
        axis=1,
    )
    p_sigma = 0.0125 * (1.0 + 0.25 * _softplus(k - 6.0))
    sigma = np.stack([p_sigma, 0.008 * widen, 0.0095 * widen, 0.010 * widen, 0.35 * st_len, t_right, zero + 0.04], 1)
    sigma_left = sigma.copy()
    sigma_left[:, 5] = t_left
    amplitude = np.stack(
        [
            0.16 / (1.0 + np.exp((k - 7.0) / 0.3)),  # P flattens and vanishes above ~6.5-7
            zero + 0.18,
            zero + 1.4,
            zero + 0.45,
            -0.13 * hypo,  # ST depression in hypokalaemia
            0.32 * np.exp(0.40 * (k - 4.3)) * t_scale,  # T height rises smoothly with K
            0.035 * np.exp(-0.25 * (k - 4.3)) + 0.11 * hypo,  # U wave grows as K falls
        ],
        axis=1,
    )
    amplitude *= anatomy["scale"][:, None] * anatomy["wave_scale"]

    # One beat template per segment [n, W, 3]: Gaussians [n, 7, W] times amplitude-weighted directions [n, 7, 3].
    pre, post = int(round(_PRE_S * fs)), int(round(_POST_S * fs))
    tau = ((np.arange(pre + post) - pre) / fs).astype(np.float32)[None, None, :]
    offset = tau - centres[..., None].astype(np.float32)
    width = np.where(offset < 0, sigma_left[..., None].astype(np.float32), sigma[..., None].astype(np.float32))
    gauss = np.exp(np.float32(-0.5) * (offset / width) ** 2)
    weighted = (amplitude[..., None] * _wave_directions(anatomy)).astype(np.float32)
    template = np.matmul(gauss.transpose(0, 2, 1), weighted)

    # Beats: RR intervals with respiratory sinus arrhythmia and random variability; the template is added at each R
    # peak (a loop over segments and beats; every operation inside is a slice of ~560 samples).
    margin = pre + post
    length = n_samples + 2 * margin
    dipole = np.zeros((n, length, 3), np.float32)
    r_time = -_POST_S + first_beat * rr
    for b in range(max_beats):
        start = np.rint(r_time * fs).astype(np.int64) - pre + margin
        start = np.clip(start, 0, n_samples + margin)  # beats past the end land in the discarded margin
        for i in range(n):
            dipole[i, start[i] : start[i] + pre + post] += template[i]
        r_time = r_time + rr * (
            1.0 + 0.04 * np.sin(2 * np.pi * resp_f * r_time + resp_phase) + 0.015 * beat_noise[:, b]
        )
    dipole = dipole[:, margin : margin + n_samples]

    # Recorded leads: projection + baseline wander + mains hum + white noise; then the derived limb leads.
    noise = np.random.default_rng([seed, _NOISE, block])
    n_rec = len(_RECORDED_SLOTS)
    coef = (noise.standard_normal((BLOCK, n_rec, 18)) * noise.uniform(0.02, 0.25, (BLOCK, 1, 1)) / 3.0)[:n]
    hum_amp = (noise.uniform(0.0, 0.02, (BLOCK, 1)) * noise.uniform(0.3, 1.0, (BLOCK, n_rec)))[:n]
    hum_phase = noise.uniform(0.0, 2 * np.pi, (BLOCK, 1))[:n]
    hum_60 = (noise.random(BLOCK) < 0.5)[:n, None]
    white = noise.uniform(0.005, 0.025, BLOCK)[:n].astype(np.float32)
    pool = noise.standard_normal(max(1 << 17, 4 * n_samples), dtype=np.float32)  # cut at random offsets (fast)
    starts = noise.integers(0, len(pool) - n_samples, (n, n_rec))
    hum = np.zeros((n, n_rec, 4))
    hum[..., 0] = np.where(hum_60, 0, hum_amp * np.cos(hum_phase))
    hum[..., 1] = np.where(hum_60, 0, hum_amp * np.sin(hum_phase))
    hum[..., 2] = np.where(hum_60, hum_amp * np.cos(hum_phase), 0)
    hum[..., 3] = np.where(hum_60, hum_amp * np.sin(hum_phase), 0)
    basis = _noise_basis(fs, n_samples)
    recorded = np.matmul(np.concatenate([coef, hum], axis=2).astype(np.float32), basis)
    recorded += np.matmul(_RECORDED_LEADS, dipole.transpose(0, 2, 1))
    windows = np.lib.stride_tricks.sliding_window_view(pool, n_samples)[starts]
    windows *= white[:, None, None]
    recorded += windows

    lead = {name: STANDARD_LEADS.index(name) for name in STANDARD_LEADS}
    out[:, _RECORDED_SLOTS] = recorded
    i, ii = recorded[:, 0], recorded[:, 1]
    np.subtract(ii, i, out=out[:, lead["III"]])
    np.add(i, ii, out=out[:, lead["aVR"]])
    out[:, lead["aVR"]] *= -0.5
    np.multiply(ii, -0.5, out=out[:, lead["aVL"]])
    out[:, lead["aVL"]] += i
    np.multiply(i, -0.5, out=out[:, lead["aVF"]])
    out[:, lead["aVF"]] += ii

    # Lab values: creatinine follows potassium; the unlinked labs come from their own stream.
    labs_rng = np.random.default_rng([seed, _LABS, block])
    truth: dict[str, np.ndarray] = {"potassium_mmol_l": k, "calcium_mmol_l": ca}
    creatinine = SYNTHETIC_LABS["creatinine"]
    _, median, spread = creatinine["distribution"]
    z = labs_rng.standard_normal(BLOCK)[:n]
    log_creat = np.log(median) + spread * z + CREATININE_LOG_PER_POTASSIUM * (k - 4.3)
    truth["creatinine_umol_l"] = np.clip(np.exp(log_creat), *creatinine["clip"])
    for name in ("sodium", "hemoglobin", "glucose", "magnesium"):
        spec = SYNTHETIC_LABS[name]
        truth[f"{name}_{_unit_key(spec['unit'])}"] = _draw_lab(labs_rng, spec, BLOCK)[:n]
    truth = {key: value.astype(np.float32) for key, value in truth.items()}
    truth["heart_rate_bpm"] = hr.astype(np.float32)
    truth["electrolyte_class"] = electrolyte_class(truth["potassium_mmol_l"], truth["sodium_mmol_l"])
    truth["patient_index"] = patients.astype(np.int64)
    return truth


def _unit_key(unit: str) -> str:
    return unit.replace("µ", "u").replace("/", "_").lower()


def lab_keys() -> list[str]:
    """Ground-truth keys of the labs in SYNTHETIC_LABS order, e.g. ``calcium_mmol_l``, ``creatinine_umol_l``."""
    return [f"{name}_{_unit_key(spec['unit'])}" for name, spec in SYNTHETIC_LABS.items()]


def electrolyte_class(potassium: np.ndarray, sodium: np.ndarray) -> np.ndarray:
    """Class index per segment: potassium decides first (hypo < 3.5, hyper > 5.5), then sodium < 135, else normal."""
    k, na = np.asarray(potassium), np.asarray(sodium)
    classes = np.zeros(k.shape, np.int64)
    classes[(na < HYPONATREMIA_BELOW)] = 3
    classes[k > HYPERKALEMIA_ABOVE] = 2
    classes[k < HYPOKALEMIA_BELOW] = 1
    return classes


def synthesize(
    n: int, seed: int = 0, fs: float = STANDARD_FS, n_samples: int = STANDARD_N_SAMPLES, segments_per_patient: int = 1
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` synthetic 12-lead segments (float32 mV [n, 12, T], STANDARD_LEADS order) and their ground truth.

    The truth dict holds float32 ``potassium_mmol_l``, the labs (:func:`lab_keys`) and ``heart_rate_bpm``, int64
    ``electrolyte_class`` (index into ELECTROLYTE_CLASSES) and ``patient_index``. Consecutive groups of
    ``segments_per_patient`` segments share a patient's electrical axis and wave amplitudes; the labs differ.
    Deterministic for a seed; a smaller n gives a prefix of a larger one.
    """
    if n < 0 or n_samples < 1 or segments_per_patient < 1:
        raise ValueError(
            f"need n >= 0, n_samples >= 1, segments_per_patient >= 1; got {n}, {n_samples}, {segments_per_patient}"
        )
    if fs < 150.0:
        raise ValueError(f"fs={fs} Hz is too low for the 60 Hz mains hum and the QRS; use at least 150 Hz")
    signals = np.empty((n, len(STANDARD_LEADS), n_samples), np.float32)
    parts: list[dict[str, np.ndarray]] = []
    for block, start in enumerate(range(0, n, BLOCK)):
        m = min(BLOCK, n - start)
        parts.append(_block(seed, block, m, fs, n_samples, segments_per_patient, signals[start : start + m]))
    if not parts:
        empty = {key: np.zeros(0, np.float32) for key in ["potassium_mmol_l", *lab_keys(), "heart_rate_bpm"]}
        return signals, {**empty, "electrolyte_class": np.zeros(0, np.int64), "patient_index": np.zeros(0, np.int64)}
    return signals, {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def synthetic_target_specs() -> dict[str, TargetSpec]:
    """The targets ``write_synthetic_shards`` stores, as they appear in manifest.json."""
    return {
        "potassium": TargetSpec("regression", ["potassium"], POTASSIUM["unit"]),
        "labs": TargetSpec("regression", list(SYNTHETIC_LABS), ", ".join(s["unit"] for s in SYNTHETIC_LABS.values())),
        "electrolyte": TargetSpec("multiclass", list(ELECTROLYTE_CLASSES)),
        "hyperkalemia": TargetSpec("binary", ["hyperkalemia"]),
    }


def write_synthetic_shards(
    out: str | Path,
    n_segments: int,
    seed: int = 0,
    segments_per_shard: int = 1024,
    segments_per_patient: int = 4,
    lab_missing_fraction: float = 0.7,
    progress: bool = True,
) -> Manifest:
    """Write synthetic segments as v1 shards + manifest.json, BLOCK segments at a time (bounded memory).

    The shards hold exactly ``synthesize(n_segments, seed, segments_per_patient=...)`` as int16 µV, with targets
    ``potassium`` (mmol/L), ``labs`` (SYNTHETIC_LABS, NaN = missing), ``electrolyte`` (one-hot over
    ELECTROLYTE_CLASSES: the shard format stores one column per name) and ``hyperkalemia`` (K > 5.5).

    Args:
        out: folder for ``shard-NNNNN.h5`` and ``manifest.json`` (created if needed).
        n_segments: how many 10-s segments to write.
        seed: the random seed; the same seed writes the same data.
        segments_per_shard: segments per HDF5 file.
        segments_per_patient: consecutive segments that share a patient id (and the patient's axis and amplitudes).
        lab_missing_fraction: chance that each lab value is missing (NaN), as lab panels are in practice; potassium
            and the classes are never missing.
        progress: show a progress bar.
    """
    if n_segments < 1 or segments_per_shard < 1 or segments_per_patient < 1:
        raise ValueError("n_segments, segments_per_shard and segments_per_patient must be at least 1")
    if not 0.0 <= lab_missing_fraction <= 1.0:
        raise ValueError(f"lab_missing_fraction must be in [0, 1], got {lab_missing_fraction}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = synthetic_target_specs()
    manifest = Manifest(
        targets=targets,
        source={
            "synthetic": "ecgfm.data.synthetic",
            "seed": seed,
            "segments_per_patient": segments_per_patient,
            "lab_missing_fraction": lab_missing_fraction,
        },
    )
    lead_mask = np.ones(len(STANDARD_LEADS), bool)
    signals = np.empty((BLOCK, len(STANDARD_LEADS), STANDARD_N_SAMPLES), np.float32)
    writer: ShardWriter | None = None
    columns = TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    try:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(f"synthesizing {out}", total=n_segments)
            for block, first in enumerate(range(0, n_segments, BLOCK)):
                m = min(BLOCK, n_segments - first)
                truth = _block(seed, block, m, STANDARD_FS, STANDARD_N_SAMPLES, segments_per_patient, signals[:m])
                int16 = to_int16_microvolts(signals[:m])
                labs = np.stack([truth[key] for key in lab_keys()], axis=1)
                missing = np.random.default_rng([seed, _MISSING, block]).random((BLOCK, labs.shape[1]))[:m]
                labs[missing < lab_missing_fraction] = np.nan
                onehot = np.eye(len(ELECTROLYTE_CLASSES), dtype=np.float32)[truth["electrolyte_class"]]
                k = truth["potassium_mmol_l"]
                for i in range(m):
                    if writer is None:
                        writer = ShardWriter(out / f"shard-{len(manifest.shards):05d}.h5", targets)
                    patient = int(truth["patient_index"][i])
                    visit = (first + i) % segments_per_patient
                    values = {
                        "potassium": k[i : i + 1],
                        "labs": labs[i],
                        "electrolyte": onehot[i],
                        "hyperkalemia": np.float32([k[i] > HYPERKALEMIA_ABOVE]),
                    }
                    writer.append(
                        int16[i], lead_mask, f"synth-{patient:06d}-{visit:02d}", f"synth-{patient:06d}", 0, values
                    )
                    if len(writer) >= segments_per_shard:
                        _finish(writer, manifest)
                        writer = None
                bar.advance(task, m)
            if writer is not None:
                _finish(writer, manifest)
                writer = None
    finally:
        if writer is not None:
            writer.abort()
    manifest.save(out)
    return manifest


def _finish(writer: ShardWriter, manifest: Manifest) -> None:
    n = len(writer)
    manifest.shards.append({"path": writer.close().name, "n_segments": n, "checksums": writer.checksums})


__all__ = [
    "ELECTROLYTE_CLASSES",
    "POTASSIUM",
    "SYNTHETIC_LABS",
    "electrolyte_class",
    "lab_keys",
    "synthesize",
    "synthetic_target_specs",
    "write_synthetic_shards",
]
