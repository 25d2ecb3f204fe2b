"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol, release 2): ``0x0B message 0x1C 0x0D``.

:class:`MllpDecoder` turns the bytes of a TCP stream, read in chunks of any
size, into whole messages: a message may span several reads and one read may
carry several messages.
"""

from __future__ import annotations

import logging

from producers.hl7.errors import MllpFramingError

logger = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"

#: Default maximum message size in bytes, also the default of ``CRC_HL7_MAX_MESSAGE_BYTES``. A longer frame is rejected.
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024

#: Maximum discarded bytes kept between calls of :meth:`MllpDecoder.take_discarded`, so that they can be dead-lettered.
MAX_KEPT_DISCARDED_BYTES = 64 * 1024


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP start and end blocks."""
    return START_BLOCK + message + END_BLOCK


class MllpDecoder:
    """Incremental MLLP decoder for one connection.

    Bytes outside a frame (before a start block) are discarded and counted in
    ``discarded_bytes``, as MLLP release 2 prescribes. The first
    :data:`MAX_KEPT_DISCARDED_BYTES` of them are kept until
    :meth:`take_discarded`, so the caller can dead-letter them.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.discarded_bytes = 0
        self._discarded = bytearray()
        self._discarded_since_take = 0
        self._buffer = bytearray()
        # Where the search for the end block resumes, so a large message is not rescanned on every read.
        self._scan_from = 0

    @property
    def pending_bytes(self) -> int:
        """Number of bytes of the unfinished frame in the buffer."""
        return len(self._buffer)

    def unfinished_frame(self) -> bytes:
        """Return the bytes of the unfinished frame, start block included (empty when none)."""
        return bytes(self._buffer)

    def take_discarded(self) -> tuple[int, bytes]:
        """Return how many bytes were discarded since the last call and the first of them, then forget them."""
        taken = (self._discarded_since_take, bytes(self._discarded))
        self._discarded.clear()
        self._discarded_since_take = 0
        return taken

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes read from the stream and return the messages they complete, in order.

        Raises:
            MllpFramingError: an unfinished frame is longer than ``max_message_bytes``.
        """
        self._buffer += data
        messages: list[bytes] = []
        while True:
            start = self._buffer.find(START_BLOCK)
            if start < 0:
                self._discard(len(self._buffer))
                return messages
            if start > 0:
                self._discard(start)
            end = self._buffer.find(END_BLOCK, max(1, self._scan_from))
            if end < 0:
                self._check_size(len(self._buffer) - 1)
                self._scan_from = max(1, len(self._buffer) - len(END_BLOCK) + 1)
                return messages
            message = bytes(self._buffer[1:end])
            del self._buffer[: end + len(END_BLOCK)]
            self._scan_from = 0
            self._check_size(len(message))
            messages.append(message)

    def _discard(self, count: int) -> None:
        if count:
            self.discarded_bytes += count
            self._discarded_since_take += count
            room = MAX_KEPT_DISCARDED_BYTES - len(self._discarded)
            self._discarded += self._buffer[: max(0, min(count, room))]
            logger.debug("discarded bytes outside an MLLP frame count=%d", count)
            del self._buffer[:count]
            self._scan_from = 0

    def _check_size(self, size: int) -> None:
        """Raise when a frame, complete or not, is over the limit; the buffer is dropped with it."""
        if size > self.max_message_bytes:
            self._buffer.clear()
            self._scan_from = 0
            raise MllpFramingError(
                f"an MLLP frame exceeds {self.max_message_bytes} bytes ({size} bytes received); "
                "split the content into several messages or raise CRC_HL7_MAX_MESSAGE_BYTES"
            )
