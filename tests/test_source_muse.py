"""The GE MUSE XML reader on real recordings written as MUSE exports: 8 stored leads in int16 at 4.88 µV/bit
(base64), the four derived limb leads, rhythm vs median beats, diagnosis statements as labels, malformed files."""

from __future__ import annotations

import base64
import csv
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from lxml import etree

from ecgfm.bench import record_formats
from ecgfm.bench.record_formats import MUSE_UV_PER_BIT as UV_PER_BIT
from ecgfm.commands import main
from ecgfm.data.convert import convert
from ecgfm.data.shards import Manifest
from ecgfm.data.sources import MuseXmlReader, RecordError
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

EIGHT = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]  # what MUSE stores
RECORDS = {
    "HR06000": ["Sinus rhythm", "Left axis deviation", "Abnormal ECG"],
    "E07500": ["Sinus bradycardia", "Otherwise normal ECG"],
}


@pytest.fixture(scope="module")
def sources(test_data: Path) -> dict:
    """Real 12-lead, 500 Hz, 10-s Challenge recordings in mV, by record name."""
    reader = SOURCES.create("challenge")
    records = {name: reader.read(test_data / "cinc2021" / name) for name in RECORDS}
    assert all(r.lead_names == STANDARD_LEADS and r.fs == 500 for r in records.values())
    return records


def write_muse(path: Path, record, statements: list[str], names: list[str] = EIGHT, **options) -> Path:
    """A MUSE export of a real record: demographics, diagnosis, a median beat (1.2 s) and the 10-s rhythm."""
    rows = [STANDARD_LEADS.index(n) if n in STANDARD_LEADS else 6 for n in names]
    return record_formats.write_muse(
        path,
        record.signal[rows],
        record.fs,
        names,
        median_mv=record.signal[rows, 1000:1600],
        patient_id=f"P-{record.record_id}",
        age=record.metadata["age"],
        sex=record.metadata["sex"],
        statements=statements,
        **options,
    )


@pytest.fixture
def folder(sources, tmp_path: Path) -> Path:
    out = tmp_path / "muse"
    out.mkdir()
    for name, statements in RECORDS.items():
        write_muse(out / f"MUSE_{name}.xml", sources[name], statements)
    return out


def test_rhythm_leads_in_order_in_millivolts_with_derived_limb_leads(sources, folder: Path) -> None:
    source = sources["HR06000"]
    record = MuseXmlReader().read(folder / "MUSE_HR06000.xml")
    assert record.lead_names == STANDARD_LEADS
    assert record.fs == 500 and record.signal.shape == (12, 5000) and record.signal.dtype == np.float32
    stored = [STANDARD_LEADS.index(n) for n in EIGHT]
    # 4.88 µV per bit: stored leads equal the source within half a step (so the unit is right, not µV or V)
    np.testing.assert_allclose(record.signal[stored], source.signal[stored], atol=UV_PER_BIT / 2000 + 1e-6)
    lead = dict(zip(record.lead_names, record.signal, strict=True))
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-6)
    np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=1e-6)
    np.testing.assert_allclose(lead["aVL"], lead["I"] - lead["II"] / 2, atol=1e-6)
    np.testing.assert_allclose(lead["aVF"], lead["II"] - lead["I"] / 2, atol=1e-6)
    # and the derived leads are the recorded ones (PTB-XL's limb leads obey the same equations to a few µV)
    for name in ("III", "aVR", "aVL", "aVF"):
        np.testing.assert_allclose(lead[name], source.signal[STANDARD_LEADS.index(name)], atol=0.01)
    assert record.metadata["derived_leads"] == ["III", "aVR", "aVL", "aVF"]
    assert record.metadata["warnings"] == ["leads III aVR aVL aVF derived from I and II (not stored in the file)"]
    assert record.patient_id == "P-HR06000" and record.record_id == "MUSE_HR06000"
    assert record.metadata["age"] == source.metadata["age"] and record.metadata["sex"] == source.metadata["sex"]
    assert record.metadata["diagnosis"] == RECORDS["HR06000"]


def test_median_beats_by_option_and_no_derivation_by_option(sources, folder: Path) -> None:
    median = SOURCES.create("muse_xml", waveform="median").read(folder / "MUSE_E07500.xml")
    assert median.signal.shape == (12, 600) and median.metadata["waveform"] == "Median"
    np.testing.assert_allclose(median.signal[0], sources["E07500"].signal[0, 1000:1600], atol=0.0025)
    eight = SOURCES.create("muse_xml", derive_limb_leads=False).read(folder / "MUSE_E07500.xml")
    assert eight.lead_names == tuple(EIGHT) and eight.metadata["warnings"] == []


def test_lead_order_in_the_file_does_not_matter(sources, tmp_path: Path) -> None:
    shuffled = ["V6", "aVF", "I", "V1", "III", "V2", "II", "V3", "aVR", "V4", "aVL", "V5"]
    path = write_muse(tmp_path / "all12.xml", sources["HR06000"], [], names=shuffled)
    record = MuseXmlReader().read(path)
    assert record.lead_names == STANDARD_LEADS and record.metadata["derived_leads"] == []
    np.testing.assert_allclose(record.signal, sources["HR06000"].signal, atol=0.0025)


def test_diagnosis_statements_become_a_multilabel_target(folder: Path, tmp_path: Path) -> None:
    summary = convert(folder, tmp_path / "shards", reader="muse_xml", progress=False)
    assert summary.records_read == 2 and not summary.skipped
    manifest = Manifest.load(tmp_path / "shards")
    names = sorted({s for statements in RECORDS.values() for s in statements})
    assert manifest.targets["diagnosis"].kind == "multilabel" and manifest.targets["diagnosis"].names == names
    with h5py.File(tmp_path / "shards" / manifest.shards[0]["path"]) as f:
        ids = list(f["record_id"].asstr()[:])
        labels = f["targets/diagnosis"][:]
        assert f["lead_mask"][:].all()  # the four limb leads are derived, so all twelve are present
    for row, record_id in zip(labels, ids, strict=True):
        expected = RECORDS[record_id.removeprefix("MUSE_")]
        assert [n for n, v in zip(names, row, strict=True) if v == 1] == sorted(expected)
    assert all("derived from I and II" in warning for _, warning in summary.warnings)


def malformed(sources, folder: Path) -> dict[str, str]:
    """Broken MUSE files written into ``folder``: file name -> the reason the reader must give."""
    record = sources["HR06000"]
    good = write_muse(folder / "good.xml", record, ["Sinus rhythm"]).read_bytes()
    (folder / "truncated.xml").write_bytes(good[: len(good) // 2])
    text = good.decode("latin-1")
    start = text.index("<WaveFormData>", text.index("Rhythm")) + len("<WaveFormData>")
    (folder / "bad_base64.xml").write_bytes((text[:start] + "A" + text[start:]).encode("latin-1"))
    odd = base64.b64encode(b"\x01\x02\x03").decode()  # valid base64 of 3 bytes: not whole int16 samples
    end = text.index("</WaveFormData>", start)
    (folder / "odd_bytes.xml").write_bytes((text[:start] + odd + text[end:]).encode("latin-1"))
    no_rate = etree.fromstring(write_muse(folder / "no_rate.xml", record, []).read_bytes())
    for element in no_rate.xpath("Waveform[WaveformType='Rhythm']/*[self::SampleBase or self::SampleExponent]"):
        element.getparent().remove(element)
    (folder / "no_rate.xml").write_bytes(etree.tostring(no_rate))
    write_muse(folder / "nanovolts.xml", record, [], amplitude_units="NANOVOLTS")
    (folder / "aecg.xml").write_text('<AnnotatedECG xmlns="urn:hl7-org:v3"/>')
    return {
        "truncated.xml": "malformed XML",
        "bad_base64.xml": "lead I: WaveFormData is not valid base64",
        "odd_bytes.xml": "lead I: WaveFormData decodes to 3 bytes, not whole int16 samples",
        "no_rate.xml": "Rhythm waveform has no SampleBase (sampling rate)",
        "nanovolts.xml": "signal 1 (lead I) is in 'NANOVOLTS', not a voltage",
        "aecg.xml": "is not <RestingECG>; not a GE MUSE XML file",
    }


def test_malformed_files_fail_with_a_reason_naming_the_file(sources, tmp_path: Path) -> None:
    reasons = malformed(sources, tmp_path)
    reader = MuseXmlReader()
    for name, reason in reasons.items():
        with pytest.raises(RecordError) as err:
            reader.read(tmp_path / name)
        message = str(err.value)
        assert message.startswith(str(tmp_path / name)) and reason in message, message
        assert "\n" not in message
    path = write_muse(tmp_path / "rhythm_only.xml", sources["E07500"], [])
    root = etree.fromstring(path.read_bytes(), etree.XMLParser(resolve_entities=False, no_network=True))
    root.remove(root.find("Waveform"))  # the median beats
    path.write_bytes(etree.tostring(root))
    with pytest.raises(RecordError, match=r"rhythm_only.xml: no Median waveform \(found: Rhythm\)"):
        MuseXmlReader(waveform="median").read(path)


def test_external_entities_are_not_resolved(sources, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-read")
    path = write_muse(tmp_path / "xxe.xml", sources["E07500"], [])
    text = path.read_text(encoding="latin-1").replace(
        '<!DOCTYPE RestingECG SYSTEM "restecg.dtd">', f'<!DOCTYPE RestingECG [<!ENTITY x SYSTEM "file://{secret}">]>'
    )
    path.write_text(text.replace("P-E07500", "&x;"), encoding="latin-1")
    leaky = etree.fromstring(path.read_bytes(), etree.XMLParser(resolve_entities=True))
    assert leaky.findtext("PatientDemographics/PatientID") == "do-not-read"  # the file is a real XXE attempt
    record = MuseXmlReader().read(path)
    assert "do-not-read" not in record.patient_id


def test_shard_command_lists_bad_files_and_unknown_leads(sources, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    reasons = malformed(sources, folder)
    write_muse(folder / "v4r.xml", sources["E07500"], ["Sinus bradycardia"], names=[*EIGHT, "V4R"])
    out = tmp_path / "out"
    assert main(["shard", "--source", str(folder), "--out", str(out), "--reader", "muse_xml"]) == 0
    with open(out / "skipped.csv", newline="") as f:
        skipped = {Path(row["record"]).name: row["reason"] for row in csv.DictReader(f)}
    assert set(skipped) == set(reasons)
    for name, reason in reasons.items():
        assert str(folder / name) in skipped[name] and reason in skipped[name]
    with open(out / "warnings.csv", newline="") as f:
        warnings = [(Path(row["record"]).name, row["warning"]) for row in csv.DictReader(f)]
    assert ("v4r.xml", "non-standard signals ignored: V4R") in warnings
    assert ("good.xml", "leads III aVR aVL aVF derived from I and II (not stored in the file)") in warnings
    assert Manifest.load(out).n_segments == 2


def test_a_changed_export_rebuilds_its_shard(sources, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    convert(folder, out, reader="muse_xml", progress=False)
    assert convert(folder, out, reader="muse_xml", progress=False).shards_rebuilt == 0
    halved = replace(sources["E07500"], signal=sources["E07500"].signal / 2)  # same labels, other samples
    write_muse(folder / "MUSE_E07500.xml", halved, RECORDS["E07500"])
    assert convert(folder, out, reader="muse_xml", progress=False).shards_rebuilt == 1


def test_a_record_without_statements_is_unlabelled_not_negative() -> None:
    from ecgfm.data.sources.base import statement_targets

    assert statement_targets(["Sinus rhythm"], ["Atrial fibrillation", "Sinus rhythm"]).tolist() == [0.0, 1.0]
    assert np.isnan(statement_targets([], ["Atrial fibrillation", "Sinus rhythm"])).all()


def test_confirmation_and_comparison_lines_are_not_labels(sources, tmp_path: Path) -> None:
    folder = tmp_path / "signed"
    folder.mkdir()
    statements = [
        "Sinus rhythm",
        "When compared with ECG of 12-MAR-2015 10:04, No significant change was found",
        "Confirmed by SMITH, JOHN (123) on 3/14/2015 9:11:02 AM",
    ]
    write_muse(folder / "MUSE_HR06000.xml", sources["HR06000"], statements)
    write_muse(folder / "MUSE_E07500.xml", sources["E07500"], ["Sinus bradycardia", "Referred by: Dr. Jones"])
    summary = convert(folder, tmp_path / "shards", reader="muse_xml", progress=False)
    # no names or dates in the vocabulary; each record says how many lines it left out, without their text
    assert Manifest.load(tmp_path / "shards").targets["diagnosis"].names == ["Sinus bradycardia", "Sinus rhythm"]
    left_out = sorted(w for _, w in summary.warnings if "left out of diagnosis" in w)
    assert [w.split(" ")[0] for w in left_out] == ["1", "2"] and not any("SMITH" in w for w in left_out)

    everything = convert(
        folder, tmp_path / "all", reader="muse_xml", reader_options={"exclude_statements": []}, progress=False
    )
    assert everything.records_read == 2
    assert len(Manifest.load(tmp_path / "all").targets["diagnosis"].names) == 5
    with pytest.raises(ValueError, match=r"muse_xml: exclude_statements '\(' is not a regular expression"):
        MuseXmlReader(exclude_statements=["("])
