"""One contract for the BlobStore port, run against the in-memory fake and the filesystem adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.contexts.media.adapters.filesystem_blobs import FilesystemBlobStore
from keel.contexts.media.ports.storage import Blob, BlobStore
from tests.fakes.media import InMemoryBlobStore

ALL_BYTES = bytes(range(256)) * 64  # every byte value, NUL and non-UTF-8 included


@pytest.fixture(params=["memory", "filesystem"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, tmp_path: Path) -> BlobStore:
    return InMemoryBlobStore() if kind == "memory" else FilesystemBlobStore(tmp_path / "blobs")


async def test_put_then_get_returns_the_bytes_and_the_content_type(store: BlobStore) -> None:
    await store.put("avatars/t1/u1/up1/original", ALL_BYTES, "image/png")
    await store.put("avatars/t1/u1/up1/64.webp", b"RIFF....WEBP", "image/webp")

    assert await store.get("avatars/t1/u1/up1/original") == Blob(data=ALL_BYTES, content_type="image/png")
    assert await store.get("avatars/t1/u1/up1/64.webp") == Blob(data=b"RIFF....WEBP", content_type="image/webp")


async def test_an_empty_blob_is_a_blob(store: BlobStore) -> None:
    await store.put("empty", b"", "application/octet-stream")
    assert await store.get("empty") == Blob(data=b"", content_type="application/octet-stream")


async def test_put_overwrites_data_and_content_type(store: BlobStore) -> None:
    await store.put("a/b/key", b"first version, rather long " * 100, "image/png")
    await store.put("a/b/key", b"second", "image/jpeg")
    assert await store.get("a/b/key") == Blob(data=b"second", content_type="image/jpeg")


async def test_missing_keys_are_none(store: BlobStore) -> None:
    assert await store.get("never/written") is None
    await store.put("a/b/present", b"x", "text/plain")
    assert await store.get("a/b/absent") is None
    assert await store.get("a/b/present.type") is None  # not the adapter's sidecar


@pytest.mark.parametrize("key", ["a/b", "a/b/c/below"], ids=["a-folder", "below-a-blob"])
async def test_a_key_that_names_a_folder_or_crosses_a_blob_is_missing(store: BlobStore, key: str) -> None:
    await store.put("a/b/c", b"x", "text/plain")
    assert await store.get(key) is None


async def test_delete_prefix_removes_that_folder_only_and_counts_blobs(store: BlobStore) -> None:
    under = ["a/b/one", "a/b/two", "a/b/deep/three"]
    beside = ["a/bc/four", "a/b-c", "a/bb", "z/a/b/five"]
    for key in under + beside:
        await store.put(key, key.encode(), "text/plain")

    assert await store.delete_prefix("a/b") == 3  # blobs, not the content types kept beside them

    for key in under:
        assert await store.get(key) is None
    for key in beside:  # a sibling with a common string prefix is another folder
        assert await store.get(key) == Blob(data=key.encode(), content_type="text/plain")
    assert await store.delete_prefix("a/b") == 0
    assert await store.delete_prefix("nothing/here") == 0


async def test_delete_prefix_of_a_blob_key_deletes_nothing(store: BlobStore) -> None:
    await store.put("a/bc/four", b"4", "text/plain")
    assert await store.delete_prefix("a/bc/four") == 0
    assert await store.get("a/bc/four") == Blob(data=b"4", content_type="text/plain")


async def test_a_blob_can_be_written_again_after_its_folder_was_deleted(store: BlobStore) -> None:
    await store.put("avatars/t/u/up/original", b"old", "image/png")
    assert await store.delete_prefix("avatars/t/u") == 1
    await store.put("avatars/t/u/up/original", b"new", "image/jpeg")
    assert await store.get("avatars/t/u/up/original") == Blob(data=b"new", content_type="image/jpeg")


INVALID_KEYS = ["../x", "a/../../x", "/abs", "/etc/passwd", "a//b", "", "a/", "./x", "a/./b", ".hidden", "a b", "a\\b"]


@pytest.mark.parametrize("key", INVALID_KEYS)
async def test_invalid_keys_are_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.put(key, b"x", "text/plain")
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.get(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.delete_prefix(key)


async def test_nothing_escapes_the_root(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = FilesystemBlobStore(root)
    for key in ("../outside", "/tmp/outside"):
        with pytest.raises(ValueError, match="invalid blob key"):
            await store.put(key, b"x", "text/plain")
    assert list(tmp_path.iterdir()) == []  # noqa: ASYNC240  # nothing written, not even the root


# -- filesystem only -----------------------------------------------------------------------------


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


async def test_writes_leave_only_the_blobs_and_their_content_types(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = FilesystemBlobStore(root)
    await store.put("avatars/t/u/up/original", ALL_BYTES, "image/png")
    await store.put("avatars/t/u/up/original", b"again", "image/png")
    await store.put("avatars/t/u/up/64.webp", b"webp", "image/webp")

    assert _files(root) == {
        "avatars/t/u/up/original",
        "avatars/t/u/up/original.type",
        "avatars/t/u/up/64.webp",
        "avatars/t/u/up/64.webp.type",
    }
    assert (root / "avatars/t/u/up/original").read_bytes() == b"again"


async def test_a_failed_write_leaves_no_temporary_file_and_keeps_what_was_there(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = FilesystemBlobStore(root)
    await store.put("a/b/c", b"kept", "text/plain")
    # "a/b" is a folder, so the rename into place fails.
    with pytest.raises(IsADirectoryError):
        await store.put("a/b", b"never", "text/plain")

    assert not [name for name in _files(root) if ".tmp-" in name]
    assert await store.get("a/b/c") == Blob(data=b"kept", content_type="text/plain")
    assert (root / "a/b").is_dir()
