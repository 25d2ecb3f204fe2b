"""Exceptions of the HL7 v2 package, each carrying the acknowledgment it leads to.

``Hl7Error`` is the root. Every subclass carries its acknowledgment code (HL7
table 0008: ``AE`` application error, ``AR`` application reject), its error
code (HL7 table 0357) and the location of the offending segment or field, so
that the listener can respond with an MSA and an ERR segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from crc_medai.errors import CrcMedAiError

AckCode = Literal["AA", "AE", "AR"]

# HL7 table 0357, message error condition codes.
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNSUPPORTED_VERSION_ID = "203"
APPLICATION_INTERNAL_ERROR = "207"

ERROR_CODE_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNSUPPORTED_VERSION_ID: "Unsupported version id",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}


@dataclass(frozen=True)
class ErrorLocation:
    """Location of an error, as in the ERL data type of ERR-2: segment id, its occurrence, field, component."""

    segment: str
    sequence: int = 1
    field: int | None = None
    component: int | None = None

    def __str__(self) -> str:
        text = self.segment if self.sequence == 1 else f"{self.segment}[{self.sequence}]"
        if self.field is not None:
            text += f"-{self.field}"
        if self.component is not None:
            text += f".{self.component}"
        return text


class Hl7Error(CrcMedAiError):
    """Root of every error of the HL7 v2 package."""

    ack_code: ClassVar[AckCode] = "AE"
    default_error_code: ClassVar[str] = DATA_TYPE_ERROR

    def __init__(self, message: str, location: ErrorLocation | None = None, *, error_code: str | None = None) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location
        self.reason = message
        self.error_code = error_code or self.default_error_code


class Hl7ParseError(Hl7Error):
    """The bytes are not an HL7 v2 message that can be split into segments and fields (acknowledged with AR)."""

    ack_code = "AR"
    default_error_code = SEGMENT_SEQUENCE_ERROR


class UnsupportedMessageError(Hl7Error):
    """The message type, trigger event or version is not one this receiver handles (acknowledged with AR)."""

    ack_code = "AR"
    default_error_code = UNSUPPORTED_MESSAGE_TYPE


class Hl7ContentError(Hl7Error):
    """A field is missing, malformed or contains a value that cannot be mapped to FHIR (acknowledged with AE)."""

    ack_code = "AE"
    default_error_code = DATA_TYPE_ERROR


class MllpFramingError(Hl7Error):
    """The TCP stream breaks MLLP framing, for example a frame larger than the receiver accepts."""

    ack_code = "AR"
    default_error_code = SEGMENT_SEQUENCE_ERROR
