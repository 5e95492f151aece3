"""Reader for EDF, EDF+ and BDF(+) files (Holter, wearable and sleep-lab exports), read with ``pyedflib``.

ECG channels are found by label (``ECG I``, ``EKG II``, ``ECG V1-REF``, ``II``); every other channel (EEG,
respiration, SpO2, an accelerometer) is left out and listed in the record's warnings, as are EDF+ annotations.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import numpy as np

from ecgfm.data.sources.base import Record, RecordError, SourceReader, is_voltage, mv_per_unit
from ecgfm.leads import LeadError, canonical_lead
from ecgfm.leads import lead_aliases as lead_aliases_table
from ecgfm.registry import SOURCES
from ecgfm.resampling import resample

#: File name endings of the files this reader reads (case-insensitive); ``.rec`` is an old EDF name.
EDF_SUFFIXES = (".edf", ".bdf", ".rec")

_PREFIX = re.compile(r"^(?:ecg|ekg)[\s_:.-]+", re.IGNORECASE)  # "ECG I", "EKG_II", "ECG: V1"
_REFERENCE = re.compile(r"[\s_-]+(?:ref|avg|le|ar)$", re.IGNORECASE)  # "ECG V1-REF", "EKG II-AVG"


def edf_lead(label: str, aliases: dict[str, str] | None = None) -> str | None:
    """The standard lead an EDF channel label names (``ECG I`` -> I, ``EKG aVR`` -> aVR, ``ECG V1-REF`` -> V1), or
    None; the user's ``aliases`` are matched against the whole label first, then against the bare lead name."""
    label = label.strip()
    bare = _REFERENCE.sub("", _PREFIX.sub("", label))
    return canonical_lead(label, aliases) or canonical_lead(bare, aliases)


def _edf_kind(path: Path) -> str:
    """``EDF+D`` for a discontinuous EDF+/BDF+ file, else the reserved field's text (``EDF+C``, ``BDF+C``, empty)."""
    try:
        with path.open("rb") as handle:
            header = handle.read(236)
    except OSError:
        return ""
    return header[192:236].decode("ascii", errors="replace").strip()


def _age(reader) -> int | None:
    """Age in whole years at the start of the recording, from the EDF+ birth date; None when either is unknown."""
    try:
        born = reader.getBirthdate(string=False)
        start = reader.getStartdatetime()
    except Exception:  # an EDF (not EDF+) file or an unparseable date: the age is simply unknown
        return None
    if not isinstance(born, datetime) or not isinstance(start, datetime) or born > start:
        return None
    return start.year - born.year - ((start.month, start.day) < (born.month, born.day))


@SOURCES.register("edf")
class EdfReader(SourceReader):
    """Reads the ECG channels of an EDF/EDF+/BDF file into mV, each in its own physical unit (uV, mV or V).

    ECG leads recorded at different rates are resampled to the fastest one, with a warning.

    Args:
        lead_aliases: extra channel names, ``{ECG1: I, ECG2: II}`` or ``"MLII=II"`` (see ``ecgfm.leads``), for
            devices that number their channels instead of naming the lead.
    """

    def __init__(self, lead_aliases: dict[str, str] | list[str] | str | None = None):
        try:
            self.lead_aliases = lead_aliases_table(lead_aliases)
        except LeadError as err:
            raise ValueError(f"edf: {err}") from None

    def find_records(self, root: Path) -> list[Path]:
        """Every ``.edf``, ``.bdf`` and ``.rec`` file under ``root`` (any case), sorted; or ``root`` if it is one."""
        root = Path(root)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in EDF_SUFFIXES and p.is_file())

    def read(self, path: Path) -> Record:
        """Read one file's ECG leads as float32 mV [L, T]; RecordError names the file, and the channel at fault."""
        import pyedflib

        path = Path(path)
        if not path.is_file():
            raise RecordError(f"{path}: file not found")
        try:
            reader = pyedflib.EdfReader(str(path))
        except Exception as exc:  # pyedflib raises OSError with edflib's reason for a damaged or foreign file
            reason = " ".join(str(exc).split())
            raise RecordError(f"{path}: not a readable EDF/EDF+/BDF file ({reason})") from exc
        try:
            return self._read(reader, path)
        finally:
            reader.close()

    def _read(self, reader, path: Path) -> Record:
        """The ECG leads of an open file, converted to mV and brought to one rate."""
        labels = [label.strip() for label in reader.getSignalLabels()]
        warnings: list[str] = []
        ignored: list[str] = []
        leads: list[tuple[int, str, float, float]] = []  # (channel, label, rate, mV per unit)
        for i, label in enumerate(labels):
            unit = reader.getPhysicalDimension(i).strip()
            lead = edf_lead(label, self.lead_aliases)
            if lead is None:
                ignored.append(f"{label or f'channel {i + 1}'} ({unit or 'no unit'})")
                continue
            if not unit:
                raise RecordError(
                    f"{path}: channel {label!r} (lead {lead}) has no physical dimension (expected uV, mV or V)"
                )
            if not is_voltage(unit):
                raise RecordError(
                    f"{path}: channel {label!r} (lead {lead}) is in {unit!r}, not a voltage (expected uV, mV or V)"
                )
            rate = float(reader.getSampleFrequency(i))
            if not rate > 0:
                raise RecordError(f"{path}: channel {label!r} has sampling rate {rate!r} Hz")
            leads.append((i, label, rate, mv_per_unit(unit, path)))
        if not leads:
            raise RecordError(
                f"{path}: no ECG lead among channels {labels} (expected labels such as 'ECG I', 'EKG II', 'V1'; "
                "map others with lead_aliases)"
            )
        first: dict[str, str] = {}
        for _, label, _, _ in leads:
            lead = edf_lead(label, self.lead_aliases)
            if lead in first:
                raise RecordError(f"{path}: channels {first[lead]!r} and {label!r} are both lead {lead}")
            first[lead] = label
        fs = max(rate for _, _, rate, _ in leads)
        seconds = {round(reader.getNSamples()[i] / rate, 3) for i, _, rate, _ in leads}
        if len(seconds) > 1:
            raise RecordError(f"{path}: its ECG channels last different times ({sorted(seconds)} s)")
        rows = []
        for i, label, rate, scale in leads:
            try:
                row = reader.readSignal(i, digital=False).astype(np.float64) * scale
            except Exception as exc:
                raise RecordError(f"{path}: cannot read channel {label!r} ({type(exc).__name__}: {exc})") from exc
            if rate != fs:
                warnings.append(
                    f"channel {label}: {rate:g} Hz resampled to {fs:g} Hz, the rate of the fastest ECG lead"
                )
                row = resample(row, rate, fs)
            rows.append(np.asarray(row, np.float32))
        length = min(len(row) for row in rows)
        if length == 0:
            raise RecordError(f"{path}: its ECG channels hold no samples")
        if ignored:
            warnings.append(f"channels ignored, not an ECG lead: {', '.join(ignored)}")
        if _edf_kind(path).endswith("+D"):
            warnings.append(
                f"{path.name} is discontinuous ({_edf_kind(path)}): its data records are joined without the gaps"
            )
        sex = {"male": "M", "female": "F"}.get(str(reader.getSex() or "").strip().lower())
        patient = str(reader.getPatientCode() or "").strip()
        return Record(
            record_id=path.stem,
            patient_id=patient or path.stem,
            signal=np.stack([row[:length] for row in rows]),
            fs=fs,
            lead_names=tuple(first),
            path=path,
            metadata={
                "age": _age(reader),
                "sex": sex,
                "channels": [label for _, label, _, _ in leads],
                "units": [reader.getPhysicalDimension(i).strip() for i, _, _, _ in leads],
                "source": "edf",
                "warnings": warnings,
            },
        )
