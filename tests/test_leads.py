"""Leads are chosen by name in any spelling; unknown or repeated names fail clearly."""

import pytest

from ecgfm.leads import STANDARD_LEADS, LeadError, canonical_lead, lead_indices, parse_leads


def test_aliases_map_to_canonical_names():
    assert canonical_lead("AVR") == "aVR" and canonical_lead("avl") == "aVL" and canonical_lead("aVF") == "aVF"
    assert canonical_lead("i") == "I" and canonical_lead("Lead II") == "II" and canonical_lead("v6") == "V6"
    assert canonical_lead("vx") is None
    assert canonical_lead("lead-I") == "I" and canonical_lead("lead_aVL") == "aVL"
    # an inverted lead is not the lead: "Lead -aVR" (Cabrera display, DICOM) must never be stored as aVR
    assert canonical_lead("Lead -aVR") is None and canonical_lead("-aVR") is None


def test_subsets_by_name_any_order_and_case():
    assert parse_leads("limb") == STANDARD_LEADS[:6]
    assert parse_leads("ii,I") == ("II", "I")
    assert parse_leads(["v1", "AVR"]) == ("V1", "aVR")
    assert lead_indices("I+II") == [0, 1]
    assert lead_indices(["aVF", "V6"]) == [5, 11]


def test_unknown_or_repeated_leads_fail_with_the_name():
    with pytest.raises(LeadError, match="unknown lead name 'V7'"):
        parse_leads(["I", "V7"])
    with pytest.raises(LeadError, match="lead 'I' is named twice"):
        parse_leads(["I", "i"])
    with pytest.raises(LeadError, match=r"leads \['V1'\] are not among"):
        lead_indices(["V1"], order=("I", "II"))
