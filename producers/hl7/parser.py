"""A small HL7 v2 parser: segments, fields, repetitions, components, escape sequences.

The parser follows HL7 v2.5.1 chapter 2 (message construction rules). It reads
the delimiters from MSH-1 and MSH-2 rather than assuming ``|^~\\&``, accepts
``\\r``, ``\\n`` or ``\\r\\n`` between segments and a missing final separator,
and keeps Z-segments, which the mapping ignores. Escape sequences are decoded
only when a value is read, after the field has been split, so an escaped
delimiter never splits a field.

python-hl7 0.4.5 was read and not used. It splits segments only on ``\\r``
and decodes each byte of ``\\X..\\`` as one character, so UTF-8 text comes out
garbled. It also logs the raw field value when an escape is unknown, which
would put patient data in the logs. hl7apy was not tried.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone

from producers.hl7.errors import ErrorLocation, Hl7ContentError, Hl7ParseError

SEGMENT_SEPARATOR = re.compile(r"\r\n|\r|\n")
SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
BATCH_SEGMENTS = frozenset({"FHS", "BHS", "BTS", "FTS"})

#: MSH-18 character sets this parser decodes, by their HL7 table 0211 code; empty means ASCII.
CHARACTER_SETS = {
    "": "utf-8",
    "ASCII": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
}

# Formatting escapes of HL7 v2 section 2.7.6, for formatted text (FT), written as plain text.
FORMATTING_ESCAPES = {".br": "\n", ".fi": "", ".nf": "", ".ce": "\n", ".sk": " ", ".in": "", ".ti": ""}

DTM_PATTERN = re.compile(
    r"^(?P<year>\d{4})(?:(?P<month>\d{2})(?:(?P<day>\d{2})"
    r"(?:(?P<hour>\d{2})(?:(?P<minute>\d{2})(?:(?P<second>\d{2})(?:\.(?P<fraction>\d{1,4}))?)?)?)?)?)?"
    r"(?P<offset>[+-]\d{4})?$"
)


@dataclass(frozen=True)
class Delimiters:
    """The delimiters of one message, read from MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    charset: str = "utf-8"


@dataclass
class Segment:
    """One segment; ``fields[n]`` is the raw (still escaped) text of field n, ``fields[0]`` the segment id."""

    fields: list[str]
    sequence: int
    delimiters: Delimiters

    @property
    def name(self) -> str:
        return self.fields[0]

    def location(self, field_number: int | None = None, component: int | None = None) -> ErrorLocation:
        return ErrorLocation(self.name, self.sequence, field_number, component)

    def raw(self, number: int) -> str:
        """Return field ``number`` as sent, escapes included; empty when the field is absent."""
        return self.fields[number] if number < len(self.fields) else ""

    def repetitions(self, number: int) -> list[str]:
        """Return the raw repetitions of a field, without empty ones."""
        raw = self.raw(number)
        if self.name == "MSH" and number <= 2:
            return [raw] if raw else []
        return [repetition for repetition in raw.split(self.delimiters.repetition) if repetition]

    def components(self, number: int, repetition: int = 0) -> list[str]:
        """Return the unescaped first subcomponent of each component of one repetition."""
        repetitions = self.repetitions(number)
        if repetition >= len(repetitions):
            return []
        location = self.location(number)
        return [
            decode_text(component.split(self.delimiters.subcomponent)[0], self.delimiters, location)
            for component in repetitions[repetition].split(self.delimiters.component)
        ]

    def value(self, number: int, component: int = 1, repetition: int = 0) -> str:
        """Return one component (1-based) of one repetition, unescaped; empty when absent."""
        if self.name == "MSH" and number <= 2:
            return self.raw(number)
        components = self.components(number, repetition)
        text = components[component - 1].strip() if component <= len(components) else ""
        # '""' is the HL7 explicit null ("delete the value"); nothing is there to map.
        return "" if text == '""' else text


@dataclass
class Hl7Message:
    """A parsed HL7 v2 message."""

    segments: list[Segment]
    delimiters: Delimiters
    text: str = field(repr=False)

    @property
    def header(self) -> Segment:
        return self.segments[0]

    @property
    def message_code(self) -> str:
        return self.header.value(9, 1)

    @property
    def trigger_event(self) -> str:
        return self.header.value(9, 2)

    @property
    def control_id(self) -> str:
        return self.header.value(10)

    @property
    def version(self) -> str:
        return self.header.value(12)

    def all(self, name: str) -> list[Segment]:
        return [segment for segment in self.segments if segment.name == name]

    def first(self, name: str) -> Segment | None:
        return next(iter(self.all(name)), None)


def parse_message(data: bytes | str) -> Hl7Message:
    """Parse one HL7 v2 message.

    Raises:
        Hl7ParseError: the text does not start with MSH, MSH-1 or MSH-2 are invalid,
            the MSH-18 character set is unknown, a line is not a segment, or the text
            contains more than one MSH segment.
    """
    codec = character_set(data) if isinstance(data, bytes) else "utf-8"
    text = decode_message(data, codec) if isinstance(data, bytes) else data
    text = text.removeprefix("\ufeff").strip()
    delimiters = replace(read_delimiters(text), charset=codec)

    segments: list[Segment] = []
    counts: dict[str, int] = {}
    for line_number, line in enumerate(SEGMENT_SEPARATOR.split(text), start=1):
        if not line.strip():
            continue
        fields = line.split(delimiters.field)
        name = fields[0]
        if not SEGMENT_ID.match(name):
            raise Hl7ParseError(
                f"line {line_number} does not start with a segment id (3 upper-case letters or digits); "
                "a value containing a line break must escape it as \\.br\\ or \\X0A\\"
            )
        if name == "MSH":
            fields = ["MSH", delimiters.field, *fields[1:]]
        counts[name] = counts.get(name, 0) + 1
        segments.append(Segment(fields, counts[name], delimiters))

    if counts.get("MSH") != 1:
        raise Hl7ParseError(
            f"found {counts.get('MSH', 0)} MSH segments; send one message per MLLP frame",
            ErrorLocation("MSH", 2),
        )
    return Hl7Message(segments, delimiters, text)


def read_delimiters(text: str) -> Delimiters:
    """Read the field separator (MSH-1) and the encoding characters (MSH-2)."""
    if not text.startswith("MSH") or len(text) < 8:
        found = text[:3] if text else "nothing"
        raise Hl7ParseError(
            f"a message must start with an MSH segment, found {found!r}", ErrorLocation("MSH"), error_code="100"
        )
    separator = text[3]
    end = text.find(separator, 4)
    encoding = text[4:end] if end > 0 else ""
    characters = separator + encoding
    if (
        len(encoding) not in (4, 5)
        or len(set(characters)) != len(characters)
        or any(character.isalnum() or character.isspace() for character in characters)
    ):
        raise Hl7ParseError(
            f"MSH-1 and MSH-2 must be 5 or 6 distinct punctuation characters such as '|^~\\&', found {characters!r}",
            ErrorLocation("MSH", 1, 2),
            error_code="102",
        )
    # A fifth character in MSH-2 is the truncation character of v2.7 and later; it has no meaning here.
    return Delimiters(separator, encoding[0], encoding[1], encoding[2], encoding[3])


def character_set(data: bytes) -> str:
    """Return the Python codec for the MSH-18 character set of a raw message."""
    header = data.lstrip(b"\xef\xbb\xbf \t\r\n").split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    if len(header) < 4:
        return "utf-8"
    fields = header.split(header[3])
    name = fields[17].split(header[5:6] or "^")[0].strip() if len(fields) > 17 else ""
    if name not in CHARACTER_SETS:
        raise Hl7ParseError(
            f"MSH-18 character set {name!r} is not supported; send {sorted(CHARACTER_SETS)} (empty means ASCII)",
            ErrorLocation("MSH", 1, 18),
            error_code="103",
        )
    return CHARACTER_SETS[name]


def decode_message(data: bytes, codec: str) -> str:
    """Decode a raw message with the codec of its MSH-18 character set."""
    try:
        return data.decode(codec)
    except UnicodeDecodeError as error:
        raise Hl7ParseError(
            f"the message is not valid {codec} at byte {error.start}; set MSH-18 to the character set it uses",
            ErrorLocation("MSH", 1, 18),
            error_code="102",
        ) from error


def split_messages(data: bytes) -> Iterator[bytes]:
    """Split a file of one or several messages into messages, each starting at an MSH segment.

    Batch envelopes (FHS, BHS, BTS, FTS) and MLLP framing bytes are dropped.
    Text before the first MSH is yielded as its own chunk, so that it is
    rejected rather than lost.
    """
    data = data.translate(None, b"\x0b\x1c").removeprefix(b"\xef\xbb\xbf")
    chunk: list[bytes] = []
    for line in re.split(rb"\r\n|\r|\n", data):
        if not line.strip() or line[:3].decode("latin-1") in BATCH_SEGMENTS:
            continue
        if line.startswith(b"MSH") and chunk:
            yield b"\r".join(chunk) + b"\r"
            chunk = []
        chunk.append(line)
    if chunk:
        yield b"\r".join(chunk) + b"\r"


def decode_text(text: str, delimiters: Delimiters, location: ErrorLocation | None = None) -> str:
    """Replace the escape sequences of HL7 v2 section 2.7 in one value.

    ``\\F\\``, ``\\S\\``, ``\\T\\``, ``\\R\\`` and ``\\E\\`` become the delimiters.
    ``\\Xhh..\\`` becomes the bytes it encodes, read in the message character
    set. Adjacent hex sequences are joined, so a UTF-8 character may span them.
    ``\\.br\\`` becomes a line break, and highlighting (``\\H\\``, ``\\N\\``) is dropped.

    Raises:
        Hl7ContentError: an escape sequence is unterminated, unknown, or a
            character set switch (``\\C..\\``, ``\\M..\\``) this parser cannot honour.
    """
    escape = delimiters.escape
    if escape not in text:
        return text
    plain = {"F": delimiters.field, "S": delimiters.component, "T": delimiters.subcomponent}
    plain |= {"R": delimiters.repetition, "E": escape, "H": "", "N": ""}

    output: list[str] = []
    pending_bytes = bytearray()
    position = 0
    while position < len(text):
        start = text.find(escape, position)
        if start < 0:
            output.append(_flush_bytes(pending_bytes, delimiters, location))
            output.append(text[position:])
            break
        if start > position:
            output.append(_flush_bytes(pending_bytes, delimiters, location))
            output.append(text[position:start])
        end = text.find(escape, start + 1)
        if end < 0:
            raise Hl7ContentError("unterminated escape sequence; write the escape character itself as \\E\\", location)
        sequence = text[start + 1 : end]
        position = end + 1

        if sequence.startswith("X"):
            pending_bytes += _hex_bytes(sequence, location)
            continue
        output.append(_flush_bytes(pending_bytes, delimiters, location))
        output.append(_replacement(sequence, plain, location))
    output.append(_flush_bytes(pending_bytes, delimiters, location))
    return "".join(output)


def _replacement(sequence: str, plain: dict[str, str], location: ErrorLocation | None) -> str:
    if sequence in plain:
        return plain[sequence]
    if sequence in FORMATTING_ESCAPES:
        return FORMATTING_ESCAPES[sequence]
    if sequence.startswith(".sp"):
        count = sequence[3:].strip() or "1"
        if count.isdigit():
            return "\n" * int(count)
    if sequence[:1] in ("C", "M"):
        raise Hl7ContentError(
            f"escape sequence \\{sequence}\\ switches the character set, which is not supported; "
            "send the message in UTF-8 and set MSH-18 to 'UNICODE UTF-8'",
            location,
        )
    raise Hl7ContentError(
        f"unknown escape sequence \\{_shorten(sequence)}\\; "
        "expected \\F\\, \\S\\, \\T\\, \\R\\, \\E\\, \\Xhh\\ or \\.br\\",
        location,
    )


def _hex_bytes(sequence: str, location: ErrorLocation | None) -> bytes:
    digits = sequence[1:]
    try:
        if not digits or len(digits) % 2:
            raise ValueError(digits)
        return bytes.fromhex(digits)
    except ValueError as error:
        raise Hl7ContentError(
            f"escape sequence \\{_shorten(sequence)}\\ is not an even number of hexadecimal digits", location
        ) from error


def _flush_bytes(pending: bytearray, delimiters: Delimiters, location: ErrorLocation | None) -> str:
    if not pending:
        return ""
    try:
        text = pending.decode(delimiters.charset)
    except UnicodeDecodeError as error:
        raise Hl7ContentError(
            f"hexadecimal escape bytes are not valid {delimiters.charset}; encode characters in the MSH-18 "
            "character set",
            location,
        ) from error
    pending.clear()
    return text


def _shorten(text: str, limit: int = 20) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# Dates and times (DT, DTM and the first component of TS)


@dataclass(frozen=True)
class Hl7Instant:
    """A DTM value read into its FHIR form.

    ``fhir`` is a full FHIR dateTime when the value has a time and a UTC
    offset. Otherwise it is a FHIR ``date`` (YYYY, YYYY-MM, YYYY-MM-DD),
    because a FHIR dateTime with a time needs a timezone, and guessing one
    could shift the date. ``instant`` is set only when the value has a time
    and an offset.
    """

    fhir: str
    instant: datetime | None


def parse_datetime(text: str, location: ErrorLocation) -> Hl7Instant:
    """Read an HL7 DTM value ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``.

    Raises:
        Hl7ContentError: the text does not follow the DTM format or is not a calendar date.
    """
    match = DTM_PATTERN.match(text.strip())
    if not match:
        raise Hl7ContentError("is not an HL7 date/time; expected YYYY[MM[DD[HHMM[SS]]]][+/-ZZZZ]", location)
    parts = match.groupdict()
    try:
        moment = datetime(
            int(parts["year"]),
            int(parts["month"] or 1),
            int(parts["day"] or 1),
            int(parts["hour"] or 0),
            int(parts["minute"] or 0),
            int(parts["second"] or 0),
            int((parts["fraction"] or "0").ljust(6, "0")),
        )
    except ValueError as error:
        raise Hl7ContentError("is not a valid calendar date or time of day", location) from error

    date_text = f"{parts['year']}" + (f"-{parts['month']}" if parts["month"] else "")
    date_text += f"-{parts['day']}" if parts["day"] else ""
    if parts["hour"] is None or parts["offset"] is None:
        return Hl7Instant(date_text, None)

    sign = -1 if parts["offset"][0] == "-" else 1
    hours, minutes = int(parts["offset"][1:3]), int(parts["offset"][3:5])
    zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    aware = moment.replace(tzinfo=zone)
    fraction = f".{parts['fraction']}" if parts["fraction"] else ""
    clock = f"{moment:%H:%M:%S}{fraction}"
    offset = f"{parts['offset'][0]}{parts['offset'][1:3]}:{parts['offset'][3:5]}"
    return Hl7Instant(f"{date_text}T{clock}{offset}", aware.astimezone(UTC))
