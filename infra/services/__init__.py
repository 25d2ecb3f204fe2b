"""The servers of the local stack, in start order."""

from __future__ import annotations

from infra.services.base import LocalService
from infra.services.kafka import KafkaService
from infra.services.minio import MinioService
from infra.services.redis import RedisService

SERVICE_CLASSES: dict[str, type[LocalService]] = {
    "kafka": KafkaService,
    "minio": MinioService,
    "redis": RedisService,
}

__all__ = ["SERVICE_CLASSES", "KafkaService", "LocalService", "MinioService", "RedisService"]
