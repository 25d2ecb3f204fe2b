"""HL7 v2 parser: delimiters, segment separators, repetitions, escapes, dates, file splitting."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.hl7.errors import Hl7ContentError, Hl7ParseError
from producers.hl7.parser import Delimiters, decode_text, parse_datetime, parse_message, split_messages

DATA = Path(__file__).parent / "data" / "hl7"

MSH = "MSH|^~\\&|LIS|HOSP|CRC-MEDAI|CRC|20240320101500+0100||ORU^R01^ORU_R01|MSG-1|P|2.5.1"
PID = "PID|1||PT-1^^^HOSP^PN~MRN-9^^^HOSP^MR||Doe^Jane||19580214|F"
OBX = "OBX|1|TX|22637-3^Pathology report final diagnosis^LN||first line~second line||||||F"


def message(*segments: str, separator: str = "\r", final: bool = True) -> str:
    return separator.join(segments) + (separator if final else "")


@pytest.mark.parametrize(
    ("separator", "final"),
    [("\r", True), ("\n", True), ("\r\n", True), ("\r", False), ("\n", False), ("\r\n", False)],
    ids=["cr", "lf", "crlf", "cr-no-final", "lf-no-final", "crlf-no-final"],
)
def test_segment_separators(separator: str, final: bool) -> None:
    parsed = parse_message(message(MSH, PID, OBX, separator=separator, final=final).encode())

    assert [segment.name for segment in parsed.segments] == ["MSH", "PID", "OBX"]
    assert parsed.control_id == "MSG-1"
    assert parsed.first("OBX").value(11) == "F"


def test_header_fields() -> None:
    parsed = parse_message(message(MSH, PID))

    assert parsed.header.value(1) == "|"
    assert parsed.header.value(2) == "^~\\&"
    assert parsed.message_code == "ORU"
    assert parsed.trigger_event == "R01"
    assert parsed.version == "2.5.1"


def test_repeated_fields() -> None:
    pid = parse_message(message(MSH, PID)).first("PID")

    assert len(pid.repetitions(3)) == 2
    assert pid.value(3) == "PT-1"
    assert pid.value(3, repetition=1) == "MRN-9"
    assert pid.value(3, component=5, repetition=1) == "MR"


def test_z_segments_are_kept() -> None:
    parsed = parse_message(message(MSH, PID, "ZPV|custom|data", OBX))

    assert [segment.name for segment in parsed.segments] == ["MSH", "PID", "ZPV", "OBX"]


def test_segment_sequence_counts_occurrences() -> None:
    parsed = parse_message(message(MSH, PID, OBX, OBX.replace("OBX|1", "OBX|2")))

    assert [segment.sequence for segment in parsed.all("OBX")] == [1, 2]
    assert str(parsed.all("OBX")[1].location(5)) == "OBX[2]-5"


@pytest.mark.parametrize(
    ("escaped", "expected"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b", "a^b"),
        ("a\\T\\b", "a&b"),
        ("a\\R\\b", "a~b"),
        ("a\\E\\b", "a\\b"),
        ("caf\\XC3A9\\", "café"),
        ("caf\\XC3\\\\XA9\\", "café"),
        ("line 1\\.br\\line 2", "line 1\nline 2"),
        ("\\H\\bold\\N\\", "bold"),
        ("no escapes", "no escapes"),
    ],
    ids=["F", "S", "T", "R", "E", "X-utf8", "X-split", "br", "highlight", "plain"],
)
def test_escape_sequences(escaped: str, expected: str) -> None:
    assert decode_text(escaped, Delimiters()) == expected


def test_escaped_delimiters_do_not_split_fields() -> None:
    obx = "OBX|1|ST|22637-3^Diagnosis^LN||T3 \\F\\ N1 \\S\\ M0 \\R\\ G2 \\T\\ R0||||||F"
    segment = parse_message(message(MSH, PID, obx)).first("OBX")

    assert segment.value(5) == "T3 | N1 ^ M0 ~ G2 & R0"
    assert segment.value(11) == "F"


@pytest.mark.parametrize(
    ("escaped", "fragment"),
    [
        ("bad \\Q\\", "unknown escape sequence"),
        ("open \\F", "unterminated"),
        ("\\XZZ\\", "hexadecimal"),
        ("\\XC3\\", "not valid utf-8"),
        ("\\C2842\\", "switches the character set"),
    ],
    ids=["unknown", "unterminated", "bad-hex", "bad-utf8", "charset-switch"],
)
def test_invalid_escape_sequences(escaped: str, fragment: str) -> None:
    with pytest.raises(Hl7ContentError, match=fragment):
        decode_text(escaped, Delimiters())


def test_non_standard_encoding_characters() -> None:
    header = "MSH#$*!@#LIS#HOSP#CRC-MEDAI#CRC#20240320101500+0100##ORU$R01#MSG-2#P#2.5.1"
    obx = "OBX#1#CWE#21858-6$Grade Cancer$LN##1663004$Grade 2$SCT*61026006$Grade 3$SCT######F"
    parsed = parse_message(message(header, "PID#1##PT-2###19580214#M", obx))

    assert parsed.delimiters == Delimiters(field="#", component="$", repetition="*", escape="!", subcomponent="@")
    assert parsed.message_code == "ORU"
    assert parsed.control_id == "MSG-2"
    segment = parsed.first("OBX")
    assert segment.value(5) == "1663004"
    assert segment.value(5, component=3, repetition=1) == "SCT"
    assert decode_text("a!F!b", parsed.delimiters) == "a#b"


def test_truncation_character_is_accepted() -> None:
    parsed = parse_message(message(MSH.replace("^~\\&", "^~\\&#"), PID))

    assert parsed.delimiters.subcomponent == "&"
    assert parsed.control_id == "MSG-1"


@pytest.mark.parametrize(
    "encoding",
    ["^^\\&", "^~\\", "A~\\&", "^~ &"],
    ids=["duplicate", "too-short", "letter", "space"],
)
def test_invalid_encoding_characters(encoding: str) -> None:
    with pytest.raises(Hl7ParseError, match="MSH-1 and MSH-2"):
        parse_message(message(MSH.replace("^~\\&", encoding), PID))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("PID|1||PT-1\r", "must start with an MSH segment"),
        ("", "must start with an MSH segment"),
        (message(MSH, "pid|1"), "line 2 does not start with a segment id"),
        (message(MSH, PID, MSH), "found 2 MSH segments"),
    ],
    ids=["no-msh", "empty", "lower-case-segment", "two-messages"],
)
def test_unparsable_messages(text: str, fragment: str) -> None:
    with pytest.raises(Hl7ParseError, match=fragment):
        parse_message(text.encode())


def test_byte_order_mark_is_skipped() -> None:
    assert parse_message(b"\xef\xbb\xbf" + message(MSH, PID).encode()).control_id == "MSG-1"


def test_latin1_character_set() -> None:
    header = MSH + "||||||8859/1"
    obx = "OBX|1|ST|22637-3^Diagnosis^LN||Tumeur \xe9tendue||||||F"
    parsed = parse_message(message(header, PID, obx).encode("latin-1"))

    assert parsed.first("OBX").value(5) == "Tumeur étendue"


def test_invalid_utf8_is_rejected() -> None:
    with pytest.raises(Hl7ParseError, match="not valid utf-8"):
        parse_message(message(MSH, PID).encode() + b"OBX|1|ST|X^Y^LN||\xff||||||F\r")


def test_unknown_character_set() -> None:
    with pytest.raises(Hl7ParseError, match="MSH-18 character set 'ISO IR87'"):
        parse_message(message(MSH + "||||||ISO IR87", PID).encode())


def test_explicit_null_reads_as_empty() -> None:
    pid = parse_message(message(MSH, 'PID|1||PT-1||Doe^Jane||""|F')).first("PID")

    assert pid.value(7) == ""


@pytest.mark.parametrize(
    ("text", "fhir", "has_instant"),
    [
        ("2024", "2024", False),
        ("202403", "2024-03", False),
        ("20240312", "2024-03-12", False),
        ("202403120830", "2024-03-12", False),
        ("20240312083000+0100", "2024-03-12T08:30:00+01:00", True),
        ("202403120830-0500", "2024-03-12T08:30:00-05:00", True),
        ("20240312083000.1234+0000", "2024-03-12T08:30:00.1234+00:00", True),
    ],
)
def test_datetimes(text: str, fhir: str, has_instant: bool) -> None:
    value = parse_datetime(text, parse_message(message(MSH)).header.location(7))

    assert value.fhir == fhir
    assert (value.instant is not None) is has_instant


@pytest.mark.parametrize("text", ["2024-03-12", "20241312", "20240230", "2024031", "20240312256000"])
def test_invalid_datetimes(text: str) -> None:
    with pytest.raises(Hl7ContentError, match="MSH-7"):
        parse_datetime(text, parse_message(message(MSH)).header.location(7))


def test_split_file_with_several_messages() -> None:
    data = b"\n".join(path.read_bytes() for path in sorted(DATA.glob("*.hl7")))
    data = b"FHS|^~\\&|LIS\r\nBHS|^~\\&|LIS\r\n" + data + b"BTS|3\r\nFTS|1\r\n"

    messages = [parse_message(raw) for raw in split_messages(data)]

    assert [item.control_id for item in messages] == ["ADT-000101", "ENDO-000303", "PATH-000202"]
    assert all(segment.name not in {"FHS", "BHS", "BTS", "FTS"} for item in messages for segment in item.segments)


def test_split_keeps_text_before_first_message() -> None:
    chunks = list(split_messages(b"garbage line\r" + message(MSH, PID).encode()))

    assert len(chunks) == 2
    with pytest.raises(Hl7ParseError):
        parse_message(chunks[0])
    assert parse_message(chunks[1]).control_id == "MSG-1"


def test_split_strips_mllp_framing() -> None:
    chunks = list(split_messages(b"\x0b" + message(MSH, PID).encode() + b"\x1c\r"))

    assert len(chunks) == 1
    assert parse_message(chunks[0]).control_id == "MSG-1"
