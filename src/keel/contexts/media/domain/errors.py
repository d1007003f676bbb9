from __future__ import annotations

from keel.platform.domain.errors import InvalidInput, NotFound


class UserNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("User not found.")


class AvatarNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("This user has no avatar yet (or it is still being processed).")


class InvalidImage(InvalidInput):
    """The body is not a decodable image of the declared type, or it is too large once decoded."""

    code = "invalid-image"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, pointer="#")
