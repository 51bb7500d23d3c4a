"""The dashboard's web server (aiohttp): the page, its JSON API, the live event stream (SSE),
authentication. See docs/operations.md, "Dashboard".

Where things come from:
- tasks and workers live: the workers' events (``dbtask.events.>``, workers started with
  ``--events``), read on a thread of their own and pushed to every open page as server-sent
  events;
- workers and queues every few seconds: ``inspect stats`` and ``inspect queues``;
- a task's page: its record in Redis (``AsyncResult.info()``) and the events seen for it;
- dead letters: the ``DBTASK_DEAD`` stream (as ``dbtask dead list`` / ``replay``);
- revoke / terminate: ``dbtask.revoke``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import signal
import sys
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from .. import _client
from .._control import admin as admin_for, gather
from .._revoke import DEFAULT_REVOKE_TTL
from ._model import Model

POLL_INTERVAL = 5.0
REPLY_TIMEOUT = 1.0
KEEPALIVE = 15.0
# Events queued for one page before it is dropped as too slow (it reconnects and reloads).
PAGE_QUEUE = 2000
TOKEN_COOKIE = "dbtask_dashboard_token"
# Sent by the page with every POST. A form or an image on another site cannot set it, and a
# script there cannot either without a CORS preflight, which this server never grants.
CSRF_HEADER = "X-Dbtask-Dashboard"
STATIC = {
    "index.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    # Task names, arguments and error messages come from anyone who can enqueue a task: the
    # page puts them in as text only, and nothing but its own script may run.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass
class Settings:
    address: str = "127.0.0.1"
    port: int = 5555
    token: Optional[str] = None
    basic_auth: Optional[str] = None  # "user:password"
    nats_url: Optional[str] = None
    redis_url: Optional[str] = None
    connect_timeout: float = 5.0
    max_tasks: int = 10_000
    security: dict[str, Any] = field(default_factory=dict)


class RefusedAddress(ValueError):
    """A non-loopback address without authentication."""


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def check_settings(settings: Settings) -> None:
    """Refuses what must not be served: anything but loopback without a token or a password."""
    if settings.basic_auth is not None and ":" not in settings.basic_auth:
        raise ValueError("--basic-auth must be USER:PASSWORD (the password after the first ':')")
    if settings.token is not None and len(settings.token) < 16:
        raise ValueError("the dashboard token must be at least 16 characters (e.g. `openssl rand -hex 16`)")
    if not is_loopback(settings.address) and settings.token is None and settings.basic_auth is None:
        raise RefusedAddress(
            f"refusing to serve the dashboard on {settings.address} without authentication: anyone who "
            "reaches it could revoke tasks and replay dead letters. Set a token (--token or "
            "$DBTASK_DASHBOARD_TOKEN) or a password (--basic-auth USER:PASSWORD or "
            "$DBTASK_DASHBOARD_BASIC_AUTH), or bind 127.0.0.1"
        )


class Hub:
    """The open pages' event queues; events are handed to every one."""

    def __init__(self) -> None:
        self.pages: set[asyncio.Queue[Optional[str]]] = set()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        text = f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
        for page in list(self.pages):
            try:
                page.put_nowait(text)
            except asyncio.QueueFull:
                # Too slow: it is closed and reconnects, reloading what it shows.
                self.pages.discard(page)
                while not page.empty():
                    page.get_nowait()
                page.put_nowait(None)

    def close(self) -> None:
        for page in list(self.pages):
            try:
                page.put_nowait(None)
            except asyncio.QueueFull:
                pass
        self.pages.clear()


class Dashboard:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model = Model(max_tasks=settings.max_tasks)
        self.hub = Hub()
        self.static = self._load_static()
        self.stopping = threading.Event()
        self.admin: Any = None
        self.subscription: Any = None

    @staticmethod
    def _load_static() -> dict[str, bytes]:
        folder = resources.files("dbtask.dashboard") / "static"
        return {name: (folder / name).read_bytes() for name in STATIC}

    # --- the event feed and the polls ----------------------------------------------------------

    def _read_events(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self.stopping.is_set():
            try:
                got = self.subscription.next_sync(1.0)
            except Exception as e:  # the connection is gone for good: say so once, stop
                print(f"dbtask dashboard: the event subscription ended: {e}", file=sys.stderr, flush=True)
                return
            if got is None:
                continue
            try:
                event = json.loads(got[1])
            except ValueError:
                continue
            loop.call_soon_threadsafe(self._apply, event)

    def _apply(self, event: Any) -> None:
        change = self.model.apply(event)
        if change is not None:
            self.hub.publish(*change)
            if isinstance(event, dict) and event.get("event") == "task.dead_lettered":
                self.hub.publish("dead", {"id": event.get("id")})

    def _ask(self, command: str) -> list[dict[str, Any]]:
        s = self.settings
        return gather(command, {}, timeout=REPLY_TIMEOUT, worker=None, nats_url=s.nats_url, security=s.security)

    async def poll_once(self) -> None:
        stats, queues = await asyncio.gather(
            asyncio.to_thread(self._ask, "stats"), asyncio.to_thread(self._ask, "queues"), return_exceptions=True
        )
        if isinstance(stats, list):
            for reply in stats:
                summary = self.model.stats_reply(reply)
                if summary is not None:
                    self.hub.publish("worker", summary)
        if isinstance(queues, list):
            self.model.queues_replies(queues)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.poll_once()
            except Exception as e:  # keep polling: NATS may come back
                print(f"dbtask dashboard: cannot ask the workers: {e}", file=sys.stderr, flush=True)

    # --- HTTP ------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/api/overview", self._overview)
        app.router.add_get("/api/tasks", self._tasks)
        app.router.add_get("/api/tasks/{id}", self._task)
        app.router.add_post("/api/tasks/{id}/revoke", self._revoke)
        app.router.add_get("/api/dead", self._dead)
        app.router.add_post("/api/dead/{seq}/replay", self._replay)
        app.router.add_get("/api/events", self._events)
        app.on_response_prepare.append(self._headers)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)

    async def _on_shutdown(self, app: web.Application) -> None:
        self.hub.close()

    def _authorized(self, request: web.Request) -> bool:
        s = self.settings
        if s.token is not None:
            offered = request.cookies.get(TOKEN_COOKIE)
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                offered = header[len("Bearer "):]
            if offered is not None and hmac.compare_digest(offered.encode(), s.token.encode()):
                return True
        if s.basic_auth is not None:
            header = request.headers.get("Authorization", "")
            if header.startswith("Basic "):
                try:
                    offered_bytes = base64.b64decode(header[len("Basic "):], validate=True)
                except ValueError:
                    return False
                return hmac.compare_digest(offered_bytes, s.basic_auth.encode())
        return False

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        s = self.settings
        if request.path == "/healthz":
            return await handler(request)
        if s.token is None and s.basic_auth is None:
            # Open on loopback only: refuse a Host that is not (a DNS-rebinding page would send
            # its own name), so that a web site cannot reach the dashboard through the browser.
            if not is_loopback(_host_name(request.host)):
                return web.json_response({"error": f"unexpected Host {request.host!r}: open the dashboard at http://127.0.0.1:{s.port}/"}, status=421)
        elif not self._authorized(request):
            token = request.query.get("token")
            if s.token is not None and token is not None and hmac.compare_digest(token.encode(), s.token.encode()):
                # A link with ?token=...: keep it in a cookie and drop it from the address bar.
                response = web.Response(status=303, headers={"Location": request.path})
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
                return response
            headers = {"WWW-Authenticate": 'Basic realm="dbtask dashboard", charset="UTF-8"'} if s.basic_auth else {}
            what = "a token (open /?token=... once, or send Authorization: Bearer ...)" if s.token else "a user and password"
            return web.json_response({"error": f"the dashboard needs {what}"}, status=401, headers=headers)
        if request.method == "POST" and request.headers.get(CSRF_HEADER) != "1":
            return web.json_response({"error": f"a POST needs the header {CSRF_HEADER}: 1 (the page sends it)"}, status=403)
        return await handler(request)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.static["index.html"], content_type="text/html", charset="utf-8")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self.static[name], content_type=STATIC[name], charset="utf-8" if STATIC[name].startswith("text") else None)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _overview(self, request: web.Request) -> web.Response:
        return web.json_response(self.model.overview())

    async def _tasks(self, request: web.Request) -> web.Response:
        try:
            limit = min(max(int(request.query.get("limit", "200")), 1), 1000)
        except ValueError:
            return web.json_response({"error": "limit must be a whole number"}, status=400)
        found = self.model.search(request.query.get("q", ""), request.query.get("state", ""), limit)
        return web.json_response({"tasks": found, "kept": len(self.model.tasks)})

    async def _task(self, request: web.Request) -> web.Response:
        from .._result import AsyncResult

        task_id = request.match_info["id"]
        try:
            record = await AsyncResult(task_id).info()
        except (ConnectionError, TimeoutError) as e:
            return web.json_response({"error": f"cannot read the task's record: {e}"}, status=503)
        summary = self.model.tasks.get(task_id)
        timeline = list(self.model.timelines.get(task_id, ()))
        return web.json_response({"record": record, "summary": summary, "timeline": timeline}, dumps=_dumps)

    async def _revoke(self, request: web.Request) -> web.Response:
        from .._revoke import revoke

        task_id = request.match_info["id"]
        try:
            body = await request.json()
        except ValueError:
            body = {}
        terminate = bool(body.get("terminate")) if isinstance(body, dict) else False
        try:
            await revoke(task_id, terminate, ttl=DEFAULT_REVOKE_TTL)
        except (ConnectionError, TimeoutError, ValueError) as e:
            return web.json_response({"error": f"cannot revoke {task_id}: {e}"}, status=503)
        what = "terminated" if terminate else "revoked"
        return web.json_response({"ok": True, "id": task_id, "terminate": terminate, "message": f"{task_id} {what}"})

    async def _dead(self, request: web.Request) -> web.Response:
        from .._cli import _letter_dict

        queue = request.query.get("queue") or None
        try:
            letters = await asyncio.to_thread(self.admin.dead_list, queue, 1, 200)
        except (ConnectionError, TimeoutError, ValueError) as e:
            return web.json_response({"error": f"cannot list the dead letters: {e}"}, status=503)
        return web.json_response({"letters": [_letter_dict(x) for x in letters]}, dumps=_dumps)

    async def _replay(self, request: web.Request) -> web.Response:
        try:
            seq = int(request.match_info["seq"])
        except ValueError:
            return web.json_response({"error": "a dead letter's sequence is a whole number"}, status=400)
        try:
            subject, task_seq = await asyncio.to_thread(self.admin.dead_replay, seq)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=404)
        except (ConnectionError, TimeoutError) as e:
            return web.json_response({"error": f"cannot replay dead letter {seq}: {e}"}, status=503)
        self.hub.publish("dead", {"replayed": seq})
        return web.json_response({"ok": True, "sequence": seq, "subject": subject, "message": f"dead letter {seq} replayed to {subject}"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        page: asyncio.Queue[Optional[str]] = asyncio.Queue(maxsize=PAGE_QUEUE)
        # Registered before the answer starts: the page fetches what it shows once connected,
        # and no event after that is missed.
        self.hub.pages.add(page)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
            while True:
                try:
                    text = await asyncio.wait_for(page.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if text is None:
                    break
                await response.write(text.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.pages.discard(page)
        return response

    # --- running -----------------------------------------------------------------------------------

    async def serve(self, ready: Optional[Callable[[str], None]] = None) -> None:
        s = self.settings
        await _client.init(nats_url=s.nats_url, redis_url=s.redis_url, timeout=s.connect_timeout, **s.security)
        try:
            self.admin = await asyncio.to_thread(admin_for, s.nats_url, s.connect_timeout, **s.security)
            self.subscription = self.admin.events()
            loop = asyncio.get_running_loop()
            reader = threading.Thread(target=self._read_events, args=(loop,), name="dbtask-dashboard-events", daemon=True)
            reader.start()
            await self.poll_once()
            runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
            await runner.setup()
            try:
                site = web.TCPSite(runner, s.address, s.port)
                try:
                    await site.start()
                except OSError as e:
                    raise ConnectionError(f"cannot serve the dashboard on {s.address}:{s.port}: {e.strerror or e} (another process listens there? choose another --port)") from None
                host, port = runner.addresses[0][:2]
                shown = f"[{host}]" if ":" in host else host
                url = f"http://{shown}:{port}/"
                if ready is not None:
                    ready(url)
                stop = asyncio.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    try:
                        loop.add_signal_handler(sig, stop.set)
                    except (NotImplementedError, RuntimeError):
                        pass
                poller = asyncio.create_task(self._poll())
                try:
                    await stop.wait()
                finally:
                    poller.cancel()
            finally:
                self.stopping.set()
                self.hub.close()
                await runner.cleanup()
        finally:
            await _client.close()


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:5555" -> "::1"."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


def run(settings: Settings) -> int:
    """Serves until SIGINT / SIGTERM; the exit code."""
    check_settings(settings)
    dashboard = Dashboard(settings)

    def ready(url: str) -> None:
        auth = " (token required)" if settings.token else " (password required)" if settings.basic_auth else ""
        print(f"dbtask dashboard on {url}{auth}; Ctrl-C to stop", file=sys.stderr, flush=True)

    asyncio.run(dashboard.serve(ready))
    return 0
