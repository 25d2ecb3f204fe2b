"""The Device resource of each model version that produced a result.

Findings, heatmaps, risk Observations and RiskAssessments refer to the Device
of the model version that produced them (see ``resources.device_reference``).
The FHIR consumer emits each Device once, before the first resource that
refers to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from consumers.resources import (
    DEVICE_IDENTIFIER_SYSTEM,
    device_key,
    narrative,
    resource_id,
    validate,
)
from crc_medai.settings import Settings
from schemas.messages import ModelRef

logger = logging.getLogger(__name__)

MANUFACTURER = "CRC-MedAI project"
#: Extension carrying the link to a model card. R4 Device has no element for documentation links.
MODEL_CARD_EXTENSION = "https://crc-medai.example/fhir/StructureDefinition/model-card"


@dataclass(frozen=True)
class ModelFamily:
    """Description and model card of the models whose names start with ``prefix``."""

    prefix: str
    description: str
    model_card: str


#: Model families by name prefix; ``model_card`` is the card's path in the repository.
MODEL_FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "polyp-",
        "Polyp detector for colonoscopy video (U-Net with a presence head, Grad-CAM heatmaps)",
        "processors/detection/weights/MODEL_CARD.md",
    ),
    ModelFamily(
        "crc-recurrence-",
        "Colon cancer recurrence risk model (CatBoost, SHAP contributions)",
        "processors/prognosis/weights/MODEL_CARD.md",
    ),
)


def model_family(model: ModelRef) -> ModelFamily | None:
    """Return the family of a model, or None for a model the project does not describe."""
    return next((family for family in MODEL_FAMILIES if model.name.startswith(family.prefix)), None)


def model_device(model: ModelRef, model_card_base_url: str) -> dict[str, Any]:
    """Build the Device of one model version.

    Args:
        model: The model name and version from a result message.
        model_card_base_url: Base URL under which the repository's model cards
            are published; the card's repository path is appended to it.
    """
    key = device_key(model)
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "id": resource_id("device", key),
        "identifier": [{"system": DEVICE_IDENTIFIER_SYSTEM, "value": key}],
        "status": "active",
        "manufacturer": MANUFACTURER,
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "version": [{"value": model.version}],
        "type": {"text": "Software: machine learning model"},
    }

    summary = f"Model {model.name} version {model.version} by {MANUFACTURER}."
    family = model_family(model)
    if family is None:
        logger.warning("no model card known for model=%s version=%s", model.name, model.version)
        resource["text"] = narrative([summary])
        return validate(resource)

    card_url = model_card_base_url.rstrip("/") + "/" + family.model_card
    resource["deviceName"].append({"name": family.description, "type": "user-friendly-name"})
    resource["extension"] = [{"url": MODEL_CARD_EXTENSION, "valueUrl": card_url}]
    resource["note"] = [{"text": f"Model card: {card_url}"}]
    resource["text"] = narrative([summary, family.description, f"Model card: {card_url}"])
    return validate(resource)


class EmittedDevices:
    """The model versions whose Device was already emitted, kept in a Redis set so restarts remember them."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.key = settings.redis_key("fhir-consumer:devices")
        self._known: set[str] = set()

    async def is_new(self, model: ModelRef) -> bool:
        """Tell whether the Device of ``model`` has not been emitted yet."""
        key = device_key(model)
        if key in self._known:
            return False
        if await self.redis.sismember(self.key, key):
            self._known.add(key)
            return False
        return True

    async def mark_emitted(self, model: ModelRef) -> None:
        """Record that the Device of ``model`` was emitted; call it after the send succeeded."""
        key = device_key(model)
        await self.redis.sadd(self.key, key)
        self._known.add(key)
