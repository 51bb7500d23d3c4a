"""Tasks that use TLS, for tests/test_worker_memory.py. The worker imports asyncio with `ssl`
loaded on first use: each task reaches ssl another way (asyncio itself, `import ssl`, `from ssl
import`), and none imports it at module level, so the first use happens inside a task."""

from __future__ import annotations

import asyncio

from dbtask import task


@task
async def tls_echo(port: int, text: str) -> str:
    """A TLS round trip where asyncio loads ssl itself (`ssl=True` trusts $SSL_CERT_FILE)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=True, server_hostname="localhost")
    writer.write(text.encode() + b"\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return line.decode().strip()


@task
def openssl_name() -> str:
    import ssl

    return ssl.OPENSSL_VERSION.split()[0]


@task
def default_context_verifies() -> bool:
    from ssl import CERT_REQUIRED, create_default_context

    return create_default_context().verify_mode == CERT_REQUIRED
