"""Imports asyncio without loading OpenSSL until something uses it (loaded once by the worker,
as module `_dbtask_worker_ssl`, before `dbtask` and the task modules are imported).

`import asyncio` imports `ssl`, which loads libssl and libcrypto and builds ssl's enums: about
4 MiB of the worker's memory, while the worker itself reaches NATS and Redis from Rust and many
task modules never open a TLS connection. So asyncio is imported here as on a Python built
without ssl, then `ssl` is put in `sys.modules` and in asyncio's modules as a module that loads
itself, in place, the first time any attribute of it is read: `import ssl` (the import system
reads `__spec__`), `ssl.create_default_context()`, asyncio opening a TLS connection or checking
a socket's type. Code that uses ssl gets the real module, only later; the rest never pays.
"""

import _thread
import importlib.util
import sys
import types

# Versions whose asyncio was read and run with this (TLS through asyncio, ssl from threads):
# base_events, selector_events and sslproto keep `ssl` as a module global, and sslproto
# (3.11+) derives SSLAgainErrors from it at import. Others import ssl as usual.
_CHECKED = ((3, 10), (3, 14))


class _Deferred(types.ModuleType):
    """`ssl` until first use: reading, setting or deleting any attribute loads it in place."""

    def __getattribute__(self, name):
        _load(self)
        return types.ModuleType.__getattribute__(self, name)

    def __setattr__(self, name, value):
        _load(self)
        types.ModuleType.__setattr__(self, name, value)

    def __delattr__(self, name):
        _load(self)
        types.ModuleType.__delattr__(self, name)


# Reentrant: running ssl.py reads the module's own attributes (`__dict__`, `__name__`) on the
# loading thread; other threads wait here until the module is whole.
_lock = _thread.RLock()
_loading = False
_on_load = []


def _load(module):
    global _loading
    if type(module) is not _Deferred:
        return
    with _lock:
        if type(module) is not _Deferred or _loading:
            return
        _loading = True
        try:
            spec = types.ModuleType.__getattribute__(module, "__spec__")
            spec.loader.exec_module(module)
            for hook in _on_load:
                hook(module)
            # Only now: a thread that sees a plain module must see all of it.
            module.__class__ = types.ModuleType
        finally:
            _loading = False


def defer():
    """Imports asyncio with `ssl` deferred; true if it was (false: ssl already imported,
    asyncio already imported, no ssl in this Python, or a Python version not checked)."""
    if not _CHECKED[0] <= sys.version_info[:2] < _CHECKED[1]:
        return False
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return False
    spec = importlib.util.find_spec("ssl")
    if spec is None or not hasattr(spec.loader, "exec_module"):
        return False
    if importlib.util.find_spec("_ssl") is None:
        return False
    before = set(sys.modules)
    sys.modules["ssl"] = None  # `import ssl` raises ImportError: asyncio takes it as absent
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
    imported = [sys.modules[name] for name in set(sys.modules) - before]
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _Deferred
    sys.modules["ssl"] = module
    for m in imported:
        if m is not None and "ssl" in vars(m) and vars(m)["ssl"] is None:
            m.ssl = module
    sslproto = sys.modules.get("asyncio.sslproto")
    if sslproto is not None and sys.version_info >= (3, 11):

        def again_errors(ssl):
            # What sslproto computes at import when ssl is there; read by its handshake code.
            if "SSLAgainErrors" not in vars(sslproto):
                sslproto.SSLAgainErrors = (ssl.SSLWantReadError, ssl.SSLSyscallError)

        _on_load.append(again_errors)
    return True
