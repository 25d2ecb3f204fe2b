"""``crc-medai models``: train, register, list, gate, promote and roll back model versions.

Every subcommand prints JSON. ``gate`` and ``promote`` exit with 1 when the
candidate fails the gate, and print the decision with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from crc_medai.lifecycle.errors import GateRejectedError
from crc_medai.lifecycle.kinds import KINDS
from crc_medai.lifecycle.registry import ModelRegistry, VersionInfo
from crc_medai.settings import get_settings

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of ``crc-medai models``."""
    parser = argparse.ArgumentParser(
        prog="crc-medai models",
        description="Train, register, list, gate, promote and roll back model versions in the MLflow registry.",
    )
    commands = parser.add_subparsers(dest="action", required=True)
    kinds = sorted(KINDS)

    listing = commands.add_parser("list", help="list the registered versions with their aliases and gate decisions")
    listing.add_argument("kind", nargs="?", choices=kinds, help="one kind (default: both)")

    register = commands.add_parser("register", help="evaluate a weights file and register it as challenger")
    register.add_argument("kind", choices=kinds)
    register.add_argument("weights", type=Path, help="main weights file (.pt, or .cbm with its .json sidecar)")

    train = commands.add_parser("train", help="train a candidate, record the run and register it as challenger")
    train.add_argument("kind", choices=kinds)
    train.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    train.add_argument("--steps", type=int, default=None, help="detection: optimiser steps (default: the trainer's)")
    train.add_argument("--batch-size", type=int, default=None, help="detection: frames per step")
    train.add_argument("--pool-size", type=int, default=None, help="detection: generated frames kept in memory")
    train.add_argument("--frame-size", type=int, default=None, help="detection: side of generated frames in pixels")
    train.add_argument(
        "--patients", type=int, default=None, help="prognosis: train on a random sample of this many patients"
    )
    train.add_argument("--out", type=Path, default=None, help="folder for the weights (default: a temporary one)")

    for action, help_text in (
        ("gate", "compare a version with the champion on the held-out set and record the decision"),
        ("promote", "gate a version and, when it passes, make it the champion and publish the deployment"),
    ):
        command = commands.add_parser(action, help=help_text)
        command.add_argument("kind", choices=kinds)
        command.add_argument("version", help="registry version, for example 2")

    rollback = commands.add_parser("rollback", help="move the champion back to the previous one and publish it")
    rollback.add_argument("kind", choices=kinds)

    bootstrap = commands.add_parser("bootstrap", help="register the shipped weights as champion where none exists")
    bootstrap.add_argument("kind", nargs="?", choices=kinds, help="one kind (default: both)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``crc-medai models`` subcommand."""
    args = build_parser().parse_args(argv)
    registry = ModelRegistry(get_settings())
    kinds = [args.kind] if getattr(args, "kind", None) else sorted(KINDS)

    if args.action == "list":
        _print([{"kind": kind, "versions": [info.to_dict() for info in registry.versions(kind)]} for kind in kinds])
        return 0
    if args.action == "register":
        _print(registry.register_file(args.kind, args.weights).to_dict())
        return 0
    if args.action == "train":
        _print(_train(registry, args).to_dict())
        return 0
    if args.action == "gate":
        decision = registry.gate(args.kind, args.version)
        _print(decision.to_dict())
        return 0 if decision.passed else 1
    if args.action == "promote":
        try:
            decision, event = registry.promote(args.kind, args.version)
        except GateRejectedError as error:
            logger.error("%s", error)
            _print({"promoted": False, "decision": error.decision.to_dict() if error.decision else None})
            return 1
        _print({"promoted": True, "decision": decision.to_dict(), "event": event.model_dump(mode="json")})
        return 0
    if args.action == "rollback":
        _print(registry.rollback(args.kind).model_dump(mode="json"))
        return 0
    if args.action == "bootstrap":
        events = {kind: registry.bootstrap(kind) for kind in kinds}
        _print(
            {kind: event.model_dump(mode="json") if event else "already registered" for kind, event in events.items()}
        )
        return 0
    raise AssertionError(f"unhandled action {args.action}")


def _train(registry: ModelRegistry, args: argparse.Namespace) -> VersionInfo:
    from crc_medai.lifecycle.training import train_detection, train_prognosis

    with tempfile.TemporaryDirectory(prefix="crc-candidate-") as folder:
        out = args.out or Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if args.kind == "prognosis":
            return train_prognosis(registry, out, args.seed, patients=args.patients)

        from processors.detection.train import TrainingConfig

        overrides = {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "pool_size": args.pool_size,
            "frame_size": args.frame_size,
        }
        config = TrainingConfig(
            seed=args.seed, **{name: value for name, value in overrides.items() if value is not None}
        )
        return train_detection(registry, out, config)


def _print(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))
