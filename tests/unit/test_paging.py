"""Keyset pagination: page requests, overfetch, and opaque cursors."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass

import pytest

from keel.platform.adapters.http.paging import InvalidCursor, decode_cursor, encode_cursor, page_request
from keel.platform.domain.errors import InvalidInput
from keel.platform.domain.ids import new_id
from keel.platform.domain.paging import MAX_PAGE_SIZE, Page, PageRequest


@dataclass(frozen=True)
class Row:
    id: uuid.UUID


def rows(n: int) -> list[Row]:
    return sorted((Row(new_id()) for _ in range(n)), key=lambda r: r.id)


# -- PageRequest ------------------------------------------------------------------------------


def test_page_request_defaults() -> None:
    req = PageRequest()
    assert req.limit == 50
    assert req.after is None
    assert req.fetch == 51


@pytest.mark.parametrize("limit", [1, 2, 50, MAX_PAGE_SIZE])
def test_page_request_accepts_bounds(limit: int) -> None:
    req = PageRequest(limit=limit)
    assert req.limit == limit
    assert req.fetch == limit + 1


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_SIZE + 1, 10_000])
def test_page_request_rejects_out_of_bounds(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        PageRequest(limit=limit)


def test_max_page_size() -> None:
    assert MAX_PAGE_SIZE == 100


# -- Page.from_overfetch ----------------------------------------------------------------------


def test_from_overfetch_with_more_rows() -> None:
    data = rows(4)
    page = Page.from_overfetch(data, PageRequest(limit=3))
    assert page.items == data[:3]
    assert page.next_after == data[2].id


def test_from_overfetch_exact_page_is_last() -> None:
    data = rows(3)
    page = Page.from_overfetch(data, PageRequest(limit=3))
    assert page.items == data
    assert page.next_after is None


def test_from_overfetch_short_page_is_last() -> None:
    data = rows(2)
    page = Page.from_overfetch(data, PageRequest(limit=3))
    assert page.items == data
    assert page.next_after is None


def test_from_overfetch_empty() -> None:
    page: Page[Row] = Page.from_overfetch([], PageRequest(limit=3))
    assert list(page.items) == []
    assert page.next_after is None


def test_from_overfetch_copies_items() -> None:
    data = rows(2)
    page = Page.from_overfetch(data, PageRequest(limit=5))
    data.clear()
    assert len(page.items) == 2


def test_walking_pages_sees_every_row_once() -> None:
    data = rows(10)
    seen: list[Row] = []
    after: uuid.UUID | None = None
    while True:
        req = PageRequest(limit=3, after=after)
        remaining = [r for r in data if after is None or r.id > after]
        page = Page.from_overfetch(remaining[: req.fetch], req)
        seen.extend(page.items)
        if page.next_after is None:
            break
        # As a client would: through the opaque cursor.
        after = decode_cursor(encode_cursor(page.next_after))
    assert seen == data


# -- cursors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.UUID("0192f3c4-5d6e-7f80-9a1b-2c3d4e5f6071")],
)
def test_cursor_round_trip_edge_values(value: uuid.UUID) -> None:
    cursor = encode_cursor(value)
    assert cursor is not None
    assert decode_cursor(cursor) == value


def test_cursor_round_trip_many() -> None:
    for _ in range(200):
        value = new_id() if _ % 2 else uuid.uuid4()
        cursor = encode_cursor(value)
        assert cursor is not None
        assert len(cursor) == 22
        assert "=" not in cursor
        # URL-safe: usable in a query string without escaping.
        assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert decode_cursor(cursor) == value


def test_cursor_none() -> None:
    assert encode_cursor(None) is None
    assert decode_cursor(None) is None


def test_page_request_from_cursor() -> None:
    value = new_id()
    req = page_request(7, encode_cursor(value))
    assert req == PageRequest(limit=7, after=value)
    assert page_request(7, None) == PageRequest(limit=7)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "junk",
    [
        "",  # empty: zero bytes
        "A",  # impossible base64 length
        "AAAAA",  # impossible base64 length
        "!!!!",  # no base64 characters at all
        "@@@@@@@@@@@@@@@@@@@@@@",
        _b64(b"x" * 15),  # too short
        _b64(b"x" * 17),  # too long
        _b64(b"x" * 32),
        _b64(b"hello"),
        "é" * 22,  # non-ASCII
        "AAAAAAAAAAAAAAAAAAAAAé",
        "\u200b" * 4,
        "🙂🙂🙂🙂",
        "AAAA\x00",
    ],
)
def test_junk_cursor_is_invalid(junk: str) -> None:
    with pytest.raises(InvalidCursor) as exc:
        decode_cursor(junk)
    assert isinstance(exc.value, InvalidInput)
    assert exc.value.pointer == "#/cursor"
    assert exc.value.code == "validation-error"
    with pytest.raises(InvalidCursor):
        page_request(10, junk)


@pytest.mark.parametrize("junk", [".", "!", " "])
def test_cursor_with_non_base64url_characters_is_invalid(junk: str) -> None:
    """Decoding validates the alphabet: a lenient decoder would drop the junk, so
    ``"AZLzxF1uf4....CaGyw9Tl9gcQ"`` would decode to the same id as the issued ``"AZLzxF1uf4CaGyw9Tl9gcQ"``.
    """
    issued = encode_cursor(uuid.UUID("0192f3c4-5d6e-7f80-9a1b-2c3d4e5f6071"))
    assert issued is not None
    tampered = issued[:10] + junk * 4 + issued[10:]
    with pytest.raises(InvalidCursor):
        decode_cursor(tampered)


def test_page_request_limit_error_is_not_a_cursor_error() -> None:
    with pytest.raises(ValueError, match="limit"):
        page_request(0, None)
