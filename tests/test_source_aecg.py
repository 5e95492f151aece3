"""The HL7 aECG reader on real recordings written as aECG files (digits at a scale, origin, µV and mV), the time
sequence's increment as the rate, median beats, non-ECG sequences and malformed files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from lxml import etree

from ecgfm.commands import main
from ecgfm.data.shards import Manifest
from ecgfm.data.sources import AecgXmlReader, RecordError
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

V3 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
CODES = {name: f"MDC_ECG_LEAD_{name.upper()}" for name in STANDARD_LEADS}
SHUFFLED = ["V1", "I", "aVF", "II", "V6", "III", "aVR", "V2", "aVL", "V3", "V4", "V5"]


@pytest.fixture(scope="module")
def source(test_data: Path):
    """A real 12-lead, 500 Hz, 10-s recording (PTB-XL, from the Challenge set) in mV."""
    record = SOURCES.create("challenge").read(test_data / "cinc2021" / "HR06001")
    assert record.lead_names == STANDARD_LEADS and record.fs == 500
    return record


def el(parent: etree._Element, tag: str, **attrs: object) -> etree._Element:
    return etree.SubElement(parent, f"{{{V3}}}{tag}", {k: str(v) for k, v in attrs.items()})


def sequence(sequence_set: etree._Element, code: str, xsi_type: str) -> etree._Element:
    seq = el(el(sequence_set, "component"), "sequence")
    el(seq, "code", code=code, codeSystem="2.16.840.1.113883.6.24", codeSystemName="MDC")
    value = el(seq, "value")
    value.set(f"{{{XSI}}}type", xsi_type)
    return value


def add_series(
    parent: etree._Element,
    code: str,
    signal: np.ndarray,
    names: list[str],
    *,
    tag: str = "series",
    increment: tuple[str, str] | None = ("0.002", "s"),
    time_code: str = "TIME_ABSOLUTE",
    scale: tuple[float, str] = (5.0, "uV"),
    origin: tuple[float, str] = (0.0, "uV"),
    units: dict[str, str] | None = None,
    extra: list[tuple[str, str]] = (),
) -> etree._Element:
    """A series of ``signal`` (mV [L, T]) as digits = (value - origin) / scale per lead, named by MDC code."""
    series = el(parent, tag)
    el(series, "code", code=code, codeSystem="2.16.840.1.113883.5.4")
    sequence_set = el(el(series, "component"), "sequenceSet")
    if increment is not None:
        time = sequence(sequence_set, time_code, "GLIST_TS" if time_code == "TIME_ABSOLUTE" else "GLIST_PQ")
        el(time, "head", value="20021122091000.000" if time_code == "TIME_ABSOLUTE" else "0", unit="s")
        el(time, "increment", value=increment[0], unit=increment[1])
    to_unit = {"uV": 1000.0, "mV": 1.0}
    for name, lead in [*zip(names, signal, strict=True), *((code, signal[0]) for code, _ in extra)]:
        code_value = CODES.get(name, name)
        unit = (units or {}).get(name, dict(extra).get(name, scale[1]))
        value = sequence(sequence_set, code_value, "SLIST_PQ")
        el(value, "origin", value=origin[0], unit=unit if unit not in to_unit else origin[1])
        el(value, "scale", value=scale[0], unit=unit)
        factor = to_unit.get(scale[1], 1000.0)
        digits = np.rint((lead * factor - origin[0] * factor / to_unit.get(origin[1], 1000.0)) / scale[0])
        el(value, "digits").text = " ".join(str(int(d)) for d in digits)
    return series


def write_aecg(path: Path, signal: np.ndarray, names: list[str] = SHUFFLED, median: bool = True, **options) -> Path:
    """An aECG document: the trial subject, a rhythm series and (in its derivation) the representative beats."""
    root = etree.Element(f"{{{V3}}}AnnotatedECG", nsmap={None: V3, "xsi": XSI})
    el(root, "id", root="728989ec-b8ba-4d2a-9c9c-111111111111")
    el(root, "code", code="93000", codeSystem="2.16.840.1.113883.6.12")
    assignment = el(el(el(el(root, "componentOf"), "timepointEvent"), "componentOf"), "subjectAssignment")
    subject = el(el(assignment, "subject"), "trialSubject")
    el(subject, "id", root="2.16.840.1.113883.3.1", extension="SUBJ-0042")
    person = el(subject, "subjectDemographicPerson")
    el(person, "administrativeGenderCode", code="F", codeSystem="2.16.840.1.113883.5.1")
    rows = [STANDARD_LEADS.index(n) if n in STANDARD_LEADS else 0 for n in names]
    series = add_series(el(root, "component"), "RHYTHM", signal[rows], names, **options)
    if median:
        add_series(el(series, "derivation"), "REPRESENTATIVE_BEAT", signal[rows, 1000:1600], names, tag="derivedSeries")
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))
    return path


def test_leads_by_mdc_code_in_standard_order_at_the_increments_rate(source, tmp_path: Path) -> None:
    record = AecgXmlReader().read(write_aecg(tmp_path / "a.xml", source.signal))
    assert record.lead_names == STANDARD_LEADS and record.fs == pytest.approx(500.0)
    assert record.signal.shape == (12, 5000) and record.signal.dtype == np.float32
    np.testing.assert_allclose(record.signal, source.signal, atol=0.0025 + 1e-6)  # 5 µV digits: half a step
    assert record.patient_id == "SUBJ-0042" and record.record_id == "a" and record.metadata["sex"] == "F"
    assert record.metadata["units"] == ["uV"] * 12 and record.metadata["warnings"] == []


def test_millivolt_scale_with_an_origin_and_a_relative_time_in_ms(source, tmp_path: Path) -> None:
    half = source.signal[:, ::2]  # 250 Hz
    path = write_aecg(
        tmp_path / "mv.xml", half, increment=("4", "ms"), time_code="TIME_RELATIVE", scale=(0.01, "mV"),
        origin=(100.0, "uV"), median=False,
    )  # fmt: skip
    record = AecgXmlReader().read(path)
    assert record.fs == pytest.approx(250.0) and record.signal.shape == (12, 2500)
    np.testing.assert_allclose(record.signal, half, atol=0.005 + 1e-6)  # 10 µV digits, 0.1 mV origin
    assert record.metadata["units"] == ["mV"] * 12


def test_eight_leads_get_the_limb_leads_derived_and_median_beats_by_option(source, tmp_path: Path) -> None:
    eight = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    path = write_aecg(tmp_path / "eight.xml", source.signal, names=eight)
    record = AecgXmlReader().read(path)
    assert record.lead_names == STANDARD_LEADS
    lead = dict(zip(record.lead_names, record.signal, strict=True))
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-6)
    np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=1e-6)
    np.testing.assert_allclose(lead["aVL"], lead["I"] - lead["II"] / 2, atol=1e-6)
    np.testing.assert_allclose(lead["aVF"], lead["II"] - lead["I"] / 2, atol=1e-6)
    assert record.metadata["warnings"] == ["leads III aVR aVL aVF derived from I and II (not stored in the file)"]
    median = AecgXmlReader(waveform="median").read(path)
    assert median.signal.shape == (12, 600)
    np.testing.assert_allclose(median.signal[1], source.signal[1, 1000:1600], atol=0.0025 + 1e-6)


def malformed(source, folder: Path) -> dict[str, str]:
    """Broken aECG files written into ``folder``: file name -> the reason the reader must give."""
    good = write_aecg(folder / "good.xml", source.signal, median=False).read_bytes()
    (folder / "truncated.xml").write_bytes(good[: len(good) // 3])
    write_aecg(folder / "no_rate.xml", source.signal, increment=None)
    write_aecg(folder / "bad_increment.xml", source.signal, increment=("0.002", "beats"))
    write_aecg(folder / "mmhg_lead.xml", source.signal, units={"V1": "mmHg"})
    text = good.decode()
    start = text.index("<digits>") + len("<digits>")
    (folder / "bad_digits.xml").write_text(text[:start] + "12 abc " + text[start:])
    (folder / "short_lead.xml").write_text(text[:start] + text[text.index(" ", start) + 1 :])
    (folder / "muse.xml").write_text("<RestingECG/>")
    return {
        "truncated.xml": "malformed XML",
        "no_rate.xml": "no TIME_ABSOLUTE or TIME_RELATIVE sequence, so no sampling rate",
        "bad_increment.xml": "time increment unit 'beats' is not one of s, ms, us",
        "mmhg_lead.xml": "lead V1 (MDC_ECG_LEAD_V1) is in 'mmHg', not a voltage",
        "bad_digits.xml": "sequence MDC_ECG_LEAD_V1: <digits> holds something that is not a number",
        "short_lead.xml": "lead sequences hold different numbers of samples [4999, 5000]",
        "muse.xml": "is not HL7 v3 <AnnotatedECG>; not an aECG file",
    }


def test_malformed_files_fail_with_a_reason_naming_the_file(source, tmp_path: Path) -> None:
    for name, reason in malformed(source, tmp_path).items():
        with pytest.raises(RecordError) as err:
            AecgXmlReader().read(tmp_path / name)
        message = str(err.value)
        assert message.startswith(str(tmp_path / name)) and reason in message, message
    with pytest.raises(RecordError, match=r"no_median.xml: no REPRESENTATIVE_BEAT series \(found: RHYTHM\)"):
        AecgXmlReader(waveform="median").read(write_aecg(tmp_path / "no_median.xml", source.signal, median=False))


def test_shard_command_lists_bad_files_unknown_leads_and_units(source, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    reasons = malformed(source, folder)
    extra = [("MDC_ECG_LEAD_V7", "uV"), ("MDC_PRESS_BLD_ART", "mm[Hg]")]
    write_aecg(folder / "icu.xml", source.signal, extra=extra)
    out = tmp_path / "out"
    assert main(["shard", "--source", str(folder), "--out", str(out), "--reader", "aecg_xml"]) == 0
    with open(out / "skipped.csv", newline="") as f:
        skipped = {Path(row["record"]).name: row["reason"] for row in csv.DictReader(f)}
    assert set(skipped) == set(reasons)
    for name, reason in reasons.items():
        assert str(folder / name) in skipped[name] and reason in skipped[name]
    with open(out / "warnings.csv", newline="") as f:
        warnings = [(Path(row["record"]).name, row["warning"]) for row in csv.DictReader(f)]
    assert ("icu.xml", "signals not in a voltage ignored: MDC_PRESS_BLD_ART (mm[Hg])") in warnings
    assert ("icu.xml", "non-standard signals ignored: V7") in warnings
    assert Manifest.load(out).n_segments == 2 and Manifest.load(out).targets == {}
