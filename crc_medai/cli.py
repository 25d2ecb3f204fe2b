"""The ``crc-medai`` command: services, producers, the local stack and the demo."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from pathlib import Path

from crc_medai.errors import CrcMedAiError
from crc_medai.logs import configure_logging
from crc_medai.settings import REPO_ROOT, get_settings

logger = logging.getLogger("crc_medai")

SERVICES = ("detection", "prognosis", "fhir-consumer", "record-intake")

#: One-line description of each Faust worker in SERVICES, shown by ``crc-medai <service> --help``.
SERVICE_DESCRIPTIONS = {
    "detection": "Detect polyps in the frames topic with the U-Net detector, store Grad-CAM heatmaps in MinIO and "
    "publish detections and findings.",
    "prognosis": "Predict the recurrence risk of each patient record with the survival model and publish it, "
    "explained with SHAP, on prognoses.",
    "fhir-consumer": "Turn findings and prognoses into validated FHIR R4 resources and publish them on fhir-resources.",
    "record-intake": "Take raw FHIR R4 JSON from the ehr-inbound topic, merge it per patient and publish "
    "patient records.",
}

#: The pointer to the settings that every worker's help ends with.
SETTINGS_HELP = (
    "The worker runs until stopped (Ctrl-C or SIGTERM). Its settings come from CRC_* environment variables "
    "(see crc_medai/settings.py), for example CRC_KAFKA_BOOTSTRAP_SERVERS, CRC_TOPIC_PREFIX and CRC_LOG_LEVEL."
)

#: Prognosis tools: subcommand -> (module in processors.prognosis, help text).
PROGNOSIS_TOOLS = {
    "train-prognosis": ("train_survival", "train the recurrence survival model"),
    "evaluate-prognosis": ("evaluate", "cross-validate it against a Cox PH baseline and write the report"),
    "benchmark-prognosis": ("benchmark", "time per-record scoring and what-if requests"),
    "what-if": ("whatif", "simulate the risk of a patient with changed values"),
    "what-if-api": ("api", "serve the what-if API (FastAPI, OpenAPI docs at /docs)"),
}

#: FHIR result services: subcommand -> (module, help text); each module has main(argv) and the workers build_app.
FHIR_TOOLS = {
    "fhir-delivery": ("consumers.delivery", "deliver fhir-resources to the FHIR server (a Faust worker)"),
    "fhir-view": ("consumers.view", "keep the FHIR view in Redis (a Faust worker); --rebuild replays the topic"),
    "fhir-api": ("consumers.fhir_api", "serve the FHIR read API over the view (FastAPI, uvicorn)"),
}

#: Detection tools: subcommand -> (module, help text); each module has main(argv).
DETECTION_TOOLS = {
    "train-detection": (
        "processors.detection.train",
        "train the polyp U-Net on generated endoscopy frames, optionally with a labelled folder",
    ),
    "evaluate-detection": (
        "processors.detection.evaluate",
        "score the detector on generated frames, generated videos or a Kvasir-SEG or CVC-ClinicDB folder",
    ),
    "benchmark-detection": (
        "processors.detection.benchmark",
        "time the bare detector and the pipeline through Kafka at 30 fps; writes docs/benchmarks/detection.md",
    ),
}

#: Model lifecycle tools: subcommand -> (module, help text); each module has main(argv).
MODEL_TOOLS = {
    "models": (
        "crc_medai.lifecycle.cli",
        "train, register, list, gate, promote and roll back model versions (MLflow registry)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subcommand per task."""
    parser = argparse.ArgumentParser(prog="crc-medai", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    stack = commands.add_parser("stack", help="provision, start, stop or inspect the local Kafka, MinIO and Redis")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument("args", nargs=argparse.REMAINDER, help="passed on, e.g. --only kafka, --json")

    for service in SERVICES:
        commands.add_parser(
            service,
            help=f"run the {service} service (a Faust worker) until stopped",
            description=f"{SERVICE_DESCRIPTIONS[service]} {SETTINGS_HELP}",
        )

    frames = commands.add_parser("produce-frames", help="publish a video's frames on the frames topic")
    frames.add_argument("video", help="video file, camera device index (e.g. 0) or stream URL (e.g. rtsp://...)")
    frames.add_argument("--procedure-id", required=True, help="stream key, a pseudonymous procedure id")
    frames.add_argument(
        "--patient-id", default=None, help="pseudonym of the patient examined, from the worklist; the findings' subject"
    )
    frames.add_argument("--fast", action="store_true", help="publish as fast as possible instead of at the video's fps")
    frames.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    frames.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality, 1-100 (default 90)")
    frames.add_argument("--width", type=int, default=None, help="resize frames to this width in pixels")
    frames.add_argument("--height", type=int, default=None, help="resize frames to this height in pixels")
    frames.add_argument(
        "--reconnect-attempts", type=int, default=5, help="reopen attempts when a camera or stream drops (default 5)"
    )

    records = commands.add_parser("produce-records", help="publish FHIR R4 Bundle files on the patient-records topic")
    records.add_argument(
        "paths", type=Path, nargs="+", help="FHIR R4 JSON (Bundle or resource) and NDJSON files, or folders of them"
    )

    gateway = commands.add_parser("record-gateway", help="serve the HTTP endpoint that accepts FHIR R4 records")
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, default=8020, help="TCP port to listen on (default 8020)")

    hl7_files = commands.add_parser(
        "produce-hl7", help="publish HL7 v2 ADT and ORU messages from files as patient records"
    )
    hl7_files.add_argument("paths", type=Path, nargs="+", help="files of one or several HL7 v2 messages, or folders")
    hl7_listener = commands.add_parser(
        "hl7-listener", help="receive HL7 v2 messages over MLLP and acknowledge each one until stopped"
    )
    hl7_listener.add_argument("--host", default=None, help="address to bind (default CRC_HL7_LISTENER_HOST)")
    hl7_listener.add_argument("--port", type=int, default=None, help="TCP port (default CRC_HL7_LISTENER_PORT, 2575)")

    demo = commands.add_parser("demo", help="run the whole pipeline on the sample video and records")
    demo.add_argument(
        "--video",
        type=Path,
        default=REPO_ROOT / "samples" / "video" / "procedure-demo.mp4",
        help="video file of the procedure to stream as frames (default samples/video/procedure-demo.mp4)",
    )
    demo.add_argument(
        "--records",
        type=Path,
        default=REPO_ROOT / "samples" / "records",
        help="folder or file of FHIR R4 patient Bundles to publish (default samples/records)",
    )
    demo.add_argument("--fast", action="store_true", help="publish frames as fast as possible")
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all results (default 300)")

    for name, (_, help_text) in PROGNOSIS_TOOLS.items():
        tool = commands.add_parser(name, help=help_text, add_help=False)
        tool.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the tool; --help lists them")
    for name, (_, help_text) in FHIR_TOOLS.items():
        tool = commands.add_parser(name, help=help_text, add_help=False)
        tool.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the tool; --help lists them")
    for name, (_, help_text) in DETECTION_TOOLS.items():
        tool = commands.add_parser(name, help=help_text, add_help=False)
        tool.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the tool; --help lists them")
    for name, (_, help_text) in MODEL_TOOLS.items():
        tool = commands.add_parser(name, help=help_text, add_help=False)
        tool.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the tool; --help lists them")

    validate = commands.add_parser(
        "validate", help="validate FHIR R4 files with the HAPI FHIR instance validator (base R4 profiles)"
    )
    validate.add_argument("paths", type=Path, nargs="+", help="FHIR R4 JSON or XML files, or folders of them")
    validate.add_argument("-v", "--verbose", action="store_true", help="print warnings and information issues too")

    schemas = commands.add_parser("schemas", help="export the JSON Schema of every message")
    schemas.add_argument("--out", type=Path, default=REPO_ROOT / "schemas" / "json")
    return parser


def run_service(name: str) -> int:
    """Run one service's Faust worker in the foreground."""
    from faust.worker import Worker

    settings = get_settings()
    logger.info("starting service=%s settings=%s", name, json.dumps(settings.public_dump()))
    if name == "detection":
        from processors.detection.agent import build_app
    elif name == "prognosis":
        from processors.prognosis.agent import build_app
    elif name == "record-intake":
        from producers.record_intake import build_app
    elif name in FHIR_TOOLS:
        build_app = importlib.import_module(FHIR_TOOLS[name][0]).build_app
    else:
        from consumers.fhir_consumer import build_app

    asyncio.run(_ensure_topics(settings))
    app = build_app(settings)
    worker = Worker(app, loglevel=logging.getLevelName(logging.getLogger().level).lower(), quiet=True)
    worker.execute_from_commandline()
    return 0


async def _ensure_topics(settings) -> None:  # noqa: ANN001
    from crc_medai.kafka import ensure_topics

    await ensure_topics(settings)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``crc-medai`` console script."""
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # The stack launcher and the prognosis tools parse their own options.
        if argv and argv[0] == "stack" and argv[1:2] != ["-h"]:
            from infra.stack import main as stack_main

            return stack_main(argv[1:])
        if argv and argv[0] in PROGNOSIS_TOOLS:
            module = importlib.import_module(f"processors.prognosis.{PROGNOSIS_TOOLS[argv[0]][0]}")
            return module.main(argv[1:])
        if argv and argv[0] in FHIR_TOOLS:
            return importlib.import_module(FHIR_TOOLS[argv[0]][0]).main(argv[1:])
        if argv and argv[0] in DETECTION_TOOLS:
            return importlib.import_module(DETECTION_TOOLS[argv[0]][0]).main(argv[1:])
        if argv and argv[0] in MODEL_TOOLS:
            return importlib.import_module(MODEL_TOOLS[argv[0]][0]).main(argv[1:])
        return dispatch(build_parser().parse_args(argv))
    except CrcMedAiError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


def dispatch(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.command``."""
    settings = get_settings()
    if args.command in SERVICES:
        return run_service(args.command)
    if args.command == "produce-frames":
        from producers.frames import CaptureOptions, publish_video

        options = CaptureOptions(
            width=args.width,
            height=args.height,
            jpeg_quality=args.jpeg_quality,
            max_frames=args.max_frames,
            reconnect_attempts=args.reconnect_attempts,
        )
        summary = asyncio.run(
            publish_video(
                settings,
                args.video,
                args.procedure_id,
                realtime=not args.fast,
                options=options,
                patient_id=args.patient_id,
            )
        )
        print(json.dumps(summary.__dict__))
        return 0
    if args.command == "produce-records":
        from producers.records import publish_records

        summary = asyncio.run(publish_records(settings, args.paths))
        print(json.dumps({"published": summary.published, "rejected": summary.rejected}, indent=2))
        return 0 if not summary.rejected else 1
    if args.command == "produce-hl7":
        from producers.hl7.ingest import publish_hl7_files

        hl7_summary = asyncio.run(publish_hl7_files(settings, args.paths))
        print(json.dumps({"accepted": hl7_summary.accepted, "rejected": hl7_summary.rejected}, indent=2))
        return 0 if not hl7_summary.rejected else 1
    if args.command == "hl7-listener":
        from producers.hl7.listener import serve

        overrides = {"hl7_listener_host": args.host, "hl7_listener_port": args.port}
        given = {name: value for name, value in overrides.items() if value is not None}
        listener_settings = settings.model_copy(update=given)
        logger.info("starting service=hl7-listener settings=%s", json.dumps(listener_settings.public_dump()))
        asyncio.run(serve(listener_settings))
        return 0
    if args.command == "record-gateway":
        from producers.gateway import main as gateway_main

        return gateway_main(["--host", args.host, "--port", str(args.port)])
    if args.command == "demo":
        from crc_medai.demo import run_demo

        return run_demo(video=args.video, records=args.records, realtime=not args.fast, timeout_s=args.timeout)
    if args.command == "validate":
        from consumers.validation import run_validate_command

        logging.getLogger("httpx").setLevel(logging.WARNING)  # httpx logs every request at INFO
        return run_validate_command(args.paths, verbose=args.verbose)
    if args.command == "schemas":
        from schemas.export import export_json_schemas

        for path in export_json_schemas(args.out):
            print(path)
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
