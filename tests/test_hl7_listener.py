"""The MLLP listener and the HL7 file producer against the real Kafka and Redis of the local stack."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from crc_medai.kafka import DATA_TOPICS, Record, collect_records, create_producer, ensure_topics
from crc_medai.services import settings_env
from crc_medai.settings import Settings
from producers.hl7.ingest import FILE_SERVICE, LISTENER_SERVICE, Hl7Ingest, publish_hl7_files
from producers.hl7.listener import Hl7Listener
from producers.hl7.mllp import MllpDecoder, frame
from producers.intake import RecordIntake
from schemas.messages import PatientRecord
from tests.conftest import isolated_settings

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data" / "hl7"
ADT = (DATA / "adt_a01_colon_cancer.hl7").read_bytes()
PATHOLOGY = (DATA / "oru_r01_pathology.hl7").read_bytes()
COLONOSCOPY = (DATA / "oru_r01_colonoscopy.hl7").read_bytes()

MSH = "MSH|^~\\&|EPIC|HOSP|CRC-MEDAI|CRC|20240312083000+0100||ADT^A08^ADT_A01|{control}|P|2.5.1"
PID = "PID|1||{patient}^^^HOSP^PN||Doe^Jane||19580214|{sex}"


def adt(control: str, patient: str = "PT-MLLP-1", sex: str = "F", header: str = MSH) -> bytes:
    return ("\r".join([header.format(control=control), PID.format(patient=patient, sex=sex)]) + "\r").encode()


def large_report(size: int) -> bytes:
    """An ORU^R01 whose narrative OBX is ``size`` bytes long."""
    narrative = "Narrative line\\.br\\" * (size // 19)
    return PATHOLOGY.replace(b"PATH-000202", b"PATH-LARGE").replace(b"Reviewed at the tumour board", narrative.encode())


BAD_GRADE = PATHOLOGY.replace(b"PATH-000202", b"PATH-BADGRADE").replace(
    b"1663004^Grade 2: moderately differentiated^SCT", b"999999^Grade 9^SCT"
)

# Messages sent one connection after another: (case, how the bytes are written, messages).
# "whole": one write per message; "split": 7-byte writes; "together": all frames in one write.
CASES: list[tuple[str, str, list[bytes]]] = [
    ("admission", "whole", [ADT]),
    ("repeated admission", "whole", [ADT]),
    ("split across reads", "split", [PATHOLOGY]),
    ("several in one read", "together", [COLONOSCOPY, adt("A08-TOGETHER")]),
    ("larger than one read", "whole", [large_report(200_000)]),
    ("lf separators", "whole", [adt("LF-1").replace(b"\r", b"\n")]),
    ("crlf separators", "whole", [adt("CRLF-1").replace(b"\r", b"\r\n").rstrip(b"\r\n")]),
    ("empty msh-7", "whole", [adt("NO-TIME", header=MSH.replace("20240312083000+0100", ""))]),
    ("encoding characters", "whole", [adt("ODD-1").replace(b"|", b"#").replace(b"^", b"$")]),
    ("numeric sex", "whole", [adt("SEX-1", sex="1")]),
    ("unsupported type", "whole", [adt("ORM-1", header=MSH.replace("ADT^A08^ADT_A01", "ORM^O01^ORM_O01"))]),
    ("empty msh-10", "whole", [adt("")]),
    ("unparsable", "whole", [b"this is not an HL7 message"]),
    ("unmappable grade", "whole", [BAD_GRADE]),
]


@dataclass
class Scenario:
    settings: Settings
    acks: dict[str, list[str]]
    records: list[Record]

    def on(self, topic: str) -> list[Record]:
        return [record for record in self.records if record.topic == self.settings.topic(topic)]

    def msa(self, case: str, index: int = 0) -> list[str]:
        return segment(self.acks[case][index], "MSA")

    def err(self, case: str) -> list[str]:
        return segment(self.acks[case][0], "ERR")


def segment(ack: str, name: str) -> list[str]:
    for line in ack.strip("\r").split("\r"):
        if line.startswith(name):
            return line.split(line[3])
    raise AssertionError(f"no {name} segment in ACK {ack!r}")


async def exchange(port: int, mode: str, messages: list[bytes]) -> list[str]:
    """Send messages over one connection and read one ACK per message."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framed = [frame(message) for message in messages]
    if mode == "together":
        writer.write(b"".join(framed))
    for data in framed if mode != "together" else []:
        step = 7 if mode == "split" else len(data)
        for start in range(0, len(data), step):
            writer.write(data[start : start + step])
            await writer.drain()
            if mode == "split":
                await asyncio.sleep(0.002)  # let the listener read the pieces apart
    await writer.drain()

    decoder = MllpDecoder()
    acks: list[bytes] = []
    while len(acks) < len(messages):
        chunk = await asyncio.wait_for(reader.read(65536), timeout=60)
        assert chunk, f"connection closed after {len(acks)} of {len(messages)} ACKs"
        acks.extend(decoder.feed(chunk))
    writer.close()
    await writer.wait_closed()
    return [ack.decode() for ack in acks]


async def run_listener_cases(settings: Settings) -> dict[str, list[str]]:
    await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{LISTENER_SERVICE}"))
    producer = create_producer(settings)
    await producer.start()
    intake = RecordIntake(settings, producer, service=LISTENER_SERVICE)
    listener = Hl7Listener(Hl7Ingest(intake), "127.0.0.1", 0, max_message_bytes=settings.hl7_max_message_bytes)
    port = await listener.start()
    try:
        return {case: await exchange(port, mode, messages) for case, mode, messages in CASES}
    finally:
        await listener.close()
        await intake.close()
        await producer.stop()


@pytest.fixture(scope="module")
def scenario(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    settings = isolated_settings(stack, tmp_path_factory.mktemp("hl7") / "out")
    acks = asyncio.run(run_listener_cases(settings))
    # Every message, accepted or rejected, leaves exactly one record on one of the two topics.
    sent = sum(len(replies) for replies in acks.values())
    records = asyncio.run(
        collect_records(
            settings,
            ["patient-records", f"dlq.{LISTENER_SERVICE}"],
            until=lambda received: len(received) >= sent,
            timeout_s=120,
        )
    )
    return Scenario(settings, acks, records)


@pytest.mark.parametrize(
    "case",
    [
        "admission",
        "repeated admission",
        "split across reads",
        "several in one read",
        "larger than one read",
        "lf separators",
        "crlf separators",
        "empty msh-7",
        "encoding characters",
    ],
)
def test_listener_accepts(scenario: Scenario, case: str) -> None:
    for index, ack in enumerate(scenario.acks[case]):
        assert scenario.msa(case, index)[1] == "AA", ack
        assert "ERR" not in ack


def test_ack_refers_to_message(scenario: Scenario) -> None:
    msh = segment(scenario.acks["admission"][0], "MSH")

    assert scenario.msa("admission")[2] == "ADT-000101"
    assert msh[8] == "ACK^A01^ACK"
    assert msh[4:6] == ["EPIC", "NORTH-HOSP"]


def test_acks_come_in_order(scenario: Scenario) -> None:
    assert [scenario.msa("several in one read", index)[2] for index in range(2)] == ["ENDO-000303", "A08-TOGETHER"]


def test_ack_uses_sender_delimiters(scenario: Scenario) -> None:
    ack = scenario.acks["encoding characters"][0]

    assert ack.startswith("MSH#$~\\&#CRC-MEDAI#")
    assert "MSA#AA#ODD-1" in ack


# (case, MSA-1, ERR-2 location, ERR-3 code)
REJECTED = [
    ("numeric sex", "AE", "PID^1^8", "103"),
    ("unsupported type", "AR", "MSH^1^9^^1", "200"),
    ("empty msh-10", "AR", "MSH^1^10", "101"),
    ("unparsable", "AR", "MSH^1", "100"),
    ("unmappable grade", "AE", "OBX^6^5", "102"),
]


@pytest.mark.parametrize(("case", "code", "location", "error_code"), REJECTED, ids=[case[0] for case in REJECTED])
def test_listener_rejects(scenario: Scenario, case: str, code: str, location: str, error_code: str) -> None:
    err = scenario.err(case)

    assert scenario.msa(case)[1] == code
    assert err[2] == location
    assert err[3].split("^")[0] == error_code
    assert err[4] == "E"
    assert err[8]


def test_rejected_messages_are_dead_lettered(scenario: Scenario) -> None:
    dead = scenario.on(f"dlq.{LISTENER_SERVICE}")
    sent = {case: messages[0] for case, _, messages in CASES if case in {item[0] for item in REJECTED}}

    assert sorted(record.value for record in dead) == sorted(sent.values())
    for record in dead:
        assert record.headers["crc-service"] == LISTENER_SERVICE
        assert record.headers["crc-origin-source"].startswith("mllp 127.0.0.1:")
        assert record.headers["crc-error"]


def test_dead_letter_names_field(scenario: Scenario) -> None:
    errors = {record.value: record.headers["crc-error"] for record in scenario.on(f"dlq.{LISTENER_SERVICE}")}

    assert errors[adt("SEX-1", sex="1")].startswith("PID-8: administrative sex '1'")
    assert "MSH-10" in errors[adt("")]
    assert "999999" in errors[BAD_GRADE]


def test_accepted_messages_are_published(scenario: Scenario) -> None:
    records = [PatientRecord.from_bytes(record.value) for record in scenario.on("patient-records")]
    accepted = sum(
        1
        for case, replies in scenario.acks.items()
        for index in range(len(replies))
        if scenario.msa(case, index)[1] == "AA"
    )

    assert len(records) == accepted
    assert {record.patient_id for record in records} == {"PT-HL7-001", "PT-MLLP-1"}
    for record in scenario.on("patient-records"):
        assert record.key in (b"PT-HL7-001", b"PT-MLLP-1")


def test_large_message_is_published_whole(scenario: Scenario) -> None:
    (record,) = [
        PatientRecord.from_bytes(record.value)
        for record in scenario.on("patient-records")
        if b"PATH-LARGE" in (record.value or b"")
    ]
    texts = [
        entry["resource"].get("note", [{}])[0].get("text", "")
        for entry in record.bundle["entry"]
        if entry["resource"]["resourceType"] == "Observation"
    ]

    assert max(len(text) for text in texts) > 150_000


def test_record_merges_admission_and_reports(scenario: Scenario) -> None:
    records = [PatientRecord.from_bytes(record.value) for record in scenario.on("patient-records")]
    latest = [record for record in records if record.patient_id == "PT-HL7-001"][-1]

    assert "extent" not in latest.missing
    assert "age" not in latest.missing
    assert "obstruct" not in latest.missing


def test_file_producer(stack: Settings, tmp_path: Path) -> None:
    settings = isolated_settings(stack, tmp_path / "out")
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(ADT + b"\n" + adt("FILE-SEX", sex="2") + b"\r\n" + COLONOSCOPY)
    empty = tmp_path / "empty.hl7"
    empty.write_bytes(b"")

    summary = asyncio.run(publish_hl7_files(settings, [batch, empty]))
    records = asyncio.run(
        collect_records(
            settings,
            ["patient-records", f"dlq.{FILE_SERVICE}"],
            until=lambda received: len(received) >= 3,
            timeout_s=60,
        )
    )

    assert summary.accepted == ["batch.hl7#1", "batch.hl7#3"]
    assert list(summary.rejected) == ["batch.hl7#2", "empty.hl7"]
    assert summary.rejected["batch.hl7#2"].startswith("AE PID-8")
    dead = [record for record in records if record.topic == settings.topic(f"dlq.{FILE_SERVICE}")]
    assert [record.value for record in dead] == [adt("FILE-SEX", sex="2")]
    assert dead[0].headers["crc-origin-source"] == "file batch.hl7#2 MSH-10=FILE-SEX"
    assert len([record for record in records if record.topic == settings.topic("patient-records")]) == 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_listener_command(stack: Settings, tmp_path: Path) -> None:
    settings = isolated_settings(stack, tmp_path / "out")
    port = free_port()
    env = {**os.environ, **settings_env(settings), "CRC_HL7_LISTENER_PORT": str(port)}
    log = tmp_path / "listener.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "crc_medai.cli", "hl7-listener"], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        acks = asyncio.run(_exchange_when_up(port, process))
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)

    assert segment(acks[0], "MSA")[1:3] == ["AA", "CLI-1"], log.read_text()
    assert returncode == 0, log.read_text()
    assert "mllp listener stopped" in log.read_text()


async def _exchange_when_up(port: int, process: subprocess.Popen[bytes]) -> list[str]:
    for _ in range(600):
        assert process.poll() is None, "the listener exited before accepting connections"
        try:
            return await exchange(port, "whole", [adt("CLI-1", patient="PT-CLI-1")])
        except ConnectionRefusedError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"the listener did not accept connections on port {port}")


def test_record_json_has_no_decimals_as_strings(scenario: Scenario) -> None:
    raw = next(record.value for record in scenario.on("patient-records") if b"PATH-000202" in (record.value or b""))
    bundle = json.loads(raw)["bundle"]
    quantities = [
        entry["resource"]["valueQuantity"]["value"] for entry in bundle["entry"] if "valueQuantity" in entry["resource"]
    ]

    assert quantities and all(isinstance(value, int | float) for value in quantities)


async def send_oversized(settings: Settings) -> tuple[str, bytes]:
    """Send a frame over the listener's size limit; return the ACK and what follows it on the connection."""
    await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{LISTENER_SERVICE}"))
    producer = create_producer(settings)
    await producer.start()
    intake = RecordIntake(settings, producer, service=LISTENER_SERVICE)
    listener = Hl7Listener(Hl7Ingest(intake), "127.0.0.1", 0, max_message_bytes=1000)
    port = await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(large_report(2000)))
        await writer.drain()
        (ack,) = MllpDecoder().feed(await asyncio.wait_for(reader.read(65536), timeout=60))
        rest = await asyncio.wait_for(reader.read(), timeout=60)
        writer.close()
        return ack.decode(), rest
    finally:
        await listener.close()
        await intake.close()
        await producer.stop()


def test_oversized_frame_is_rejected(stack: Settings, tmp_path: Path) -> None:
    settings = isolated_settings(stack, tmp_path / "out")

    ack, rest = asyncio.run(send_oversized(settings))
    (dead,) = asyncio.run(
        collect_records(settings, [f"dlq.{LISTENER_SERVICE}"], until=lambda received: len(received) >= 1, timeout_s=60)
    )

    assert segment(ack, "MSA")[1:3] == ["AR", ""]
    assert "exceeds 1000 bytes" in segment(ack, "ERR")[8]
    assert rest == b"", "the listener must close the connection after an oversized frame"
    assert dead.headers["crc-error-type"] == "MllpFramingError"


def test_repeated_message_keeps_event_id(scenario: Scenario) -> None:
    records = [PatientRecord.from_bytes(record.value) for record in scenario.on("patient-records")]
    first, repeated = [record for record in records if "MSH-10=ADT-000101" in record.source_name]

    assert repeated.event_id == first.event_id
    assert repeated.bundle == first.bundle


def big_report(order: int, size: int) -> bytes:
    """A large ORU^R01 for patient PT-BIG-1 under its own order number."""
    return (
        large_report(size)
        .replace(b"PT-HL7-001", b"PT-BIG-1")
        .replace(b"S24-1234", f"S24-BIG-{order}".encode())
        .replace(b"PATH-LARGE", f"PATH-BIG-{order}".encode())
    )


async def ingest_big_reports(settings: Settings, messages: list[bytes]) -> list[tuple[str, str | None]]:
    await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{LISTENER_SERVICE}"))
    producer = create_producer(settings)
    await producer.start()
    intake = RecordIntake(settings, producer, service=LISTENER_SERVICE)
    try:
        ingest = Hl7Ingest(intake)
        outcomes = [await ingest.ingest(raw, source="test") for raw in messages]
    finally:
        await intake.close()
        await producer.stop()
    return [(outcome.ack_code, outcome.error.error_code if outcome.error else None) for outcome in outcomes]


def test_record_over_broker_limit(stack: Settings, tmp_path: Path) -> None:
    # A 1 MiB record limit, so three reports of about 380 kB of JSON each pass it.
    settings = isolated_settings(stack, tmp_path / "out").model_copy(update={"kafka_max_message_bytes": 1024 * 1024})
    messages = [big_report(order, 450_000) for order in range(3)]

    outcomes = asyncio.run(ingest_big_reports(settings, messages))
    dead = asyncio.run(
        collect_records(settings, [f"dlq.{LISTENER_SERVICE}"], until=lambda received: len(received) >= 1, timeout_s=60)
    )

    # Each report adds about 380 kB of JSON to the merged record; the third passes the limit.
    assert outcomes == [("AA", None), ("AA", None), ("AE", "102")]
    assert [record.value for record in dead] == [messages[2]]
    assert "more than the Kafka limit" in dead[0].headers["crc-error"]


async def send_unframed(settings: Settings) -> str:
    """Send a frame with trailing whitespace, then stray bytes and an unfinished frame; return the one ACK."""
    await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{LISTENER_SERVICE}"))
    producer = create_producer(settings)
    await producer.start()
    intake = RecordIntake(settings, producer, service=LISTENER_SERVICE)
    listener = Hl7Listener(Hl7Ingest(intake), "127.0.0.1", 0, max_message_bytes=settings.hl7_max_message_bytes)
    port = await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(frame(adt("UNFRAMED-1")) + b"\r\n")
        await writer.drain()
        (ack,) = MllpDecoder().feed(await asyncio.wait_for(reader.read(65536), timeout=60))
        writer.write(b"stray bytes")
        await writer.drain()
        writer.write(b"\x0bMSH|^~\\&|unfinished")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        return ack.decode()
    finally:
        await listener.close()
        await intake.close()
        await producer.stop()


def test_unframed_bytes_are_dead_lettered(stack: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = isolated_settings(stack, tmp_path / "out")

    with caplog.at_level(logging.WARNING, logger="producers.hl7.listener"):
        ack = asyncio.run(send_unframed(settings))
    dead = asyncio.run(
        collect_records(settings, [f"dlq.{LISTENER_SERVICE}"], until=lambda received: len(received) >= 2, timeout_s=60)
    )
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.name == "producers.hl7.listener"
    ]

    assert segment(ack, "MSA")[1:3] == ["AA", "UNFRAMED-1"]
    assert [record.value for record in dead] == [b"stray bytes", b"\x0bMSH|^~\\&|unfinished"]
    assert all(record.headers["crc-error-type"] == "MllpFramingError" for record in dead)
    assert "11 bytes arrived outside an MLLP frame" in dead[0].headers["crc-error"]
    assert "closed inside an MLLP frame after 20 bytes" in dead[1].headers["crc-error"]
    assert any("bytes outside a frame discarded" in message and "bytes=11" in message for message in warnings)
    assert any("closed inside a frame" in message and "bytes=20" in message for message in warnings)
    assert len(warnings) == 2, "the line break after the first frame must not be reported"
