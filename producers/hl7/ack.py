"""Original-mode acknowledgments (HL7 v2.5.1 section 2.9.2): ACK with MSA and, on error, ERR.

The ACK reuses the delimiters and version of the message it acknowledges, so that
the sender can parse it. When the message could not be parsed at all, the
ACK falls back to ``|^~\\&`` and version 2.5.1 and leaves MSA-2 empty.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from producers.hl7.errors import ERROR_CODE_TEXT, AckCode, Hl7Error
from producers.hl7.parser import Delimiters, Segment, read_delimiters

DEFAULT_VERSION = "2.5.1"
#: MSH-3 of every ACK this receiver sends.
RECEIVING_APPLICATION = "CRC-MEDAI"
#: Maximum length, in characters, of the error text written into MSA-3 and ERR-8.
MAX_TEXT_CHARS = 200


def build_ack(
    code: AckCode,
    header: Segment | None,
    *,
    now: datetime,
    error: Hl7Error | None = None,
) -> str:
    """Build the ACK for a message whose MSH is ``header`` (None when it could not be read).

    ``now`` must be timezone-aware; it becomes MSH-7 with its UTC offset.
    """
    delimiters = header.delimiters if header else Delimiters()
    version = (header.value(12) if header else "") or DEFAULT_VERSION
    trigger = header.value(9, 2) if header else ""
    control_id = header.value(10) if header else ""

    def field(text: str) -> str:
        return escape_text(text, delimiters)

    component = delimiters.component
    msh = [
        "MSH",
        delimiters.component + delimiters.repetition + delimiters.escape + delimiters.subcomponent,
        RECEIVING_APPLICATION,
        field(header.value(6)) if header else "",
        field(header.value(3)) if header else "",
        field(header.value(4)) if header else "",
        now.strftime("%Y%m%d%H%M%S%z"),
        "",
        component.join(["ACK", field(trigger), "ACK"]),
        uuid.uuid4().hex[:20],
        field(header.value(11)) if header and header.value(11) else "P",
        field(version),
    ]
    msa = ["MSA", code, field(control_id)]
    segments = [delimiters.field.join(msh), delimiters.field.join(msa)]
    if error is not None:
        msa.append(field(error.reason[:MAX_TEXT_CHARS]))
        segments[1] = delimiters.field.join(msa)
        segments.append(_err_segment(error, delimiters, version))
    return "\r".join(segments) + "\r"


def _err_segment(error: Hl7Error, delimiters: Delimiters, version: str) -> str:
    """Build ERR: ERR-2 location, ERR-3 code (table 0357), ERR-4 severity, ERR-8 text, and ERR-1 for v2.3 and v2.4."""
    component, subcomponent = delimiters.component, delimiters.subcomponent
    location = error.location
    error_text = ERROR_CODE_TEXT.get(error.error_code, "")
    parts = (
        [location.segment, str(location.sequence), _number(location.field), "", _number(location.component)]
        if location
        else []
    )
    err_location = component.join(parts).rstrip(component)
    code = component.join([error.error_code, error_text, "HL70357"])

    legacy = ""
    if version.startswith(("2.3", "2.4")):
        # ERR-1 (ELD) is how v2.3 and v2.4 receivers read the error: segment^sequence^field^code&text&table.
        legacy_code = subcomponent.join([error.error_code, error_text, "HL70357"])
        legacy_parts = [location.segment, str(location.sequence), _number(location.field)] if location else ["", "", ""]
        legacy = component.join([*legacy_parts, legacy_code])
    user_message = escape_text(error.reason[:MAX_TEXT_CHARS], delimiters)
    fields = ["ERR", legacy, err_location, code, "E", "", "", "", user_message]
    return delimiters.field.join(fields)


def _number(value: int | None) -> str:
    return "" if value is None else str(value)


def escape_text(text: str, delimiters: Delimiters) -> str:
    """Escape delimiters and line breaks in a value (HL7 v2.5.1 section 2.7.4)."""
    escape = delimiters.escape
    replacements = {
        escape: f"{escape}E{escape}",
        delimiters.field: f"{escape}F{escape}",
        delimiters.component: f"{escape}S{escape}",
        delimiters.subcomponent: f"{escape}T{escape}",
        delimiters.repetition: f"{escape}R{escape}",
        "\r": f"{escape}.br{escape}",
        "\n": f"{escape}.br{escape}",
    }
    return "".join(replacements.get(character, character) for character in text)


def header_of(text: str) -> Segment | None:
    """Read the MSH segment of a message that failed to parse, so that its ACK can still refer to it."""
    try:
        delimiters = read_delimiters(text.removeprefix("\ufeff").lstrip())
    except Hl7Error:
        return None
    line = text.removeprefix("\ufeff").lstrip().replace("\r\n", "\r").replace("\n", "\r").split("\r", 1)[0]
    fields = line.split(delimiters.field)
    return Segment(["MSH", delimiters.field, *fields[1:]], 1, delimiters)
