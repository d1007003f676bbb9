from __future__ import annotations

from keel.platform.domain.errors import Conflict, InvalidInput, NotFound


class TenantNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Tenant not found.")


class UserNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("User not found.")


class ApiKeyNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("API key not found.")


class EmailTaken(Conflict):
    code = "email-taken"

    def __init__(self) -> None:
        super().__init__("A user with this email already exists in this tenant.", pointer="#/email")


class OwnerUndeletable(Conflict):
    def __init__(self) -> None:
        super().__init__("The tenant owner cannot be deleted.")


class UnknownTimezone(InvalidInput):
    def __init__(self, tz: str) -> None:
        super().__init__(f"Unknown IANA timezone {tz!r}.", pointer="#/timezone")


class EmailTooLong(InvalidInput):
    def __init__(self) -> None:
        super().__init__("The email address is too long once normalized.", pointer="#/email")
