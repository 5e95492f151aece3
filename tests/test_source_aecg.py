"""The HL7 aECG reader on real recordings written as aECG files (digits at a scale, origin, µV and mV), the time
sequence's increment as the rate, median beats, non-ECG sequences and malformed files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from lxml import etree

from ecgfm.bench import record_formats
from ecgfm.bench.record_formats import HL7_V3 as V3
from ecgfm.bench.record_formats import XSI
from ecgfm.bench.record_formats import hl7_element as el
from ecgfm.commands import main
from ecgfm.data.shards import Manifest
from ecgfm.data.sources import AecgXmlReader, RecordError
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

SHUFFLED = ["V1", "I", "aVF", "II", "V6", "III", "aVR", "V2", "aVL", "V3", "V4", "V5"]


@pytest.fixture(scope="module")
def source(test_data: Path):
    """A real 12-lead, 500 Hz, 10-s recording (PTB-XL, from the Challenge set) in mV."""
    record = SOURCES.create("challenge").read(test_data / "cinc2021" / "HR06001")
    assert record.lead_names == STANDARD_LEADS and record.fs == 500
    return record


def write_aecg(
    path: Path,
    signal: np.ndarray,
    names: list[str] = SHUFFLED,
    median: bool = True,
    fs: float = 500.0,
    extra: list[tuple[str, str]] = (),
    **options,
) -> Path:
    """An aECG document of ``signal`` (mV, standard order) with the leads ``names`` in that order, the trial subject
    SUBJ-0042 (F), a rhythm series and (in its derivation) the representative beats; ``extra`` adds sequences
    ``(MDC code, unit)`` holding the first lead's values."""
    rows = [STANDARD_LEADS.index(n) if n in STANDARD_LEADS else 0 for n in names]
    rows += [rows[0]] * len(extra)
    names = [*names, *(code for code, _ in extra)]
    units = {**dict(extra), **options.pop("units", {})}
    median_mv = signal[rows, 1000:1600] if median else None
    return record_formats.write_aecg(
        path, signal[rows], fs, names, median_mv=median_mv, units=units, subject_id="SUBJ-0042", sex="F", **options
    )


def edited(path: Path, edit) -> Path:
    """``path`` after ``edit(root)`` changed its XML tree: how the malformed files are made from well-formed ones."""
    root = etree.fromstring(path.read_bytes())
    edit(root)
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
    return path


def drop_time_sequences(root: etree._Element) -> None:
    for sequence in list(root.iter(f"{{{V3}}}sequence")):
        if sequence.find(f"{{{V3}}}code").get("code") in ("TIME_ABSOLUTE", "TIME_RELATIVE"):
            component = sequence.getparent()
            component.getparent().remove(component)


def set_increment_unit(unit: str):
    def edit(root: etree._Element) -> None:
        for increment in root.iter(f"{{{V3}}}increment"):
            increment.set("unit", unit)

    return edit


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
        tmp_path / "mv.xml", half, fs=250.0, increment_unit="ms", time_code="TIME_RELATIVE", scale=(0.01, "mV"),
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
    edited(write_aecg(folder / "no_rate.xml", source.signal), drop_time_sequences)
    edited(write_aecg(folder / "bad_increment.xml", source.signal), set_increment_unit("beats"))
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


# --- interpretation statements: the multi-label target ``diagnosis`` -------------------------------------------------

MDC = "2.16.840.1.113883.6.24"
STATEMENTS = {
    "stmt_a": ["Sinus rhythm", "Left axis deviation"],
    "stmt_b": ["Sinus rhythm", "Left ventricular hypertrophy", "Abnormal ECG"],
    "stmt_none": [],
}


def add_interpretation(path: Path, statements: list[str], series: str = "RHYTHM") -> Path:
    """Give ``series`` an annotation set as the FDA's aECG guide writes it: a heart-rate measurement, and the
    statements nested in an ``MDC_ECG_INTERPRETATION`` annotation with a comment and a blank statement (neither is
    a statement)."""
    root = etree.fromstring(path.read_bytes())
    target = next(s for s in root.iter(f"{{{V3}}}series", f"{{{V3}}}derivedSeries") if s[0].get("code") == series)
    annotation_set = el(el(target, "subjectOf"), "annotationSet")
    el(annotation_set, "activityTime", value="20021122091000")
    rate = el(el(annotation_set, "component"), "annotation")
    el(rate, "code", code="MDC_ECG_HEART_RATE", codeSystem=MDC)
    el(rate, "value", value="72", unit="bpm").set(f"{{{XSI}}}type", "PQ")
    interpretation = el(el(annotation_set, "component"), "annotation")
    el(interpretation, "code", code="MDC_ECG_INTERPRETATION", codeSystem=MDC)
    texts = [*((s, "STATEMENT") for s in statements), ("Confirmed by Dr. Who", "COMMENT"), ("  ", "STATEMENT")]
    for text, kind in texts if statements else []:
        statement = el(el(interpretation, "component"), "annotation")
        el(statement, "code", code=f"MDC_ECG_INTERPRETATION_{kind}", codeSystem=MDC)
        value = el(statement, "value")
        value.set(f"{{{XSI}}}type", "ST")
        value.text = f"\n  {text}  "
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
    return path


def test_interpretation_statements_become_the_diagnosis_target(source, tmp_path: Path) -> None:
    import h5py

    folder = tmp_path / "in"
    folder.mkdir()
    for name, statements in STATEMENTS.items():  # stmt_b's statements sit in the representative beat's series
        series = "REPRESENTATIVE_BEAT" if name == "stmt_b" else "RHYTHM"
        add_interpretation(write_aecg(folder / f"{name}.xml", source.signal), statements, series)
    record = AecgXmlReader().read(folder / "stmt_a.xml")
    assert record.metadata["diagnosis"] == ["Sinus rhythm", "Left axis deviation"]  # no rate, comment or blank
    out = tmp_path / "out"
    assert main(["shard", "--source", str(folder), "--out", str(out), "--reader", "aecg_xml"]) == 0
    manifest = Manifest.load(out)
    names = ["Abnormal ECG", "Left axis deviation", "Left ventricular hypertrophy", "Sinus rhythm"]
    assert manifest.targets["diagnosis"].kind == "multilabel" and manifest.targets["diagnosis"].names == names
    with h5py.File(out / manifest.shards[0]["path"]) as f:
        rows = dict(zip(f["record_id"].asstr()[:], f["targets/diagnosis"][:].tolist(), strict=True))
    none = np.array(rows.pop("stmt_none"))
    assert rows == {
        "stmt_a": [0.0, 1.0, 0.0, 1.0],
        "stmt_b": [1.0, 0.0, 1.0, 1.0],
    }
    assert np.isnan(none).all()  # no statement: unlabelled (NaN, masked), not negative for every label
    off = tmp_path / "off"
    assert main(["shard", "--source", str(folder), "--out", str(off), "--reader", "aecg_xml",
                 "--reader_options", "{diagnosis: false}"]) == 0  # fmt: skip
    assert Manifest.load(off).targets == {}
    table = tmp_path / "labels.csv"
    table.write_text("record,potassium\nstmt_a,4.1\nstmt_b,5.6\nstmt_none,3.9\n")
    labelled = tmp_path / "labelled"
    assert main(["shard", "--source", str(folder), "--out", str(labelled), "--reader", "aecg_xml",
                 "--labels", str(table), "--regression", "{potassium: [potassium]}"]) == 0  # fmt: skip
    assert list(Manifest.load(labelled).targets) == ["potassium"]  # a label table replaces the file's statements
