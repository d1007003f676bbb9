"""Avatar upload and download. Validation happens here, at the edge: the media type (415), the size
(413) and the image itself (422: undecodable, damaged, or a decompression bomb) are checked before
anything is stored or queued."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from litestar import Controller, Response, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, Parameter
from litestar.status_codes import HTTP_304_NOT_MODIFIED

from keel.contexts.media.domain.model import ACCEPTED_TYPES, DEFAULT_SIZE, MAX_UPLOAD_BYTES
from keel.contexts.media.domain.services import MediaService
from keel.platform.adapters.http.auth import BEARER_AUTH, Authenticated
from keel.platform.adapters.http.jobs import JobAccepted, accepted
from keel.platform.adapters.http.problems import problem_responses, problem_type

problem_type(
    "invalid-image", 422, "The body is not a readable PNG, JPEG or WebP image, or it decodes to too many pixels."
)

Media = NamedDependency[MediaService]
Size = Annotated[Literal[64, 256], Parameter(description="Edge of the square variant, in pixels.")]
# Clients revalidate with If-None-Match each time (a cheap 304): a new avatar shows at once.
_CACHE_CONTROL = "private, no-cache"


class AvatarController(Controller):
    path = "/v1/users/{user_id:uuid}/avatar"
    tags = ["media"]
    security = BEARER_AUTH

    @put(
        "/",
        status_code=202,
        summary="Upload a user's avatar",
        description=(
            f"The body is the image itself (`image/png`, `image/jpeg` or `image/webp`, at most "
            f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MiB). Answers 202 with the job that makes the 64 and 256 px "
            "square WebP variants; the user's `avatar_url` is set once they exist."
        ),
        accepts=tuple(ACCEPTED_TYPES),
        raw_body=True,
        request_max_body_size=MAX_UPLOAD_BYTES,
        responses=problem_responses(400, 401, 404, 413, 415, 422, 429, 503),
    )
    async def upload_avatar(
        self,
        user_id: FromPath[uuid.UUID],
        request: Authenticated,
        media: Media,
    ) -> Response[JobAccepted]:
        data = await request.body()  # the size limit above applies while reading
        content_type = request.content_type[0].lower()
        return accepted(await media.upload_avatar(request.user, user_id, data, content_type))

    @get(
        "/",
        summary="Download a user's avatar",
        description="A square WebP with an `ETag`; 404 until the first upload has been processed.",
        media_type="image/webp",
        responses=problem_responses(400, 401, 404, 422, 429),
    )
    async def get_avatar(
        self,
        user_id: FromPath[uuid.UUID],
        request: Authenticated,
        media: Media,
        size: Size = DEFAULT_SIZE,  # type: ignore[assignment]
    ) -> Response[bytes]:
        image = await media.avatar_image(request.user, user_id, size)
        etag = f'"{image.etag}"'
        headers = {"ETag": etag, "Cache-Control": _CACHE_CONTROL}
        # RFC 9110 13.1.2: weak comparison, and "*" matches any current representation.
        tags = [t.strip().removeprefix("W/") for t in request.headers.get("if-none-match", "").split(",")]
        if "*" in tags or etag in tags:
            return Response(b"", status_code=HTTP_304_NOT_MODIFIED, headers=headers)
        return Response(image.data, media_type=image.content_type, headers=headers)


ROUTES = [AvatarController]
