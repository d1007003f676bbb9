"""One contract for the mail transports (SMTP against a real aiosmtpd server on loopback, and ``.eml``
files in a directory) and for the Jinja templates they carry: what arrives is a well-formed
multipart/alternative message with the rendered content, whichever transport carried it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path

import jinja2
import pytest

from keel.contexts.notifications.adapters.mailers import FileMailer, SmtpMailer
from keel.contexts.notifications.adapters.templates import JinjaTemplateRenderer
from keel.contexts.notifications.domain.model import EmailKind, OutgoingEmail, Rendered, message_id
from keel.contexts.notifications.ports.repositories import Mailer
from keel.platform.domain.ids import new_id
from tests.support.servers import free_port
from tests.support.smtp import smtp_server

SENDER = "Keel <no-reply@keel.localhost>"


@dataclass
class Transport:
    name: str
    mailer: Mailer
    delivered: Callable[[], list[bytes]]  # raw messages that reached the other side, in arrival order


@pytest.fixture(params=["smtp", "file"])
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    if request.param == "smtp":
        with smtp_server() as smtp:
            yield Transport("smtp", SmtpMailer(smtp.url, SENDER, timeout=10), lambda: [d.data for d in smtp.delivered])
        return
    directory = tmp_path / "mail"

    def files() -> list[bytes]:
        paths = sorted(directory.glob("*.eml"), key=lambda p: p.stat().st_mtime_ns) if directory.exists() else []
        return [p.read_bytes() for p in paths]

    yield Transport("file", FileMailer(directory, SENDER), files)


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=policy.default)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def body(msg: EmailMessage, subtype: str) -> str:
    """One alternative's decoded content, with line ends as written (SMTP carries them as CRLF)."""
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    return str(part.get_content()).replace("\r\n", "\n")


def rendered_email(kind: EmailKind = EmailKind.WELCOME, **values: str) -> OutgoingEmail:
    event_id = new_id()
    defaults = {"name": "Ada Lovelace"} if FREE_TEXT[kind] == "name" else VALUES[kind]
    r = JinjaTemplateRenderer().render(kind, {**defaults, "organization": "Acme", **values})
    return OutgoingEmail(
        to="ada@acme.test",
        subject=r.subject,
        text=r.text,
        html=r.html,
        message_id=message_id(event_id, kind, "keel.localhost"),
        headers={"X-Keel-Event-Id": str(event_id)},
    )


# -- transports ---------------------------------------------------------------------------------------------


async def test_the_delivered_message_is_multipart_alternative_with_headers_and_both_parts(
    transport: Transport,
) -> None:
    email = rendered_email(EmailKind.WELCOME, organization="Acme Rockets")
    await transport.mailer.send(email)

    [raw] = transport.delivered()
    msg = parse(raw)
    assert parseaddr(msg["To"])[1] == "ada@acme.test"
    assert parseaddr(msg["From"]) == ("Keel", "no-reply@keel.localhost")
    assert msg["Subject"] == "Welcome to Keel, Acme Rockets"
    assert msg["Message-ID"] == email.message_id
    assert msg["X-Keel-Event-Id"] == email.headers["X-Keel-Event-Id"]
    assert msg["Date"]
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert body(msg, "plain") == email.text
    assert body(msg, "html") == email.html
    assert "Hello Ada Lovelace," in body(msg, "plain")
    assert "<strong>Acme Rockets</strong>" in body(msg, "html")


async def test_non_ascii_names_survive_the_transport(transport: Transport) -> None:
    email = rendered_email(EmailKind.USER_INVITE, name="Zoë Ångström", organization="Ünïcode GmbH — Köln")
    await transport.mailer.send(email)

    [raw] = transport.delivered()
    msg = parse(raw)
    assert msg["Subject"] == "You have been added to Ünïcode GmbH — Köln"
    assert "Hello Zoë Ångström," in body(msg, "plain")
    assert "<strong>Ünïcode GmbH — Köln</strong>" in body(msg, "html")


async def test_a_refund_email_with_non_ascii_text_survives_the_transport(transport: Transport) -> None:
    email = rendered_email(
        EmailKind.REFUND_RECEIPT, organization="Ünïcode GmbH — Köln", description="Bestellung № 1042 (Größe L) 🦀"
    )
    await transport.mailer.send(email)

    [raw] = transport.delivered()
    msg = parse(raw)
    assert msg["Subject"] == "Ünïcode GmbH — Köln refunded 23.45 EUR"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert body(msg, "plain") == email.text
    assert body(msg, "html") == email.html
    assert "For: Bestellung № 1042 (Größe L) 🦀\n" in body(msg, "plain")
    assert "Refunded so far: 73.45 EUR" in body(msg, "plain")


@pytest.mark.parametrize("brk", ["\r\n", "\n", "\u2028", "\x85"])
async def test_a_header_value_with_a_line_break_is_folded_never_injected(transport: Transport, brk: str) -> None:
    """Folded to one line rather than refused: a refusal would fail the job on every retry, and the mail
    would never leave (names stored with such characters before the edge refused them)."""
    email = replace(rendered_email(), subject=f"Welcome{brk}Bcc: everyone@evil.test")
    await transport.mailer.send(email)
    [raw] = transport.delivered()
    msg = parse(raw)
    assert msg["Subject"] == "Welcome Bcc: everyone@evil.test"
    assert msg["Bcc"] is None
    assert msg["To"] == "ada@acme.test"


async def test_smtp_envelope_goes_to_the_recipient_from_the_sender_address() -> None:
    with smtp_server() as smtp:
        await SmtpMailer(smtp.url, SENDER, timeout=10).send(rendered_email())
        [delivered] = smtp.delivered
    assert delivered.mail_from == "no-reply@keel.localhost"
    assert delivered.rcpt_tos == ("ada@acme.test",)


async def test_smtp_raises_when_the_server_refuses_so_the_job_retries() -> None:
    with smtp_server(refuse=1) as smtp:
        mailer = SmtpMailer(smtp.url, SENDER, timeout=10)
        email = rendered_email()
        with pytest.raises(Exception, match="Try again later"):
            await mailer.send(email)
        assert smtp.delivered == []
        await mailer.send(email)
        assert len(smtp.delivered) == 1


async def test_smtp_raises_when_nobody_listens() -> None:
    mailer = SmtpMailer(f"smtp://127.0.0.1:{free_port()}", SENDER, timeout=5)
    with pytest.raises(Exception, match=r"(?i)connect"):
        await mailer.send(rendered_email())


async def test_file_mailer_writing_the_same_message_twice_leaves_one_file(tmp_path: Path) -> None:
    directory = tmp_path / "mail"
    mailer = FileMailer(directory, SENDER)
    email = rendered_email()
    await mailer.send(email)
    await mailer.send(email)
    files = list(directory.iterdir())
    assert len(files) == 1
    assert files[0].suffix == ".eml"
    assert parse(files[0].read_bytes())["Message-ID"] == email.message_id
    # A different email is a different file.
    await mailer.send(rendered_email())
    assert len(list(directory.glob("*.eml"))) == 2
    assert not list(directory.glob("*.tmp"))


async def test_file_mailer_keeps_hostile_message_ids_inside_its_directory(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "mail"
    mailer = FileMailer(directory, SENDER)
    await mailer.send(replace(rendered_email(), message_id="<../../../escape/x@keel.localhost>"))
    written = files_under(tmp_path)
    assert len(written) == 1
    assert written[0].parent == directory
    assert "/" not in written[0].name


# -- templates ----------------------------------------------------------------------------------------------

PAYMENT_ID = "0197a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
# Every value each kind's templates take (the service may supply more: refunds also get paid_at).
VALUES: dict[EmailKind, dict[str, str]] = {
    EmailKind.WELCOME: {"name": "Ada", "organization": "Acme"},
    EmailKind.USER_INVITE: {"name": "Ada", "organization": "Acme"},
    EmailKind.PAYMENT_RECEIPT: {
        "organization": "Acme",
        "amount": "123.45 EUR",
        "description": "Order #1042",
        "payment_id": PAYMENT_ID,
        "paid_at": "2026-11-24 03:10 UTC",
    },
    EmailKind.REFUND_RECEIPT: {
        "organization": "Acme",
        "amount": "123.45 EUR",
        "description": "Order #1042",
        "payment_id": PAYMENT_ID,
        "refund_amount": "23.45 EUR",
        "refunded_total": "73.45 EUR",
    },
}
# The person-supplied text of each kind besides the organization: what a hostile tenant or user controls.
FREE_TEXT = {
    EmailKind.WELCOME: "name",
    EmailKind.USER_INVITE: "name",
    EmailKind.PAYMENT_RECEIPT: "description",
    EmailKind.REFUND_RECEIPT: "description",
}


def render(kind: EmailKind, **changes: str) -> Rendered:
    return JinjaTemplateRenderer().render(kind, {**VALUES[kind], **changes})


def test_every_kind_has_template_values() -> None:
    assert set(VALUES) == set(EmailKind) == set(FREE_TEXT)


@pytest.mark.parametrize("kind", list(EmailKind))
def test_every_kind_renders_subject_text_and_html(kind: EmailKind) -> None:
    r = render(kind)
    assert "Acme" in r.subject
    assert r.subject == r.subject.strip()
    assert "\n" not in r.subject
    assert r.html.lstrip().lower().startswith("<!doctype html>")
    # Every value it is given shows up in both parts: none is silently dropped.
    for name, value in VALUES[kind].items():
        assert value in r.text, f"{kind}: {name} missing from the text part"
        assert value in r.html, f"{kind}: {name} missing from the HTML part"
    if "name" in VALUES[kind]:
        assert "Hello Ada," in r.text
        assert "Hello Ada," in r.html


def test_the_payment_receipt_reads_as_a_receipt() -> None:
    r = render(EmailKind.PAYMENT_RECEIPT)
    assert r.subject == "Your receipt from Acme: 123.45 EUR"
    assert r.text == (
        "Thank you for your payment to Acme.\n"
        "\n"
        "Amount paid: 123.45 EUR\n"
        "For: Order #1042\n"
        "Date: 2026-11-24 03:10 UTC\n"
        f"Payment reference: {PAYMENT_ID}\n"
        "\n"
        "Keep this email as your receipt.\n"
    )
    assert "<strong>123.45 EUR</strong>" in r.html
    assert f"<code>{PAYMENT_ID}</code>" in r.html


def test_the_refund_email_names_the_refund_the_payment_and_the_total() -> None:
    r = render(EmailKind.REFUND_RECEIPT)
    assert r.subject == "Acme refunded 23.45 EUR"
    assert r.text == (
        "Acme has refunded 23.45 EUR of your payment of 123.45 EUR.\n"
        "\n"
        "For: Order #1042\n"
        f"Payment reference: {PAYMENT_ID}\n"
        "Refunded so far: 73.45 EUR\n"
        "\n"
        "Depending on your bank, the money reaches your account within 5 to 10 business days.\n"
    )
    assert "<strong>Acme</strong> has refunded <strong>23.45 EUR</strong>" in r.html
    assert "<td>73.45 EUR</td>" in r.html


@pytest.mark.parametrize("kind", [EmailKind.PAYMENT_RECEIPT, EmailKind.REFUND_RECEIPT])
def test_an_empty_description_leaves_its_line_out(kind: EmailKind) -> None:
    r = render(kind, description="")
    assert "For:" not in r.text
    assert "<td>For</td>" not in r.html
    assert "\n\n\n" not in r.text
    assert f"Payment reference: {PAYMENT_ID}\n" in r.text


@pytest.mark.parametrize("kind", list(EmailKind))
def test_html_is_autoescaped_and_text_is_verbatim(kind: EmailKind) -> None:
    free = FREE_TEXT[kind]
    r = render(kind, **{free: "<b>x</b>", "organization": "R&D <script>alert(1)</script>"})
    assert "<b>x</b>" not in r.html
    assert "&lt;b&gt;x&lt;/b&gt;" in r.html
    assert "<script>" not in r.html
    assert "R&amp;D &lt;script&gt;" in r.html
    assert "<b>x</b>" in r.text
    assert "R&D <script>alert(1)</script>" in r.text
    assert "R&D <script>alert(1)</script>" in r.subject
    if free == "name":
        assert "Hello <b>x</b>," in r.text


@pytest.mark.parametrize(
    ("kind", "missing"),
    [(kind, name) for kind in EmailKind for name in VALUES[kind]],
)
def test_a_missing_value_fails_loudly(kind: EmailKind, missing: str) -> None:
    values = {k: v for k, v in VALUES[kind].items() if k != missing}
    with pytest.raises(jinja2.UndefinedError, match=missing):
        JinjaTemplateRenderer().render(kind, values)


async def test_autoescaped_html_arrives_escaped_through_a_transport(transport: Transport) -> None:
    await transport.mailer.send(rendered_email(name="<b>x</b>"))
    [raw] = transport.delivered()
    msg = parse(raw)
    assert "Hello <b>x</b>," in body(msg, "plain")
    assert "Hello &lt;b&gt;x&lt;/b&gt;," in body(msg, "html")
