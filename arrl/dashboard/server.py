"""The dashboard's web server: the standard library's threading HTTP server, nothing to install.

Routes (all GET):

    /                        the page (static/index.html, which loads app.js and style.css)
    /api/state               the state document (arrl.dashboard.data), at most MIN_AGE_S old
    /api/experiment/<id>     one experiment in full: record, diff, curve
    /diff/<id>               its diff as plain text

Which source answers is decided on every refresh: the campaign's Redis while the campaign runs
(named by --redis-url, or found in RUN_DIR/campaign.json as `arrl status RUN_DIR` finds it), the
run directory's files once that Redis is gone. So one dashboard follows a campaign live and then
keeps showing it after `arrl run` has stopped its private Redis.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import anyio.from_thread
import redis

from arrl.dashboard.data import RunDirSource
from arrl.dashboard.live import LiveSource

MIN_AGE_S = 0.5  # several open pages (or tabs) share one refresh of the state
RETRY_LIVE_S = 5.0  # after the campaign's Redis failed, ask it again this often
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
EXP_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
LIVE_ERRORS = (redis.RedisError, OSError, LookupError)


class Dashboard:
    """Builds the state from whichever source is current; safe to call from many threads."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, run_dir: Path | str | None = None,
                 redis_url: str | None = None, campaign_id: str | None = None) -> None:
        if run_dir is None and redis_url is None:
            raise ValueError("a dashboard needs a run directory or a Redis URL")
        self.portal = portal
        self.run_dir = Path(run_dir) if run_dir else None
        self.redis_url = redis_url
        self.campaign_id = campaign_id
        self.offline = RunDirSource(self.run_dir) if self.run_dir else None
        self.live: LiveSource | None = None
        self.live_error = ""
        self._retry_live_at = 0.0
        self._lock = threading.Lock()
        self._state: bytes = b""
        self._state_at = 0.0
        self._last_live: dict[str, Any] | None = None

    def _campaign_json(self) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir / "campaign.json").read_text()) if self.run_dir else {}
        except (OSError, ValueError):  # being rewritten by `arrl run` right now: next time
            return {}

    def _live_url(self) -> str | None:
        """The Redis to ask now, or None when the run directory tells the whole story."""
        if self.redis_url:
            return self.redis_url
        saved = self._campaign_json()
        # `arrl run` writes the final `state` into campaign.json as it stops (and its private
        # Redis with it); `--resume` rewrites the file without it and on a new port.
        if saved.get("redis_url") and "state" not in saved:
            return saved["redis_url"]
        return None

    def _live_source(self, url: str) -> LiveSource:
        if self.live is not None and self.live.url != url:
            self._close_live()
        if self.live is None:
            campaign = self.campaign_id or self._campaign_json().get("campaign_id")
            self.live = LiveSource(url, campaign, self.run_dir)
        return self.live

    def _close_live(self) -> None:
        if self.live is not None:
            try:
                self.portal.call(self.live.aclose)
            except LIVE_ERRORS:
                pass
            self.live = None

    def _build(self) -> dict[str, Any]:
        url = self._live_url()
        if url and time.monotonic() >= self._retry_live_at:
            try:
                state = self.portal.call(self._live_source(url).state)
                self.live_error, self._last_live = "", state
                return state
            except LIVE_ERRORS as exc:
                self.live_error = f"{type(exc).__name__}: {exc}"
                self._retry_live_at = time.monotonic() + RETRY_LIVE_S
                self._close_live()
        if self.offline is not None:
            source = "run directory" + (" (the campaign's Redis is not reachable)" if url else "")
            return self.offline.state(source)
        if self._last_live is not None:  # --redis-url alone: the last view, marked as stale below
            return {**self._last_live, "source": "live (stale)", "generated_at": time.time()}
        return {"generated_at": time.time(), "source": "unavailable"}

    def state_json(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._state_at >= MIN_AGE_S:
                state = self._build()
                if self.live_error:
                    state["live_error"] = self.live_error
                self._state = json.dumps(state, allow_nan=False).encode()
                self._state_at = time.monotonic()
            return self._state

    def detail(self, exp_id: str) -> dict[str, Any] | None:
        with self._lock:
            if self.live is not None:
                try:
                    found = self.portal.call(self.live.detail, exp_id)
                    if found is not None:
                        return found
                except LIVE_ERRORS:
                    pass
            return self.offline.detail(exp_id) if self.offline is not None else None

    def close(self) -> None:
        with self._lock:
            self._close_live()


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        try:
            self._route(self.path.split("?", 1)[0])
        except Exception as exc:  # a torn file, a bug: say so in the reply, keep serving
            self._send(f"{type(exc).__name__}: {exc}\n".encode(), "text/plain", HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self, path: str) -> None:
        name = "index.html" if path == "/" else path.lstrip("/")
        if name in STATIC:
            body = (resources.files("arrl.dashboard") / "static" / name).read_bytes()
            return self._send(body, STATIC[name] + "; charset=utf-8")
        if path == "/api/state":
            return self._send(self.server.dashboard.state_json(), "application/json")
        for prefix in ("/api/experiment/", "/diff/"):
            exp_id = path.removeprefix(prefix)
            if path.startswith(prefix) and EXP_ID.match(exp_id):
                detail = self.server.dashboard.detail(exp_id)
                if detail is None:
                    break
                if prefix == "/diff/":
                    return self._send(detail["diff"].encode(), "text/plain; charset=utf-8")
                return self._send(json.dumps(detail, default=str, allow_nan=False).encode(), "application/json")
        self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # every poll must see the new state
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # one line per poll per second would drown the printed URL


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # a browser's half-open connection must not keep the process alive

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        super().__init__(address, Handler)
        self.dashboard = dashboard

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


@contextmanager
def running(run_dir: Path | str | None = None, redis_url: str | None = None, campaign_id: str | None = None,
            host: str = "127.0.0.1", port: int = 0) -> Iterator[DashboardServer]:
    """A dashboard served from a background thread, for tests and for `serve`."""
    with anyio.from_thread.start_blocking_portal() as portal:
        dashboard = Dashboard(portal, run_dir, redis_url, campaign_id)
        server = DashboardServer((host, port), dashboard)
        thread = threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.shutdown()
            server.server_close()
            dashboard.close()


def serve(run_dir: Path | str | None = None, redis_url: str | None = None, campaign_id: str | None = None,
          host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve until Ctrl-C; prints the URL first (port 0 picks a free one)."""
    with running(run_dir, redis_url, campaign_id, host, port) as server:
        what = str(run_dir) if run_dir else redis_url
        print(f"arrl dashboard: {what} on {server.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
