"""HL7 v2 to FHIR R4 mapping, acknowledgments and MLLP framing, without services."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from processors.prognosis.fhir_mapping import features_from_bundle
from producers.hl7.ack import build_ack, header_of
from producers.hl7.errors import Hl7ContentError, Hl7ParseError, MllpFramingError, UnsupportedMessageError
from producers.hl7.mapping import bundle_from_message
from producers.hl7.mllp import MllpDecoder, frame
from producers.hl7.parser import parse_message

DATA = Path(__file__).parent / "data" / "hl7"
RECEIVED = datetime(2024, 4, 1, 12, 0, tzinfo=UTC)

MSH = "MSH|^~\\&|EPIC|HOSP|CRC-MEDAI|CRC|20240312083000+0100||ADT^A01^ADT_A01|ADT-1|P|2.5.1"
PID = "PID|1||PT-1^^^HOSP^PN||Doe^Jane||19580214|F"
DG1 = "DG1|1||C18.7^Malignant neoplasm of sigmoid colon^I10||20240301|F"


def convert(*segments: str):
    return bundle_from_message(parse_message("\r".join(segments) + "\r"), RECEIVED)


def resources(converted, resource_type: str) -> list[dict]:
    return [
        entry["resource"] for entry in converted.bundle["entry"] if entry["resource"]["resourceType"] == resource_type
    ]


def test_pathology_report_maps_to_features() -> None:
    converted = bundle_from_message(parse_message((DATA / "oru_r01_pathology.hl7").read_bytes()), RECEIVED)
    mapped = features_from_bundle(converted.bundle)

    assert converted.patient_id == "PT-HL7-001"
    assert mapped.features["sex"] == 0.0
    assert mapped.features["age"] == 66.0
    assert mapped.features["extent"] == 3.0
    assert mapped.features["nodes"] == 3.0
    assert mapped.features["node4"] == 0.0
    assert mapped.features["differ"] == 2.0
    assert mapped.features["obstruct"] == 0.0
    assert mapped.features["perfor"] == 0.0
    assert mapped.features["adhere"] == 1.0
    assert set(mapped.missing) == {"surg"}


def test_admission_maps_patient_and_condition() -> None:
    converted = bundle_from_message(parse_message((DATA / "adt_a01_colon_cancer.hl7").read_bytes()), RECEIVED)
    (patient,) = resources(converted, "Patient")
    (condition,) = resources(converted, "Condition")

    assert patient == {"resourceType": "Patient", "id": "PT-HL7-001", "gender": "female", "birthDate": "1958-02-14"}
    assert condition["onsetDateTime"] == "2024-03-01"
    assert [coding["code"] for coding in condition["code"]["coding"]] == ["C18.7", "363406005"]
    assert features_from_bundle(converted.bundle).features["age"] == 66.0


def test_no_identifying_fields_leave_pid() -> None:
    text = str(bundle_from_message(parse_message((DATA / "adt_a01_colon_cancer.hl7").read_bytes()), RECEIVED).bundle)

    for value in ("Doe", "Jane", "99887766", "Example Street", "Lyon"):
        assert value not in text


def test_z_segments_are_ignored() -> None:
    with_z = convert(MSH, PID, "ZPV|custom|data", DG1, "ZZZ|1")
    without_z = convert(MSH, PID, DG1)

    assert with_z.bundle == without_z.bundle


def test_observation_values_by_type() -> None:
    converted = convert(
        MSH.replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01"),
        PID,
        "OBR|1|ORD-1|F-1|11529-5^Surgical pathology study^LN|||20240318||||||||||||||||||F",
        "OBX|1|NM|21893-3^Nodes positive^LN||.50|%^percent^UCUM|||||P",
        "OBX|2|ST|22637-3^Diagnosis^LN||text \\F\\ escaped||||||C",
        "OBX|3|DT|21983-2^Date^LN||20240301||||||F",
        "OBX|4|SN|21893-3^Nodes positive^LN||=^4||||||F",
    )
    observations = resources(converted, "Observation")
    (report,) = resources(converted, "DiagnosticReport")

    assert observations[0]["valueQuantity"] == {
        "value": 0.5,
        "unit": "percent",
        "system": "http://unitsofmeasure.org",
        "code": "%",
    }
    assert observations[0]["status"] == "preliminary"
    assert observations[0]["effectiveDateTime"] == "2024-03-18"
    assert observations[1]["valueString"] == "text | escaped"
    assert observations[1]["status"] == "corrected"
    assert observations[2]["valueDateTime"] == "2024-03-01"
    assert observations[3]["valueQuantity"] == {"value": 4}
    assert report["status"] == "final"
    assert len(report["result"]) == 4


def test_repeated_text_values_join_lines() -> None:
    converted = bundle_from_message(parse_message((DATA / "oru_r01_pathology.hl7").read_bytes()), RECEIVED)
    narrative = [item for item in resources(converted, "Observation") if "valueString" in item][0]

    assert narrative["valueString"] == (
        "Adenocarcinoma, sigmoid colon\nMargins clear & no perforation\n"
        "Invades through muscularis propria into pericolorectal tissue"
    )
    assert narrative["note"] == [{"text": "Reviewed at the tumour board"}]


def test_resource_ids_are_stable_across_messages() -> None:
    first = convert(MSH, PID, DG1)
    resent = convert(MSH.replace("ADT-1", "ADT-2").replace("ADT^A01", "ADT^A08"), PID, DG1)

    assert [entry["resource"]["id"] for entry in first.bundle["entry"]] == [
        entry["resource"]["id"] for entry in resent.bundle["entry"]
    ]


@pytest.mark.parametrize(
    ("msh7", "timestamp"),
    [
        ("", "2024-04-01T12:00:00+00:00"),
        ("20240312083000", "2024-04-01T12:00:00+00:00"),
        ("20240312083000+0100", "2024-03-12T07:30:00+00:00"),
    ],
    ids=["empty", "no-offset", "with-offset"],
)
def test_message_time(msh7: str, timestamp: str) -> None:
    converted = convert(MSH.replace("20240312083000+0100", msh7), PID)

    assert converted.bundle["timestamp"] == timestamp


@pytest.mark.parametrize(
    ("sex", "gender"),
    [("F", "female"), ("M", "male"), ("O", "other"), ("A", "other"), ("N", "other"), ("U", "unknown")],
)
def test_administrative_sex(sex: str, gender: str) -> None:
    converted = convert(MSH, PID.replace("|F", f"|{sex}"))

    assert resources(converted, "Patient")[0]["gender"] == gender


# (case, segments after MSH, exception, location, error code, message fragment)
CONTENT_ERRORS = [
    ("numeric sex", [PID.replace("|F", "|1")], Hl7ContentError, "PID-8", "103", "numeric codes are rejected"),
    ("unknown sex", [PID.replace("|F", "|Q")], Hl7ContentError, "PID-8", "103", "table 0001"),
    ("bad birth date", [PID.replace("19580214", "19581402")], Hl7ContentError, "PID-7", "102", "calendar date"),
    ("no pid", [DG1], Hl7ContentError, "PID", "100", "exactly one PID"),
    ("empty pid-3", [PID.replace("PT-1^^^HOSP^PN", "")], Hl7ContentError, "PID-3.1", "101", "PID-3"),
    ("bad pseudonym", [PID.replace("PT-1", "PT 1/x")], Hl7ContentError, "PID-3.1", "102", "not a valid pseudonym"),
    ("empty dg1-3", [PID, "DG1|1||"], Hl7ContentError, "DG1-3", "101", "DG1-3"),
    ("obx status", [PID, "OBX|1|NM|21893-3^N^LN||3|||||"], Hl7ContentError, "OBX-11", "101", "table 0085"),
    ("obx number", [PID, "OBX|1|NM|21893-3^N^LN||three||||||F"], Hl7ContentError, "OBX-5", "102", "not a number"),
    ("obx type", [PID, "OBX|1|ED|11502-2^Report^LN||^AP^PDF^Base64^AAA||||||F"], Hl7ContentError, "OBX-2", "103", "ED"),
    ("bad escape", [PID, "OBX|1|ST|22637-3^D^LN||\\Q\\||||||F"], Hl7ContentError, "OBX-5", "102", "escape"),
]


@pytest.mark.parametrize(
    ("segments", "exception", "location", "code", "fragment"),
    [case[1:] for case in CONTENT_ERRORS],
    ids=[case[0] for case in CONTENT_ERRORS],
)
def test_content_errors(segments: list[str], exception: type, location: str, code: str, fragment: str) -> None:
    with pytest.raises(exception, match=fragment) as caught:
        convert(MSH, *segments)

    assert str(caught.value.location) == location
    assert caught.value.error_code == code
    assert caught.value.ack_code == "AE"


def test_error_does_not_quote_patient_identifier() -> None:
    with pytest.raises(Hl7ContentError) as caught:
        convert(MSH, PID.replace("PT-1", "Jane Doe 1958"))

    assert "Jane" not in str(caught.value)


REJECTS = [
    ("empty msh-10", MSH.replace("ADT-1", ""), Hl7ParseError, "MSH-10", "101"),
    ("message type", MSH.replace("ADT^A01", "ORM^O01"), UnsupportedMessageError, "MSH-9.1", "200"),
    ("trigger event", MSH.replace("ADT^A01", "ADT^A03"), UnsupportedMessageError, "MSH-9.2", "201"),
    ("version", MSH.replace("2.5.1", "2.2"), UnsupportedMessageError, "MSH-12", "203"),
]


@pytest.mark.parametrize(
    ("header", "exception", "location", "code"), [case[1:] for case in REJECTS], ids=[case[0] for case in REJECTS]
)
def test_rejected_headers(header: str, exception: type, location: str, code: str) -> None:
    with pytest.raises(exception) as caught:
        convert(header, PID)

    assert caught.value.ack_code == "AR"
    assert str(caught.value.location) == location
    assert caught.value.error_code == code


@pytest.mark.parametrize("event", ["ADT^A01", "ADT^A04", "ADT^A08", "ORU^R01"])
def test_supported_events(event: str) -> None:
    assert convert(MSH.replace("ADT^A01", event), PID).patient_id == "PT-1"


def test_location_of_bundle_element() -> None:
    converted = convert(MSH, PID, DG1)

    assert str(converted.location_of("Bundle.entry[1].resource.code")) == "DG1-3"
    assert str(converted.location_of("Bundle.entry[0].resource.gender")) == "PID-8"
    assert str(converted.location_of("Bundle.entry[1].resource.meta")) == "DG1"
    assert converted.location_of("Bundle.entry[9].resource") is None
    assert converted.location_of(None) is None


# Acknowledgments


def ack_segments(ack: str) -> dict[str, list[str]]:
    return {line[:3]: line.split("|") for line in ack.strip("\r").split("\r")}


def test_ack_accepts() -> None:
    header = parse_message("\r".join([MSH, PID])).header
    ack = ack_segments(build_ack("AA", header, now=RECEIVED))

    assert ack["MSH"][2:6] == ["CRC-MEDAI", "CRC", "EPIC", "HOSP"]
    assert ack["MSH"][8] == "ACK^A01^ACK"
    assert ack["MSH"][11] == "2.5.1"
    assert ack["MSA"] == ["MSA", "AA", "ADT-1"]
    assert "ERR" not in ack


def test_nak_names_segment_and_field() -> None:
    header = parse_message("\r".join([MSH, PID])).header
    with pytest.raises(Hl7ContentError) as caught:
        convert(MSH, PID.replace("|F", "|2"))
    ack = ack_segments(build_ack("AE", header, now=RECEIVED, error=caught.value))

    assert ack["MSA"][:3] == ["MSA", "AE", "ADT-1"]
    assert ack["ERR"][2] == "PID^1^8"
    assert ack["ERR"][3] == "103^Table value not found^HL70357"
    assert ack["ERR"][4] == "E"
    assert ack["ERR"][8].startswith("administrative sex '2'")


def test_nak_for_old_versions_fills_err1() -> None:
    header = parse_message("\r".join([MSH.replace("2.5.1", "2.3"), PID])).header
    error = Hl7ContentError("bad", header.location(7))
    ack = ack_segments(build_ack("AE", header, now=RECEIVED, error=error))

    assert ack["ERR"][1] == "MSH^1^7^102&Data type error&HL70357"


def test_nak_escapes_delimiters_in_text() -> None:
    header = parse_message("\r".join([MSH, PID])).header
    ack = build_ack("AE", header, now=RECEIVED, error=Hl7ContentError("a|b^c"))

    assert "a\\F\\b\\S\\c" in ack


def test_nak_for_unparsable_message() -> None:
    assert header_of("not hl7") is None
    ack = ack_segments(build_ack("AR", None, now=RECEIVED, error=Hl7ParseError("broken")))

    assert ack["MSA"][:3] == ["MSA", "AR", ""]
    assert ack["MSH"][11] == "2.5.1"


# MLLP framing


def test_decoder_joins_split_reads() -> None:
    data = frame(b"MSH|one")
    decoder = MllpDecoder()

    received = [message for byte in range(len(data)) for message in decoder.feed(data[byte : byte + 1])]

    assert received == [b"MSH|one"]
    assert decoder.pending_bytes == 0


def test_decoder_splits_one_read() -> None:
    decoder = MllpDecoder()

    assert decoder.feed(frame(b"one") + frame(b"two") + frame(b"thr")[:3]) == [b"one", b"two"]
    assert decoder.feed(frame(b"thr")[3:]) == [b"thr"]


def test_decoder_large_message() -> None:
    payload = b"MSH|" + b"x" * 200_000
    data = frame(payload)
    decoder = MllpDecoder()

    received = [message for start in range(0, len(data), 4096) for message in decoder.feed(data[start : start + 4096])]

    assert received == [payload]


def test_decoder_discards_bytes_outside_frames() -> None:
    decoder = MllpDecoder()

    assert decoder.feed(b"noise" + frame(b"one") + b"\r\n") == [b"one"]
    assert decoder.discarded_bytes == 7


def test_decoder_keeps_lone_end_block_byte() -> None:
    decoder = MllpDecoder()

    assert decoder.feed(b"\x0bvalue \x1c inside\x1c") == []
    assert decoder.feed(b"\r") == [b"value \x1c inside"]


def test_decoder_rejects_oversized_frame() -> None:
    decoder = MllpDecoder(max_message_bytes=10)

    with pytest.raises(MllpFramingError, match="exceeds 10 bytes"):
        decoder.feed(b"\x0b" + b"x" * 11)
    assert decoder.pending_bytes == 0


def test_decoder_rejects_complete_oversized_frame() -> None:
    decoder = MllpDecoder(max_message_bytes=10)

    assert decoder.feed(frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(MllpFramingError, match="11 bytes received"):
        decoder.feed(frame(b"x" * 11))
