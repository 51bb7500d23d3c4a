"""What the worker does to stay small must not change what tasks can do: ssl, which the worker
loads only on first use, works from sync and async tasks alike (also on first use from many
threads at once), and a worker that gave its freed memory back while idle runs tasks again."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from e2e_support import rss_mib, wait_rss_at_most
from e2e_tasks import add, greet
from tls_tasks import default_context_verifies, openssl_name, tls_echo

TRIMMED = "worker idle: gave freed heap memory back to the OS"


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost` and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return crt, key


async def test_async_tasks_open_tls_connections(worker_factory, client, cert):
    crt, key = cert

    async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write((await reader.readline()).upper())
        await writer.drain()
        writer.close()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(crt, key)
    server = await asyncio.start_server(shout, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        worker_factory("tls_tasks", env={"SSL_CERT_FILE": str(crt)})
        results = await asyncio.gather(*(tls_echo.delay(port, f"hello {i}") for i in range(5)))
        assert [await r.get(timeout=30) for r in results] == [f"HELLO {i}" for i in range(5)]


async def test_sync_tasks_import_ssl_from_many_threads_at_once(worker_factory, client):
    worker_factory("tls_tasks", concurrency=8)
    names = await asyncio.gather(*(openssl_name.delay() for _ in range(16)))
    verifies = await asyncio.gather(*(default_context_verifies.delay() for _ in range(8)))
    assert [await r.get(timeout=30) for r in names] == ["OpenSSL"] * 16
    assert [await r.get(timeout=30) for r in verifies] == [True] * 8


async def test_worker_runs_tasks_after_giving_memory_back_when_idle(worker_factory, client):
    w = worker_factory(args=["--log-level", "debug"])

    async def trims(count: int) -> None:
        for _ in range(200):
            if w.stderr.count(TRIMMED) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the worker did not log {TRIMMED!r} {count} time(s)")

    await trims(1)  # after start-up
    for burst in range(2):
        results = await asyncio.gather(*(add.delay(i, burst) for i in range(200)))
        assert [await r.get(timeout=30) for r in results] == [i + burst for i in range(200)]
        await trims(2 + burst)  # once after each burst


@pytest.mark.parametrize(
    ("kind", "env"),
    [
        ("text", {}),
        # Python objects by the hundred thousand (a list of ints) leave pymalloc's arenas
        # fragmented; with Python's allocator set to malloc (docs/deployment.md) they go back.
        ("ints", {"PYTHONMALLOC": "malloc"}),
    ],
)
async def test_memory_goes_back_near_idle_after_a_burst_of_large_arguments(worker_factory, client, kind, env):
    """Arguments of 0.6-0.9 MB (a 900 KB string, a 100,000-int list) in a burst raised a worker
    from 23 MiB to 60-100 MiB for good. Within 10 s of the burst it must be back within 5 MiB
    of its idle size."""
    w = worker_factory(concurrency=None, args=["--log-level", "debug"], env=env)
    for _ in range(200):  # the trim after start-up
        if TRIMMED in w.stderr:
            break
        await asyncio.sleep(0.05)
    idle = rss_mib(w.pid)
    argument = "x" * 900_000 if kind == "text" else list(range(100_000))
    results = [await greet.delay(argument) for _ in range(60)]
    assert [await r.get(timeout=60) for r in results] == [f"Hello, {argument}!"] * 60
    settled = await wait_rss_at_most(w.pid, idle + 5)
    assert settled <= idle + 5, f"idle {idle:.1f} MiB, still {settled:.1f} MiB 10 s after the burst"
