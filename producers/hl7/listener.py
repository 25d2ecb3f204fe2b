"""The MLLP listener: an asyncio TCP server that acknowledges every HL7 v2 message.

Each connection reads the stream in chunks, decodes MLLP frames, and handles
its messages one at a time in arrival order, so the ACKs come back in the
order the messages were sent. A frame larger than ``CRC_HL7_MAX_MESSAGE_BYTES``
is acknowledged with AR and the connection is closed, because the rest of the
stream can no longer be framed reliably. Bytes outside a frame, and a frame left
unfinished when the peer disconnects, get no ACK because they carry no whole
message. Each gets a WARNING and a dead-letter record on ``dlq.hl7-listener``
with the bytes received, cut to the broker's record limit (discarded bytes to
their first 64 KiB). Whitespace between frames (spaces, tabs, line breaks) is
only counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from crc_medai.kafka import DATA_TOPICS, create_producer, ensure_topics
from crc_medai.metrics import health, start_metrics_server
from crc_medai.settings import Settings
from producers.hl7.ack import build_ack
from producers.hl7.errors import APPLICATION_INTERNAL_ERROR, MllpFramingError, UnsupportedMessageError
from producers.hl7.ingest import LISTENER_SERVICE, Hl7Ingest
from producers.hl7.mllp import MllpDecoder, frame
from producers.intake import RecordIntake
from schemas.messages import utc_now

logger = logging.getLogger(__name__)

#: Bytes requested per read from a connection.
READ_CHUNK_BYTES = 64 * 1024


class Hl7Listener:
    """MLLP server on ``host:port`` that hands each message to an :class:`Hl7Ingest`.

    Port 0 picks a free port, and :attr:`port` is the bound port after :meth:`start`.
    """

    def __init__(self, ingest: Hl7Ingest, host: str, port: int, *, max_message_bytes: int) -> None:
        self.ingest = ingest
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        # Connections handling a message; close() lets them finish it instead of cancelling them.
        self._busy: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> int:
        """Start listening and return the bound port."""
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("mllp listener started host=%s port=%d", self.host, self.port)
        return self.port

    async def close(self) -> None:
        """Stop accepting connections, then end the open ones after the messages they are handling."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        # Closing an idle connection's transport ends its read with end-of-stream, so its handler returns.
        for task, writer in list(self._connections.items()):
            if task not in self._busy:
                writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        logger.info("mllp listener stopped host=%s port=%d", self.host, self.port)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        peer = _peer_name(writer)
        logger.info("mllp connection opened peer=%s", peer)
        decoder = MllpDecoder(self.max_message_bytes)
        try:
            while chunk := await reader.read(READ_CHUNK_BYTES):
                try:
                    messages = decoder.feed(chunk)
                except MllpFramingError as error:
                    await self._reject_oversized(writer, error, peer)
                    return
                self._busy.add(task)
                await self._reject_outside_frame(*decoder.take_discarded(), peer)
                for raw in messages:
                    ack = await self._handle(raw, peer)
                    writer.write(frame(ack.encode("utf-8")))
                    await writer.drain()
                self._busy.discard(task)
                if self._closing:
                    return
        except (ConnectionError, asyncio.IncompleteReadError) as error:
            logger.warning("mllp connection lost peer=%s error=%r", peer, error)
        finally:
            if decoder.pending_bytes:
                await self._reject_unfinished(decoder.unfinished_frame(), peer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._connections.pop(task, None)
            self._busy.discard(task)
            logger.info("mllp connection closed peer=%s", peer)

    async def _handle(self, raw: bytes, peer: str) -> str:
        try:
            outcome = await self.ingest.ingest(raw, source=f"mllp {peer}")
        except Exception:
            # Any failure still gets an acknowledgment, so the sender neither hangs nor loses the message.
            logger.exception("hl7 message failed unexpectedly peer=%s", peer)
            failure = UnsupportedMessageError(
                "the message could not be processed; send it again later", error_code=APPLICATION_INTERNAL_ERROR
            )
            return build_ack("AR", None, now=utc_now().astimezone(), error=failure)
        return outcome.ack

    async def _reject_outside_frame(self, count: int, kept: bytes, peer: str) -> None:
        """Dead-letter bytes received outside an MLLP frame, unless they are only whitespace between frames."""
        if not count:
            return
        if not kept.strip(b" \t\r\n"):
            logger.debug("whitespace between mllp frames ignored peer=%s bytes=%d", peer, count)
            return
        logger.warning("mllp bytes outside a frame discarded peer=%s bytes=%d", peer, count)
        error = MllpFramingError(
            f"{count} bytes arrived outside an MLLP frame and were discarded; the sender must wrap every "
            "message in a start block 0x0B and an end block 0x1C 0x0D"
        )
        await self._dead_letter(kept, error, peer)

    async def _reject_unfinished(self, received: bytes, peer: str) -> None:
        """Dead-letter a frame that the peer left without its end block when it disconnected."""
        logger.warning("mllp connection closed inside a frame peer=%s bytes=%d", peer, len(received))
        error = MllpFramingError(
            f"the connection closed inside an MLLP frame after {len(received)} bytes without the end block "
            "0x1C 0x0D; the message was not processed or acknowledged, so send it again in a complete frame"
        )
        await self._dead_letter(received, error, peer)

    async def _dead_letter(self, raw: bytes, error: MllpFramingError, peer: str) -> None:
        try:
            await self.ingest.intake.dead_letter(raw, error, source_name=f"mllp {peer}")
        except Exception:
            # The bytes were never acknowledged, so the sender still has them; the loss is logged here.
            logger.exception("dead-letter record of mllp bytes failed peer=%s bytes=%d", peer, len(raw))

    async def _reject_oversized(self, writer: asyncio.StreamWriter, error: MllpFramingError, peer: str) -> None:
        logger.error("mllp frame too large, closing connection peer=%s error=%s", peer, error)
        await self.ingest.intake.dead_letter(b"", error, source_name=f"mllp {peer}")
        writer.write(frame(build_ack("AR", None, now=utc_now().astimezone(), error=error).encode("utf-8")))
        await writer.drain()


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the listener until ``stop`` is set or SIGINT/SIGTERM arrives (``crc-medai hl7-listener``)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)

    await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{LISTENER_SERVICE}"))
    metrics = start_metrics_server(settings, LISTENER_SERVICE)
    producer = create_producer(settings)
    await producer.start()
    intake = RecordIntake(settings, producer, service=LISTENER_SERVICE)
    listener = Hl7Listener(
        Hl7Ingest(intake),
        settings.hl7_listener_host,
        settings.hl7_listener_port,
        max_message_bytes=settings.hl7_max_message_bytes,
    )
    try:
        await listener.start()
        health(LISTENER_SERVICE).started = True
        await stop.wait()
    finally:
        await listener.close()
        await intake.close()
        await producer.stop()
        if metrics is not None:
            metrics.close()
