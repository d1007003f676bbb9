"""Avatars: an original as uploaded, and square WebP variants made from it by a job."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

AVATAR_SIZES = (64, 256)  # pixels, square
DEFAULT_SIZE = 256
VARIANT_TYPE = "image/webp"
# Accepted uploads: media type -> the format the decoder must find in the bytes.
ACCEPTED_TYPES: Mapping[str, str] = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
# A 5 MiB file can decode to gigabytes (a "decompression bomb"); refuse anything larger than this.
MAX_PIXELS = 40_000_000


class AvatarStatus(enum.StrEnum):
    PROCESSING = "processing"  # an upload waits for its variants (earlier variants are still served)
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    key: str  # in the blob store
    etag: str
    size_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageInfo:
    format: str  # "PNG", "JPEG", "WEBP"
    width: int
    height: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Avatar:
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    upload_id: uuid.UUID  # the latest upload; a job for an older one is superseded
    status: AvatarStatus
    original_key: str
    original_type: str
    created_at: datetime
    updated_at: datetime
    variants: Mapping[int, Variant] = field(default_factory=dict)  # of the last processed upload
    error: str | None = None


def blob_prefix(tenant_id: uuid.UUID, user_id: uuid.UUID, upload_id: uuid.UUID) -> str:
    return f"avatars/{tenant_id}/{user_id}/{upload_id}"
