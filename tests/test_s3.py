"""Exports to S3, against a real S3 server: moto's standalone server on 127.0.0.1.

No network and no AWS account: the server runs in a thread of the test process, the
credentials are moto's dummies, and every URI names the loopback endpoint. A small
fault-injecting proxy in front of it plays a store that answers 500/503/SlowDown.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from breadasync import (
    BreadClient,
    DestinationError,
    ExportLockedError,
    ExportMismatchError,
    InvalidArgumentError,
    RetryPolicy,
)
from breadasync.cli import main as cli_main
from breadasync.emulator import Emulator, Faults
from breadasync.export import FsDestination, batch_to_rows, resolve_destination
from breadasync.export._manifest import decode_manifest
from tests.conftest import wait_until

moto_server = pytest.importorskip("moto.server")

frozen = pytest.mark.bread_emulator(speed=0)
ROBUST = RetryPolicy(max_retries=10, initial_backoff=0.002, max_backoff=0.02)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that can fail uploads.

    ``fail_every``: every n-th upload request (PUT, or the POST starting a multipart
    upload) of a temporary part object is answered with an error instead of being forwarded, cycling
    through 500 InternalError and 503 SlowDown. ``fail_every=1`` fails them all.
    """

    ERRORS = (
        (500, "InternalError", "We encountered an internal error. Please try again."),
        (503, "SlowDown", "Please reduce your request rate."),
    )

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.fail_every = 0
        self.uploads = 0
        self.injected: list[int] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.lock:
                    proxy.connections.append(self.connection)

            def _body(self) -> tuple[bytes, bool]:
                """The body as sent (chunked bodies kept raw), and whether it is chunked."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0)), False
                raw = []
                while True:
                    line = self.rfile.readline()
                    raw.append(line)
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        while True:  # trailers, up to an empty line
                            line = self.rfile.readline()
                            raw.append(line)
                            if line in (b"\r\n", b"\n", b""):
                                return b"".join(raw), True
                    raw.append(self.rfile.read(size + 2))

            def _handle(self) -> None:
                body, chunked = self._body()
                fault = proxy._fault(self.command, self.path)
                if fault is not None:
                    status, code, message = fault
                    reply = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for key, value in self.headers.items():
                        if key.lower() not in ("content-length", "connection"):
                            conn.putheader(key, value)
                    if not chunked:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders()
                    conn.send(body)
                    answer = conn.getresponse()
                    data = answer.read()
                    self.send_response(answer.status)
                    for key, value in answer.getheaders():
                        if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                            self.send_header(key, value)
                    length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.connections: list[socket.socket] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Handler threads are joined on close (after their keep-alive connections are shut
        # down below), so no socket of the proxy outlives the test.
        self.server.daemon_threads = False
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault(self, method: str, path: str) -> tuple[int, str, str] | None:
        # Arrow does not retry CompleteMultipartUpload (POST ...?uploadId=): see
        # test_a_store_that_keeps_failing_... for what a failure there does.
        upload = method == "PUT" or (method == "POST" and path.endswith("?uploads"))
        if not upload or ".part-" not in path or not self.fail_every:
            return None
        with self.lock:
            self.uploads += 1
            if self.uploads % self.fail_every:
                return None
            fault = self.ERRORS[len(self.injected) % len(self.ERRORS)]
            self.injected.append(fault[0])
            return fault

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.server.server_close()
        self.thread.join()


# The AWS SDK and Arrow's I/O thread pool give each of their (long-lived, bounded) threads
# an eventfd and the SDK's random source on first use: process-wide handles, not leaks.
# Files, sockets and pipes are still checked around every test here.
SHARED_HANDLES = ("anon_inode:[eventfd]", "anon_inode:[eventpoll]", "/dev/urandom")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port); yields its ``host:port``."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        # The AWS SDK opens its shared handles (event loop, thread pools) with its first
        # client and keeps them while any client lives: one client kept for the module,
        # so they exist before the per-test check for leaked files.
        keeper = Bucket(f"{host}:{port}")
        pq.write_table(pa.table({"x": [1]}), f"{keeper.name}/warm/x.parquet", filesystem=keeper.fs)
        ds.dataset(f"{keeper.name}/warm", filesystem=keeper.fs, format="parquet").to_table()
        # ...and Arrow's I/O threads theirs, on the first dataset read.
        yield f"{host}:{port}"
        del keeper
    finally:
        server.stop()
        inner = server._server
        if inner is not None:
            inner.server_close()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's dummy credentials, and no instance-metadata lookups (no network)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


class Bucket:
    """A fresh bucket on the S3 server, and helpers to look into it."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.name = f"bread-{secrets.token_hex(4)}"
        self.fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme="http",
            access_key="testing",
            secret_key="testing",  # noqa: S106 (moto's dummy)
            region="us-east-1",
            allow_bucket_creation=True,
        )
        self.fs.create_dir(self.name)

    def uri(self, prefix: str, endpoint: str | None = None) -> str:
        return (
            f"s3://{self.name}/{prefix}?endpoint_override={endpoint or self.endpoint}"
            "&scheme=http&region=us-east-1"
        )

    def keys(self, prefix: str = "") -> dict[str, bytes]:
        selector = pafs.FileSelector(f"{self.name}/{prefix}", recursive=True, allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                with self.fs.open_input_stream(info.path) as stream:
                    out[info.path[len(self.name) + 1 :]] = stream.read()
        return out

    def exists(self, key: str) -> bool:
        return bool(self.fs.get_file_info(f"{self.name}/{key}").type == pafs.FileType.File)

    def get(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{self.name}/{key}") as stream:
            return bytes(stream.read())

    def put(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{self.name}/{key}") as stream:
            stream.write(data)

    def read_rows(self, prefix: str) -> list[dict[str, object]]:
        """The rows of one target's export, read back with pyarrow.dataset over S3."""
        table = ds.dataset(f"{self.name}/{prefix}", filesystem=self.fs, format="parquet")
        return batch_to_rows(table.to_table().sort_by("row_offset"))


@pytest.fixture
def bucket(s3_server: str, s3_env: None) -> Bucket:
    return Bucket(s3_server)


@pytest.fixture
def exporter(make_client: Callable[..., BreadClient]) -> BreadClient:
    return make_client(retry=ROBUST)


def digests(objects: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in objects.items()}


def page_requests(emulator: Emulator) -> int:
    return sum(1 for r in emulator.stats.records() if r.route == "get_rollout_output")


# --- exports read back ---------------------------------------------------------------------


@frozen
async def test_one_target_to_s3_reads_back_exactly(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket
) -> None:
    bread_emulator.add_target("r", "t", rows=2500, rollout="complete")
    result = await exporter.export_rollout(
        "t", repo_name="r", dest=bucket.uri("exports/t"), rows_per_part=1000
    )
    assert result.rows == 2500
    assert result.dest == f"s3://{bucket.name}/exports/t"  # no URI options in what is shown
    assert result.files == [f"{result.dest}/part-{i:05d}.parquet" for i in range(3)]
    assert result.manifest == f"{result.dest}/_manifest.parquet"
    objects = bucket.keys("exports/t")
    # Parts and the manifest only: no temporary object, no journal, no lease left behind.
    assert sorted(objects) == [
        "exports/t/_manifest.parquet",
        *(f"exports/t/part-{i:05d}.parquet" for i in range(3)),
    ]
    manifest = decode_manifest(objects["exports/t/_manifest.parquet"])
    assert manifest is not None
    for record in manifest["parts"]:
        data = objects[f"exports/t/{record['name']}"]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record["bytes"], record["sha256"])
    assert bucket.read_rows("exports/t") == bread_emulator.trajectories("r", "t")
    # The Bread API key is never written to the store.
    key = bread_emulator.api_key.encode()
    assert not any(key in data for data in objects.values())


@frozen
async def test_many_targets_as_a_hive_dataset_on_s3(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket
) -> None:
    for name, rows in (("a", 1200), ("b", 300), ("c/d", 10)):
        bread_emulator.add_target("r", name, rows=rows, rollout="complete")
    results = await exporter.export_many(["a", "b", "c/d"], repo_name="r", dest=bucket.uri("ds"))
    assert [r.rows for r in results] == [1200, 300, 10]
    assert all(r.ok for r in results)
    assert results[2].dest == f"s3://{bucket.name}/ds/repo=r/target=c%2Fd"
    dataset = ds.dataset(
        f"{bucket.name}/ds", filesystem=bucket.fs, format="parquet", partitioning="hive"
    )
    table = dataset.to_table()
    assert table.num_rows == 1510
    counts: dict[str, int] = {}
    for target in table.column("target").to_pylist():
        counts[target] = counts.get(target, 0) + 1
    assert counts == {"a": 1200, "b": 300, "c/d": 10}  # pyarrow decodes the names
    one = ds.dataset(
        f"{bucket.name}/ds/repo=r/target=a", filesystem=bucket.fs, format="parquet"
    ).to_table()
    assert batch_to_rows(one.sort_by("row_offset")) == bread_emulator.trajectories("r", "a")


@frozen
def test_cli_export_to_s3(
    bread_emulator: Emulator, bucket: Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    bread_emulator.add_target("r", "t", rows=1500, rollout="complete")
    code = cli_main(
        [
            "export",
            "--repo",
            "r",
            "--target",
            "t",
            "--out",
            bucket.uri("cli"),
            "--base-url",
            bread_emulator.url or "",
            "--api-key",
            bread_emulator.api_key,
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    summary = orjson.loads(out)
    assert summary["rows"] == 1500
    assert summary["out"] == bucket.uri("cli")
    assert summary["targets"][0]["dest"] == f"s3://{bucket.name}/cli/repo=r/target=t"
    assert bucket.read_rows("cli/repo=r/target=t") == bread_emulator.trajectories("r", "t")


# --- refused before any request -------------------------------------------------------------


@frozen
@pytest.mark.usefixtures("s3_server", "s3_env")  # the AWS SDK warmed up, no network
@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("ftp://host/x", "unknown destination scheme 'ftp://'"),
        ("hdfs://host/x", "unknown destination scheme 'hdfs://'"),
        ("s3:/bucket/x", "neither a URI"),
        ("s3://", "needs a bucket"),
    ],
)
async def test_bad_destinations_fail_before_any_request(
    exporter: BreadClient, bread_emulator: Emulator, dest: str, message: str
) -> None:
    bread_emulator.add_target("r", "t", rows=10, rollout="complete")
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        await exporter.export_rollout("t", repo_name="r", dest=dest)
    assert "\n" not in str(caught.value)
    with pytest.raises(InvalidArgumentError, match=message):
        await exporter.export_many(["t"], repo_name="r", dest=dest)
    assert bread_emulator.stats.records() == []


@pytest.mark.usefixtures("s3_server", "s3_env")
def test_uri_options_are_not_shown() -> None:
    store = resolve_destination("s3://bucket/p?endpoint_override=127.0.0.1:1&scheme=http")
    assert store.display == "s3://bucket/p"
    assert store.uri("_manifest.parquet") == "s3://bucket/p/_manifest.parquet"
    assert "endpoint" not in repr(store)


@frozen
def test_cli_unknown_scheme_is_one_line_and_exit_2(
    bread_emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        [
            *("export", "--repo", "r", "--target", "t", "--out", "gopher://x/y"),
            *("--base-url", bread_emulator.url or "", "--api-key", bread_emulator.api_key),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "unknown destination scheme 'gopher://'" in err
    assert bread_emulator.stats.records() == []


@frozen
async def test_missing_bucket_and_wrong_credentials_fail_before_fetching(
    exporter: BreadClient,
    bread_emulator: Emulator,
    bucket: Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    missing = bucket.uri("x").replace(bucket.name, "no-such-bucket", 1)
    with pytest.raises(DestinationError, match="bucket 'no-such-bucket' does not exist") as caught:
        await exporter.export_rollout("t", repo_name="r", dest=missing)
    assert "\n" not in str(caught.value)

    from moto import settings

    # moto checks credentials once its auth is on: an unknown key is refused.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    with pytest.raises(DestinationError, match="check the credentials") as caught:
        await exporter.export_rollout("t", repo_name="r", dest=bucket.uri("x"))
    assert "\n" not in str(caught.value)
    assert "testing" not in str(caught.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(DestinationError, match=r"cannot write to 's3://"):
        await exporter.export_rollout("t", repo_name="r", dest=bucket.uri("x"))
    # Only the job's status was read: not one page.
    assert page_requests(bread_emulator) == 0


# --- resume, corruption, two exporters ------------------------------------------------------


@frozen
async def test_killed_exporter_resumes_on_s3(bread_emulator: Emulator, bucket: Bucket) -> None:
    bread_emulator.add_target("r", "t", rows=40_000, rollout="complete")
    bread_emulator.set_faults(Faults(latency=0.03), repo="r", target="t")
    dest = bucket.uri("killed")
    script = textwrap.dedent(f"""
        import asyncio
        from breadasync import BreadClient
        async def main():
            async with BreadClient() as client:
                await client.export_rollout("t", repo_name="r", dest={dest!r},
                                            rows_per_part=4000, concurrency=2)
        asyncio.run(main())
    """)
    env = {
        **os.environ,
        "BREAD_API_KEY": bread_emulator.api_key,
        "BREAD_BASE_URL": bread_emulator.url or "",
    }
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)

    def committed() -> int:
        try:
            raw = bucket.get("killed/_journal.jsonl")
        except FileNotFoundError:
            return 0
        return max(0, len(raw.splitlines()) - 1)  # minus the header

    try:
        await wait_until(lambda: committed() >= 3 or child.poll() is not None, timeout=60)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        if child.stderr:
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    left = bucket.keys("killed")
    done_parts = {
        orjson.loads(line)["name"] for line in left["killed/_journal.jsonl"].splitlines()[1:]
    }
    assert 3 <= len(done_parts) < 10
    assert "killed/_manifest.parquet" not in left
    lease = orjson.loads(left["killed/_lease.json"])
    assert lease["pid"] == child.pid  # left by the killed process, still unexpired

    bread_emulator.set_faults(None, repo="r", target="t")
    bread_emulator.stats.reset()
    async with BreadClient(bread_emulator.api_key, bread_emulator.url) as client:
        result = await client.export_rollout("t", repo_name="r", dest=dest, rows_per_part=4000)
    assert result.parts_reused == len(done_parts)
    assert result.parts_written == 10 - len(done_parts)
    assert result.pages == 4 * (10 - len(done_parts))
    after = bucket.keys("killed")
    assert not [k for k in after if k.startswith("killed/.")]  # strays of the killed run gone
    assert "killed/_lease.json" not in after
    assert bucket.read_rows("killed") == bread_emulator.trajectories("r", "t")


@frozen
async def test_a_corrupted_object_is_refetched(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket
) -> None:
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    dest = bucket.uri("c")
    await exporter.export_rollout("t", repo_name="r", dest=dest, rows_per_part=1000)
    before = bucket.keys("c")
    broken = bytearray(before["c/part-00001.parquet"])
    broken[len(broken) // 2] ^= 0xFF  # same size, same footer: only the checksum tells
    bucket.put("c/part-00001.parquet", bytes(broken))
    bucket.put("c/part-00002.parquet", b"PAR1 not really")
    bread_emulator.stats.reset()
    result = await exporter.export_rollout("t", repo_name="r", dest=dest, rows_per_part=1000)
    assert (result.parts_reused, result.parts_written) == (1, 2)
    assert page_requests(bread_emulator) == 2
    after = digests(bucket.keys("c"))
    assert {k: v for k, v in after.items() if "part-" in k} == {
        k: v for k, v in digests(before).items() if "part-" in k
    }
    assert bucket.read_rows("c") == bread_emulator.trajectories("r", "t")


@frozen
async def test_two_exporters_one_prefix(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket
) -> None:
    bread_emulator.add_target("r", "t", rows=20_000, rollout="complete")
    bread_emulator.set_faults(Faults(latency=0.05), repo="r", target="t")
    dest = bucket.uri("two")
    errors: list[BaseException] = []

    async def second() -> None:
        await wait_until(lambda: bucket.exists("two/_journal.jsonl"), timeout=30)
        try:
            await exporter.export_rollout("t", repo_name="r", dest=dest)
        except ExportLockedError as exc:
            errors.append(exc)

    import anyio

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        first = await exporter.export_rollout("t", repo_name="r", dest=dest, concurrency=4)
    assert first.rows == 20_000
    assert len(errors) == 1
    assert "another export is writing to" in str(errors[0])
    assert bucket.read_rows("two") == bread_emulator.trajectories("r", "t")


@frozen
async def test_a_lease_of_another_host_is_honoured_until_it_expires(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket
) -> None:
    bread_emulator.add_target("r", "t", rows=100, rollout="complete")
    held = {"host": "elsewhere", "pid": 1, "token": "x", "expires": time.time() + 3600}
    bucket.put("l/_lease.json", orjson.dumps(held))
    with pytest.raises(ExportLockedError, match="host elsewhere"):
        await exporter.export_rollout("t", repo_name="r", dest=bucket.uri("l"))
    assert page_requests(bread_emulator) == 0
    assert sorted(bucket.keys("l")) == ["l/_lease.json"]  # nothing else was written
    bucket.put("l/_lease.json", orjson.dumps({**held, "expires": time.time() - 1}))
    result = await exporter.export_rollout("t", repo_name="r", dest=bucket.uri("l"))
    assert result.rows == 100
    assert "l/_lease.json" not in bucket.keys("l")


@frozen
async def test_a_lease_taken_over_stops_the_commit(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket
) -> None:
    bread_emulator.add_target("r", "t", rows=100, rollout="complete")
    store = FsDestination(bucket.fs, f"{bucket.name}/taken", scheme="s3")
    with store.locked():
        bucket.put("taken/_lease.json", orjson.dumps({"host": "elsewhere", "token": "y"}))
        with pytest.raises(ExportLockedError, match="lost the lease"):
            store.check_lease()
    # The other owner's lease is left alone.
    assert orjson.loads(bucket.keys("taken")["taken/_lease.json"])["host"] == "elsewhere"


@frozen
async def test_a_prefix_holding_another_export_is_never_touched(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket
) -> None:
    bread_emulator.add_target("r", "a", rows=1500, rollout="complete")
    bread_emulator.add_target("r", "b", rows=700, rollout="complete")
    await exporter.export_rollout("a", repo_name="r", dest=bucket.uri("p"), rows_per_part=1000)
    before = digests(bucket.keys("p"))
    for resume in (True, False):
        with pytest.raises(ExportMismatchError, match="already holds an export of r/a"):
            await exporter.export_rollout("b", repo_name="r", dest=bucket.uri("p"), resume=resume)
    assert digests(bucket.keys("p")) == before


@frozen
async def test_a_damaged_manifest_on_s3_is_named_and_replaced_with_resume_false(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket
) -> None:
    bread_emulator.add_target("r", "t", rows=1500, rollout="complete")
    dest = bucket.uri("m")
    await exporter.export_rollout("t", repo_name="r", dest=dest, rows_per_part=1000)
    manifest = bucket.keys("m")["m/_manifest.parquet"]
    for damaged, reason in ((b"", "empty"), (manifest[: len(manifest) // 2], "truncated")):
        bucket.put("m/_manifest.parquet", damaged)
        with pytest.raises(ExportMismatchError, match=f"damaged _manifest.parquet \\({reason}"):
            await exporter.export_rollout("t", repo_name="r", dest=dest, rows_per_part=1000)
        result = await exporter.export_rollout(
            "t", repo_name="r", dest=dest, rows_per_part=1000, resume=False
        )
        assert result.parts_written == 2
    assert bucket.read_rows("m") == bread_emulator.trajectories("r", "t")


# --- the store misbehaving ------------------------------------------------------------------


@frozen
async def test_store_errors_during_uploads_are_retried(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket, s3_server: str
) -> None:
    bread_emulator.add_target("r", "t", rows=5000, rollout="complete")
    upstream = ("127.0.0.1", int(s3_server.split(":")[1]))
    with FaultProxy(upstream) as proxy:
        proxy.fail_every = 2  # every second upload request of a part fails once
        result = await exporter.export_rollout(
            "t", repo_name="r", dest=bucket.uri("f", proxy.endpoint), rows_per_part=1000
        )
    assert result.rows == 5000
    # Deterministic: five parts, each at least one upload request, every second one failed.
    assert proxy.uploads >= 5
    assert len(proxy.injected) == proxy.uploads // 2
    assert bucket.read_rows("f") == bread_emulator.trajectories("r", "t")
    assert not [k for k in bucket.keys("f") if k.startswith("f/.")]


@frozen
async def test_a_store_that_keeps_failing_leaves_no_part_and_resumes_later(
    exporter: BreadClient, bread_emulator: Emulator, bucket: Bucket, s3_server: str
) -> None:
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    upstream = ("127.0.0.1", int(s3_server.split(":")[1]))
    with FaultProxy(upstream) as proxy:
        proxy.fail_every = 1
        with pytest.raises(DestinationError) as caught:
            await exporter.export_rollout(
                "t", repo_name="r", dest=bucket.uri("k", proxy.endpoint), rows_per_part=1000
            )
    assert "\n" not in str(caught.value)
    del caught  # its traceback holds the store's client and its pooled connection
    assert proxy.injected  # every part upload was refused
    left = bucket.keys("k")
    assert not [k for k in left if k.startswith("k/part-")]  # no part under a final name
    assert "k/_manifest.parquet" not in left
    result = await exporter.export_rollout(
        "t", repo_name="r", dest=bucket.uri("k"), rows_per_part=1000
    )
    assert result.parts_written == 3
    assert bucket.read_rows("k") == bread_emulator.trajectories("r", "t")


# --- other filesystems ----------------------------------------------------------------------


@frozen
async def test_an_fsspec_filesystem_pair(exporter: BreadClient, bread_emulator: Emulator) -> None:
    fsspec = pytest.importorskip("fsspec.implementations.memory")
    memory = fsspec.MemoryFileSystem()
    root = f"/bread-{secrets.token_hex(4)}"
    bread_emulator.add_target("r", "t", rows=1200, rollout="complete")
    try:
        result = await exporter.export_rollout(
            "t", repo_name="r", dest=(memory, f"{root}/out"), rows_per_part=1000
        )
        assert result.rows == 1200
        names = sorted(p.rsplit("/", 1)[1] for p in memory.find(root))
        assert names == ["_manifest.parquet", "part-00000.parquet", "part-00001.parquet"]
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(memory))
        table = ds.dataset(f"{root}/out", filesystem=fs, format="parquet").to_table()
        assert batch_to_rows(table) == bread_emulator.trajectories("r", "t")
        again = await exporter.export_rollout(
            "t", repo_name="r", dest=(memory, f"{root}/out"), rows_per_part=1000
        )
        assert (again.parts_reused, again.parts_written) == (2, 0)
    finally:
        with contextlib.suppress(FileNotFoundError):
            memory.rm(root, recursive=True)


@frozen
async def test_the_readme_s3_example(
    bread_emulator: Emulator, bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Writing to S3/GCS/Azure", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("s3://my-bucket/bread/coding", bucket.uri("bread/coding"))
    bread_emulator.add_target("my_repo", "coding_target", rows=30, rollout="complete")
    monkeypatch.setenv("BREAD_API_KEY", bread_emulator.api_key)
    monkeypatch.setenv("BREAD_BASE_URL", bread_emulator.url or "")
    namespace: dict[str, Any] = {}
    body = "from breadasync import BreadClient\n" + code
    source = f"async def _example():\n{textwrap.indent(body, '    ')}\n    return locals()"
    exec(source, namespace)  # noqa: S102 (the README's own example)
    found = await namespace["_example"]()
    assert found["result"].files[0] == f"s3://{bucket.name}/bread/coding/part-00000.parquet"
    assert bucket.read_rows("bread/coding") == bread_emulator.trajectories(
        "my_repo", "coding_target"
    )
