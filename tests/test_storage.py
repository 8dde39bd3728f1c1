"""Storage conformance: the same suite against a local folder and a real S3-protocol server."""
from __future__ import annotations

import threading

import pytest

from p2pfed.errors import StorageError
from p2pfed.storage import LocalStorage, Storage, open_storage, probe


def test_roundtrip_list_and_exists(storage_url):
    st = open_storage(storage_url)
    st.put_new("a/b/one.json", b"1")
    st.put_new("a/two.json", b"22")
    st.put_new("c.json", b"")
    assert st.get("a/b/one.json") == b"1" and st.get("c.json") == b""
    assert st.exists("a/two.json") and not st.exists("a/three.json")
    assert st.list_prefix("a") == ["a/b/one.json", "a/two.json"]
    assert st.list_prefix("") == ["a/b/one.json", "a/two.json", "c.json"]
    assert st.list_prefix("nothing") == []
    with pytest.raises(FileNotFoundError):
        st.get("a/missing")


def test_create_only_never_overwrites(storage_url):
    st = open_storage(storage_url)
    st.put_new("k", b"first")
    with pytest.raises(FileExistsError):
        st.put_new("k", b"second")
    st.put_new("k", b"first")  # the same bytes again: an idempotent retry, not an overwrite
    assert st.get("k") == b"first"


def test_probe_accepts_both_backends(storage_url):
    probe(open_storage(storage_url))


def test_racing_writers_exactly_one_wins(storage_url):
    """16 threads create one key with different bytes, 100 times: one winner every time."""
    st = open_storage(storage_url)
    for trial in range(100):
        key, winners, barrier = f"race/{trial}", [], threading.Barrier(16)

        def write(i):
            barrier.wait()
            try:
                st.put_new(key, f"writer-{i}".encode())
                winners.append(i)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1, f"trial {trial}: winners {winners}"
        assert st.get(key) == f"writer-{winners[0]}".encode()


def test_local_writes_leave_no_temp_files(tmp_path):
    st = LocalStorage(tmp_path)
    st.put_new("x/y", b"data")
    with pytest.raises(FileExistsError):
        st.put_new("x/y", b"other")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y"]


def test_storage_without_atomic_create_is_refused():
    with pytest.raises(StorageError, match="atomic create-only"):
        probe(open_storage("memory://p2pfed-test"))


class Flaky(Storage):
    """Pure-logic double: the first write lands but its response is lost."""

    url, atomic_create = "flaky://", True

    def __init__(self):
        self.data, self.calls = {}, 0

    def _raw_get(self, key):
        return self.data[key]

    def _raw_put_new(self, key, data):
        self.calls += 1
        if key in self.data:
            raise FileExistsError(key)
        self.data[key] = data
        if self.calls == 1:
            raise ConnectionError("reset after the write landed")


def test_retry_after_lost_response_reads_back(monkeypatch):
    monkeypatch.setattr("p2pfed.storage.BACKOFF_S", 0)
    st = Flaky()
    st.put_new("k", b"v")
    assert st.calls == 2 and st.data == {"k": b"v"}


def test_unreachable_endpoint_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("p2pfed.storage.BACKOFF_S", 0)
    monkeypatch.setattr("p2pfed.storage.RETRIES", 1)
    st = open_storage("s3://bucket/x", endpoint_url="http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(StorageError, match="unreachable|storage error"):
        st.get("federation.json")
