from __future__ import annotations

from keel.platform.domain.errors import Conflict, InvalidInput, NotFound


class PaymentNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Payment not found.")


class RefundNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Refund not found.")


class UnknownCurrency(InvalidInput):
    def __init__(self, code: str) -> None:
        super().__init__(f"{code!r} is not an ISO 4217 currency code Keel accepts.", pointer="#/currency")


class IllegalTransition(Conflict):
    """The payment's state does not allow the operation (refunding a pending payment, say)."""

    code = "payment-state-conflict"


class RefundExceedsPayment(Conflict):
    code = "refund-exceeds-payment"

    def __init__(self, requested: int, refundable: int) -> None:
        super().__init__(
            f"A refund of {requested} exceeds what is left to refund ({refundable}, in minor units)."
            if refundable
            else "Nothing is left to refund on this payment."
        )


class ConcurrentChange(Conflict):
    """The payment changed between reading and writing it, several times in a row."""

    def __init__(self) -> None:
        super().__init__("The payment is being changed by another request; retry.")
