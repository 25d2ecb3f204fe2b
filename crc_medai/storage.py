"""MinIO (S3) access for heatmaps and other binary outputs."""

from __future__ import annotations

import io
import logging

from minio import Minio

from crc_medai.settings import Settings

logger = logging.getLogger(__name__)


def create_minio(settings: Settings) -> Minio:
    """Return a MinIO client for the configured endpoint."""
    return Minio(
        settings.minio_endpoint,
        access_key=settings.minio_access_key,
        secret_key=settings.minio_secret_key.get_secret_value(),
        secure=settings.minio_secure,
    )


def ensure_bucket(client: Minio, bucket: str) -> None:
    """Create ``bucket`` if it does not exist."""
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
        logger.info("created bucket bucket=%s", bucket)


def put_png(client: Minio, bucket: str, key: str, data: bytes) -> None:
    """Store PNG bytes under ``key``."""
    client.put_object(bucket, key, io.BytesIO(data), length=len(data), content_type="image/png")
