"""Export the JSON Schema of every message contract."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.messages import MESSAGE_TYPES


def export_json_schemas(folder: Path) -> list[Path]:
    """Write one ``<topic>.schema.json`` file per message type and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for message_type in MESSAGE_TYPES:
        schema = message_type.model_json_schema(mode="serialization")
        schema["$id"] = f"https://crc-medai.example/schemas/{message_type.topic}.schema.json"
        path = folder / f"{message_type.topic}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
