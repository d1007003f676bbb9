from __future__ import annotations

from keel.platform.domain.errors import Conflict, InvalidInput, NotFound


class EndpointNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Webhook endpoint not found.")


class DeliveryNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Webhook delivery not found.")


class UnsafeUrl(InvalidInput):
    code = "webhook-url-not-allowed"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, pointer="#/url")


class UnknownEventType(InvalidInput):
    def __init__(self, event_type: str, index: int) -> None:
        super().__init__(f"Unknown event type {event_type!r}.", pointer=f"#/event_types/{index}")


class DeliveryInProgress(Conflict):
    def __init__(self) -> None:
        super().__init__("This delivery is already waiting for an attempt; it cannot be retried now.")
