"""Storage conformance: the same suite against a local folder and two real S3 servers on
loopback (moto's S3 server and SeaweedFS, a production distributed object store)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from p2pfed.errors import StorageError, UsageError
from p2pfed.storage import LocalStorage, Storage, open_storage, probe


def test_roundtrip_list_and_exists(storage_url):
    st = open_storage(storage_url)
    st.put_new("a/b/one.json", b"1")
    st.put_new("a/two.json", b"22")
    st.put_new("c.json", b"")
    st.put_new("ab.json", b"3")  # shares the prefix "a" as a string, not as a folder
    assert st.get("a/b/one.json") == b"1" and st.get("c.json") == b""
    assert st.exists("a/two.json") and not st.exists("a/three.json")
    assert st.list_prefix("a") == ["a/b/one.json", "a/two.json"]
    assert st.list_prefix("") == ["a/b/one.json", "a/two.json", "ab.json", "c.json"]
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


def test_create_only_collision_is_file_exists_on_every_server(storage_url):
    """The raw create-only write, no read-back: SeaweedFS answers 412 without naming the
    condition, which s3fs turns into a plain OSError(EINVAL); it must read as "exists"."""
    st = open_storage(storage_url)
    st.put_new("k", b"first")
    with pytest.raises(FileExistsError):
        st._raw_put_new("k", b"second")
    assert st.get("k") == b"first"


def test_largest_object_round_trips_create_only(storage_url):
    """The largest object a site reads, a full weight shard (its cap: p2pfed.shards' 32
    MiB of tensor data plus the safetensors header and the envelope), is one PutObject,
    below s3fs's 100 MiB multipart threshold: create-only holds for it too."""
    from p2pfed import layout

    st, key = open_storage(storage_url), layout.shard(1, "site", "ab" * 32)
    big = bytes(range(256)) * (layout.max_size(key) // 256)
    st.put_new(key, big)
    with pytest.raises(FileExistsError):
        st.put_new(key, big[:-1] + b"x")
    assert st.get(key) == big


def test_reads_stop_at_the_cap_of_the_kind_before_downloading(storage_url):
    """A 40 MiB object where a commit (1 MiB) belongs is refused naming the key, its size
    and the cap, after reading at most the cap + 1 byte (one ranged GET on S3): measured
    with tracemalloc, the read allocates about the cap, not the object. An object exactly
    at the cap, and an empty one, read whole."""
    import tracemalloc

    from p2pfed import layout
    from p2pfed.errors import IntegrityError

    st, big, full = open_storage(storage_url), layout.commit(1, "site1"), layout.commit(1, "site0")
    cap = layout.max_size(big)
    st.put_new(big, b"x" * (40 << 20))
    st.put_new(full, b"y" * cap)
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError) as exc:
            st.get(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.message == (f"{big}: {40 << 20} bytes, more than the {cap} bytes a commit object may hold; "
                                 "not downloaded"), exc.value.message
    assert peak < 4 * cap, peak  # the whole object would be 40 x the cap
    assert st.get(full) == b"y" * cap and st.get(big, max_size=40 << 20) == b"x" * (40 << 20)
    st.put_new(layout.plan_hash("empty"), b"")
    assert st.get(layout.plan_hash("empty")) == b""


def test_probe_accepts_every_backend_and_leaves_one_object(storage_url):
    st = open_storage(storage_url)
    probe(st)
    (key,) = st.list_prefix("")
    assert key.startswith("probe/") and st.get(key) == b"first"


def test_write_whose_response_was_lost_is_settled_by_reading_back(storage_url, monkeypatch):
    """The first create lands on the real server but its response is lost: the retry
    collides with our own object, reads it back and counts as done."""
    monkeypatch.setattr("p2pfed.storage.BACKOFF_S", 0)
    st, calls = open_storage(storage_url), []
    real = st._raw_put_new

    def lost_response(key, data):
        calls.append(key)
        real(key, data)
        if len(calls) == 1:
            raise ConnectionError("connection reset after the write landed")

    monkeypatch.setattr(st, "_raw_put_new", lost_response)
    st.put_new("k", b"mine")
    assert calls == ["k", "k"] and st.get("k") == b"mine"
    with pytest.raises(FileExistsError):  # someone else's bytes are still a collision
        st.put_new("k", b"theirs")


def test_programming_errors_are_not_storage_errors(storage_url):
    """A bug in our code (here: an int where bytes belong) must surface as the bug it is,
    not as "storage error" with the exit code that tells cron users to wait."""
    st = open_storage(storage_url)
    with pytest.raises(TypeError):
        st.put_new("k", 12345)
    assert not st.exists("k")


def test_racing_writers_exactly_one_wins(storage_url, request):
    """16 threads create one key with different bytes, 100 times: one winner every time.
    SeaweedFS queues conditional writes to one key in steps of about 1 s (16 racing
    creators take up to 7 s), so there 10 trials of 8."""
    st = open_storage(storage_url)
    trials, writers = (10, 8) if "seaweedfs" in request.node.name else (100, 16)
    for trial in range(trials):
        key, winners, barrier = f"race/{trial}", [], threading.Barrier(writers)

        def write(i):
            barrier.wait()
            try:
                st.put_new(key, f"writer-{i}".encode())
                winners.append(i)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
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

    def _raw_get(self, key, max_size):
        return self.data[key][:max_size + 1]

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


def test_bug_in_a_backend_operation_propagates(monkeypatch):
    class Buggy(Flaky):
        def _raw_get(self, key, max_size):
            return self.data.get(key).decode()  # AttributeError on None: our bug, not an outage

    with pytest.raises(AttributeError):
        Buggy().get("absent")


def test_network_errors_that_are_not_oserrors_are_retried(monkeypatch):
    """asyncio.IncompleteReadError (a body cut short) is an EOFError, not an OSError."""
    monkeypatch.setattr("p2pfed.storage.BACKOFF_S", 0)

    class CutShort(Flaky):
        def _raw_get(self, key, max_size):
            self.calls += 1
            if self.calls == 1:
                raise asyncio.IncompleteReadError(b"par", 7)
            return b"partial"

    st = CutShort()
    assert st.get("k") == b"partial" and st.calls == 2


def test_unreachable_endpoint_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("p2pfed.storage.BACKOFF_S", 0)
    monkeypatch.setattr("p2pfed.storage.RETRIES", 2)
    st = open_storage("s3://bucket/x", endpoint_url="http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(StorageError) as info:
        st.get("federation.json")
    assert info.value.message.startswith("storage s3://bucket/x unreachable at http://127.0.0.1:9 after 2 retries (")
    assert info.value.hint == "check the network and the endpoint URL; a tick run by cron retries by itself"
    assert info.value.exit_code == 5 and "\n" not in str(info.value)


def test_missing_bucket_names_the_bucket(s3_endpoint):
    """moto answers NoSuchBucket, which s3fs turns into FileNotFoundError, "not found" for
    a key; it must read as what it is. (SeaweedFS answers AccessDenied to an anonymous
    write into a missing bucket: also a StorageError, tested in test_bad_input.py.)"""
    st = open_storage("s3://no-such-bucket-p2pfed/x", s3_endpoint)
    for op in (lambda: st.get("federation.json"), lambda: st.put_new("probe/1", b"1")):
        with pytest.raises(StorageError) as info:
            op()
        assert info.value.message == f"bucket 'no-such-bucket-p2pfed' of s3://no-such-bucket-p2pfed/x does not exist at {s3_endpoint}"


def test_unsupported_url_scheme_is_a_usage_error():
    with pytest.raises(UsageError, match="unsupported storage URL 'nosuch://x'") as info:
        open_storage("nosuch://x")
    assert info.value.exit_code == 2
