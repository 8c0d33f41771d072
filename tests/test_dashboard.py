"""`arrl dashboard`: the state document from real run directories and a real Redis, the HTTP
routes, and the page itself in headless Chromium following a real smoke campaign.

The browser is driven over the DevTools protocol with the standard library only (a minimal
websocket client below), so one page load can be read again and again: the test sees the page's
own polling advance the curves, then decodes a screenshot (zlib + numpy) to check the charts.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from envfixtures import prepared_data  # noqa: F401
from waiting import reap, wait_until

from arrl.bus import Bus
from arrl.campaign import Campaign, CampaignConfig
from arrl.dashboard.data import MAX_CURVE_POINTS, Curve, RunDirSource, best_series
from arrl.dashboard.server import MIN_AGE_S, running
from arrl.ledger import RunDir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIM_EXPERIMENTS = 30
LIVE_EXPERIMENTS = 3


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> dict[str, Any]:
    status, body = get(url)
    assert status == 200, body[:300]
    return json.loads(body)


# -- a real run directory: a simulated campaign (the real stages, a landscape instead of training) --


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dash-sim") / "run"
    done = subprocess.run([str(BIN / "arrl"), "run", "--executor", "sim", "--landscape", "arrl.landscapes:cpu_fitted",
                           "--strategy", "random", "--max-experiments", str(SIM_EXPERIMENTS), "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return run_dir


def test_state_from_a_run_directory_matches_its_ledger(sim_run: Path) -> None:
    records = RunDir(sim_run).records()
    state = RunDirSource(sim_run).state()
    json.dumps(state, allow_nan=False)  # what the browser's JSON.parse accepts
    rows = state["experiments"]
    assert [r["id"] for r in rows] == sorted(r["experiment_id"] for r in records)
    by_id = {r["experiment_id"]: r for r in records}
    for row in rows:
        record = by_id[row["id"]]
        assert row["outcome"] == ("keep" if record["kept"] else "discard") if record["status"] == "ok" \
            else row["outcome"] == record["status"]
        assert "diff" not in row and row["has_diff"] == bool(record.get("diff"))
    assert {r["outcome"] for r in rows} >= {"keep", "discard", "aborted"}
    # The best line is the incumbent's score: it moves only at a run that took the lead or at a
    # re-run of the incumbent (`arrl run` re-runs it every 10 experiments), ends at the campaign's
    # incumbent's latest score, and is marked at every kept edit.
    steps = state["best"]["steps"]
    bests = [value for _, value in steps]
    assert len(bests) == SIM_EXPERIMENTS
    ordered = sorted(records, key=lambda r: r["experiment_id"])
    for (_, before), (_, after), record in zip(steps[:-1], steps[1:], ordered[1:], strict=True):
        if after != before:
            assert record["val_bpb"] == after and (record["kept"] or record["role"] == "remeasure")
    assert any(r["role"] == "remeasure" for r in records)
    kept = [r for r in records if r["kept"]]
    assert [k["id"] for k in state["best"]["kept"]] == [r["experiment_id"] for r in kept]
    lead = max(kept, key=lambda r: r["lead_version"])
    reruns = [r for r in ordered if r["role"] == "remeasure" and r["candidate_hash"] == lead["candidate_hash"]
              and r["experiment_id"] > lead["experiment_id"]]
    assert bests[-1] == (reruns[-1] if reruns else lead)["val_bpb"] == state["summary"]["best_val_bpb"]
    assert state["summary"]["best_experiment"] == lead["experiment_id"]
    assert state["summary"]["recorded"] == SIM_EXPERIMENTS and state["summary"]["state"] == "stopped"
    assert state["budget_s"] == 30.0 and state["source"] == "run directory"
    # Curves: the incumbent's and the last recorded, every train.step of their logs, in bits per byte.
    curves = {c["id"]: c for c in state["curves"]}
    best = curves[state["summary"]["best_experiment"]]
    assert best["role"] == "best" and best["status"] == "keep"
    log = [json.loads(line) for line in (sim_run / "logs" / f"{best['id']}.jsonl").read_text().splitlines()]
    steps = [e for e in log if e["event"] == "train.step"]
    assert best["points"] == len(best["curve"]) == len(steps)
    assert best["curve"][-1][1] == pytest.approx(steps[-1]["loss"] / np.log(2), abs=1e-4)
    assert sum(c["role"] == "recent" for c in state["curves"]) >= 2
    aborted = [c for c in state["curves"] if c["status"] == "aborted"]
    for curve in aborted:  # what stopped it: the self-evaluator's last forecast
        assert curve["forecast"]["decision"] == "abort" and curve["forecast"]["val_bpb"] > 0


def test_detail_has_the_diff_record_and_curve(sim_run: Path) -> None:
    records = {r["experiment_id"]: r for r in RunDir(sim_run).records()}
    source = RunDirSource(sim_run)
    detail = source.detail("e00002")
    assert detail is not None and detail["diff"] == records["e00002"]["diff"] and detail["diff"].startswith("--- a/")
    assert detail["record"]["status"] == records["e00002"]["status"] and "diff" not in detail["record"]
    log = [json.loads(line) for line in (sim_run / "logs" / "e00002.jsonl").read_text().splitlines()]
    assert detail["curve"]["points"] == sum(e["event"] == "train.step" and np.isfinite(e["loss"]) for e in log) > 0
    assert source.detail("e99999") is None


def test_best_series_is_a_running_minimum_of_kept_results() -> None:
    rows = [{"id": f"e{i:05d}", "index": i, "kept": kept, "status": status, "val_bpb": val, "description": "",
             "role": "edit"} for i, kept, status, val in [(1, True, "ok", 3.0), (2, False, "ok", 2.0),
                                                          (3, False, "crashed", None), (4, True, "ok", 2.5),
                                                          (5, True, "ok", 2.7)]]  # e00005: kept before e00004
    series = best_series(rows)
    assert series["steps"] == [[1, 3.0], [2, 3.0], [3, 3.0], [4, 2.5], [5, 2.5]]
    assert [k["id"] for k in series["kept"]] == ["e00001", "e00004", "e00005"]


def test_best_series_follows_the_lead_and_the_reruns_of_the_incumbent() -> None:
    """With incumbent versions and re-runs: e00004 kept after e00005 (versions 3 and 2, two workers),
    e00006 re-runs e00004's script worse, e00007 re-runs e00005's (no longer leading)."""
    rows = [{"id": f"e{i:05d}", "index": i, "kept": kept, "status": "ok", "val_bpb": val, "description": "",
             "role": role, "script": script, "lead_version": version}
            for i, role, script, kept, version, val in [
                (1, "baseline", "a", True, 1, 3.0), (2, "edit", "b", False, None, 3.1), (3, "edit", "c", False, None, 3.2),
                (4, "edit", "d", True, 3, 2.6), (5, "edit", "e", True, 2, 2.5), (6, "remeasure", "d", False, None, 2.8),
                (7, "remeasure", "e", False, None, 2.4)]]
    assert [v for _, v in best_series(rows)["steps"]] == [3.0, 3.0, 3.0, 2.6, 2.6, 2.8, 2.8]


def test_curves_drop_non_finite_losses_and_are_thinned_for_the_page() -> None:
    curve = Curve("e00001")
    for step in range(2 * MAX_CURVE_POINTS + 7):
        curve.add({"event": "train.step", "training_seconds": step * 0.01, "loss": 5.0 - step * 1e-3})
    curve.add({"event": "train.step", "training_seconds": 99.0, "loss": float("nan")})
    entry = curve.entry("running", None, "an edit")
    assert entry["points"] == 2 * MAX_CURVE_POINTS + 7
    assert len(entry["curve"]) <= MAX_CURVE_POINTS + 1 and entry["curve"][-1] == curve.points[-1]
    assert entry["status"] == "running" and entry["forecast"] is None and entry["description"] == "an edit"


def test_non_finite_numbers_never_reach_the_page(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    run_dir.init({"campaign_id": "cnan", "profile": "smoke"}, "x = 1\n")
    run_dir.append({"experiment_id": "e00001", "status": "crashed", "kept": False, "val_bpb": float("nan"),
                    "reward": float("-inf"), "recorded_at": 1.0, "diff": "--- a/train.py\n"},
                   log_lines=[{"event": "train.step", "training_seconds": 0.1, "loss": float("nan")}])
    source = RunDirSource(run_dir.path)
    state, detail = source.state(), source.detail("e00001")
    json.dumps(state, allow_nan=False), json.dumps(detail, allow_nan=False)  # what JSON.parse accepts
    assert state["experiments"][0]["val_bpb"] is None and detail["record"]["reward"] is None


def test_server_serves_the_page_the_state_and_diffs(sim_run: Path) -> None:
    ledger = {r["experiment_id"]: r for r in RunDir(sim_run).records()}
    with running(run_dir=sim_run) as server:
        status, page = get(server.url)
        assert status == 200 and b'<script src="app.js">' in page
        for name in ("app.js", "style.css"):
            status, body = get(server.url + name)
            assert status == 200 and len(body) > 1000
        for asset in (page, get(server.url + "app.js")[1], get(server.url + "style.css")[1]):
            assert b"https://" not in asset and b"//cdn" not in asset  # offline: nothing fetched elsewhere
        state = get_json(server.url + "api/state")
        assert len(state["experiments"]) == SIM_EXPERIMENTS
        assert get(server.url + "diff/e00002") == (200, ledger["e00002"]["diff"].encode())
        assert get_json(server.url + "api/experiment/e00003")["row"]["id"] == "e00003"
        for missing in ("api/experiment/e99999", "diff/..%2fcampaign.json", "static/app.js", "nope"):
            assert get(server.url + missing)[0] == 404, missing


def test_cli_refuses_a_folder_that_is_not_a_run_directory(tmp_path: Path) -> None:
    done = subprocess.run([str(BIN / "arrl"), "dashboard", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a run directory" in done.stderr


# -- a live campaign in a real Redis, driven by hand: the running experiment's curve and forecast --


def test_live_state_follows_a_running_experiment(redis_server) -> None:
    url = redis_server.url

    async def setup() -> None:
        async with Bus.from_url(url, "cdash") as bus:
            campaign = await Campaign.create(bus, CampaignConfig(campaign_id="cdash", profile="smoke"), "x = 1\n", "h0")
            await campaign.track("e00001", {"proposal": {"description": "baseline"}})
            await campaign.mark_started("e00001")
            await campaign.track("e00002", {"proposal": {"description": "DEPTH 3 -> 4"}})  # queued
            for step in range(5):
                await bus.publish_event("e00001", {"event": "train.step", "training_seconds": 0.2 * step, "loss": 5.5 - step * 0.1})

    async def progress() -> None:
        async with Bus.from_url(url, "cdash") as bus:
            for step in range(5, 8):
                await bus.publish_event("e00001", {"event": "train.step", "training_seconds": 0.2 * step, "loss": 5.5 - step * 0.1})
            await bus.publish_event("e00001", {"event": "selfeval.verdict", "decision": "continue", "reason": "ok",
                                               "fraction": 0.5, "forecast_val_bpb": 6.9, "forecast_std": 0.2, "tau": 7.5,
                                               "p_worse": 0.01, "method": "ensemble"})

    async def record() -> None:
        async with Bus.from_url(url, "cdash") as bus:
            campaign = await Campaign.load(bus)
            await bus.cas_incumbent(0, {"hash": "h0", "val_bpb": 7.0, "experiment_id": "e00001", "description": "baseline"})
            await campaign.record("e00001", {"experiment_id": "e00001", "status": "ok", "kept": True, "val_bpb": 7.0,
                                             "description": "baseline", "diff": "", "recorded_at": time.time(),
                                             "extra": {"state": [0.0] * 1000}}, counters=("recorded", "status_ok"))
            await campaign.untrack("e00001")

    anyio.run(setup)
    with running(redis_url=url) as server:
        first = get_json(server.url + "api/state")
        assert first["source"] == "live" and first["summary"]["campaign"] == "cdash"
        [live] = first["curves"]
        assert (live["id"], live["role"], live["points"], live["forecast"]) == ("e00001", "running", 5, None)
        assert live["description"] == "baseline" and first["queue"] == [{"id": "e00002", "description": "DEPTH 3 -> 4"}]
        assert first["summary"]["workers"] == 0 and first["experiments"] == []
        anyio.run(progress)
        time.sleep(MIN_AGE_S)
        [live] = get_json(server.url + "api/state")["curves"]
        assert live["points"] == 8 and live["forecast"]["val_bpb"] == 6.9 and live["forecast"]["tau"] == 7.5
        anyio.run(record)
        time.sleep(MIN_AGE_S)
        after = get_json(server.url + "api/state")
        assert [r["id"] for r in after["experiments"]] == ["e00001"] and after["experiments"][0]["outcome"] == "keep"
        assert [(c["id"], c["role"], c["points"]) for c in after["curves"]] == [("e00001", "best", 8)]
        assert "state" not in json.dumps(get_json(server.url + "api/experiment/e00001")["record"].get("extra"))


# -- the page in headless Chromium, following a real smoke campaign to its end ---------------------


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: masked text frames out, frames in."""

    def __init__(self, url: str) -> None:
        hostport, path = url.removeprefix("ws://").split("/", 1)
        host, port = hostport.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self._exact(1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the DevTools socket closed")
            buf += chunk
        return bytes(buf)

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 \
            else bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = (np.frombuffer(data, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(bytes([0x81]) + length + mask + masked)

    def recv(self) -> str:
        message = b""
        while True:  # a long reply (a screenshot) may come in continuation frames
            first, second = self._exact(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            message += self._exact(n)
            if first & 0x80:
                return message.decode()


def chromium_binary() -> str:
    named = os.environ.get("ARRL_CHROMIUM")
    binary = shutil.which(named) if named else shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:  # failed, never skipped: scripts/test.sh installs Debian's chromium package
        pytest.fail("chromium not found: `apt-get install chromium` (scripts/test.sh does it) "
                    "or set ARRL_CHROMIUM to a Chromium binary", pytrace=False)
    return binary


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile: Path, width: int, height: int) -> None:
        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        wait_until(lambda: port_file.exists() and len(port_file.read_text().split()) >= 2, 30, "chromium's port")
        port = int(port_file.read_text().split()[0])
        targets = json.loads(get(f"http://127.0.0.1:{port}/json/list")[1])
        self.ws = WebSocket(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        self.last_id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.last_id:  # anything else is an event: not asked for
                assert "error" not in reply, (method, reply)
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def decode_png(data: bytes) -> np.ndarray:
    """(height, width, channels) uint8 of an 8-bit RGB or RGBA PNG, without an image library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + size])
        elif kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + size]
        pos += 12 + size
    assert header is not None
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour_type in (2, 6), header
    bpp = 4 if colour_type == 6 else 3
    raw, stride = zlib.decompress(idat), width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for row in range(height):  # undo each scanline's filter (PNG spec, section 9)
        kind, line = raw[row * (stride + 1)], np.frombuffer(raw, np.uint8, stride, row * (stride + 1) + 1).astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:
            cur = (line + prev) % 256
        else:  # average and Paeth depend on the pixel just decoded: byte by byte
            c, up = line.tolist(), prev.tolist()
            for i in range(stride):
                a = c[i - bpp] if i >= bpp else 0
                if kind == 3:
                    c[i] = (c[i] + ((a + up[i]) >> 1)) & 255
                else:
                    b, d = up[i], up[i - bpp] if i >= bpp else 0
                    p = a + b - d
                    pa, pb, pd = abs(p - a), abs(p - b), abs(p - d)
                    c[i] = (c[i] + (a if pa <= pb and pa <= pd else b if pb <= pd else d)) & 255
            cur = np.array(c, dtype=np.int64)
        out[row], prev = cur, cur
    return out.reshape(height, width, bpp)


# What the test reads from the page (the DOM its script rendered), every few hundred milliseconds.
PAGE_PROBE = """JSON.stringify({
  source: document.getElementById("source").textContent,
  state: document.getElementById("state").textContent,
  curves: [...document.querySelectorAll("#legend-curves [data-exp]")].map(e => [e.dataset.exp, e.dataset.role, +e.dataset.points]),
  forecasts: [...document.querySelectorAll("#running-list .run .nums")].filter(e => e.textContent.includes("±")).length,
  charts: Object.fromEntries(["chart-best", "chart-all", "chart-curves"].map(id => {
    const r = document.getElementById(id).getBoundingClientRect();
    return [id, {points: +(document.getElementById(id).dataset.points || 0), box: [r.left, r.top, r.width, r.height]}];
  })),
  rows: [...document.querySelectorAll("#ledger tr.row")].map(e => e.dataset.id),
})"""


def plotted_pixels(image: np.ndarray, box: list[float]) -> int:
    """Coloured pixels inside a chart (grid, axes and text are grey; every series has a hue)."""
    left, top, width, height = (int(round(v)) for v in box)
    area = image[top:top + height, left:left + width, :3].astype(np.int16)
    return int(((area.max(axis=2) - area.min(axis=2)) > 60).sum())


@pytest.mark.slow
def test_page_follows_a_live_campaign_in_chromium(tmp_path: Path, prepared_data) -> None:  # noqa: F811
    binary = chromium_binary()  # before the campaign: a missing browser fails at once
    run_dir, procs = tmp_path / "run", {}
    try:
        with (tmp_path / "run.out").open("wb") as out:
            procs["run"] = subprocess.Popen(
                [str(BIN / "arrl"), "run", "--profile", "smoke", "--strategy", "random", "--max-experiments",
                 str(LIVE_EXPERIMENTS), "--run-dir", str(run_dir),
                 # Forecasts but no aborts: an edit forecast hopeless is aborted within a second of its
                 # first forecast, too short a time for the page (polled every second) to be sure to show it.
                 "--selfeval-option", "alpha=1000"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: (run_dir / "campaign.json").exists(), 60, "the campaign's run directory")
        with (tmp_path / "dashboard.out").open("wb") as out:
            procs["dashboard"] = subprocess.Popen([str(BIN / "arrl"), "dashboard", str(run_dir)], cwd=ROOT,
                                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        printed = lambda: (tmp_path / "dashboard.out").read_text()  # noqa: E731
        wait_until(lambda: "http://" in printed() or procs["dashboard"].poll() is not None, 30, "the dashboard's URL")
        url = printed().split("http://", 1)[1].split()[0]
        profile = tmp_path / "chromium"
        profile.mkdir()
        browser = Chromium(binary, profile, 1400, 1300)
        procs["chromium"] = browser.proc
        browser.call("Page.navigate", url=f"http://{url}")

        # While the campaign runs: the same page load (no reload) must draw curves that grow.
        seen: dict[str, int] = {}
        grew, forecast_seen, shot = [], False, None
        while procs["run"].poll() is None:
            probe = json.loads(browser.evaluate(PAGE_PROBE) or "{}")
            for exp_id, role, points in probe.get("curves", []):
                if role == "running" and exp_id not in seen:
                    seen[exp_id] = points
                elif exp_id in seen and points > seen[exp_id]:
                    grew.append((exp_id, seen[exp_id], points))
            forecast_seen |= probe.get("forecasts", 0) > 0
            charts = probe.get("charts", {})
            if shot is None and charts and all(c["points"] > 0 for c in charts.values()) and \
                    any(role == "running" and points > 1 for _, role, points in probe["curves"]):
                shot = (browser.screenshot(), charts, probe)
            time.sleep(0.25)
        assert procs["run"].returncode == 0, (tmp_path / "run.out").read_text()[-2000:]
        assert grew, f"no running curve grew on the page; first counts seen: {seen}"
        assert forecast_seen, "no running experiment showed the self-evaluator's forecast"

        # The charts were drawn: coloured pixels in each chart's box of the live screenshot.
        assert shot is not None, "never saw all three charts with data while a running curve was drawn"
        png, charts, probe = shot
        (tmp_path / "live.png").write_bytes(png)
        image = decode_png(png)
        assert image.shape[:2] == (1300, 1400)
        for chart_id, chart in charts.items():
            assert plotted_pixels(image, chart["box"]) > 40, (chart_id, chart, tmp_path / "live.png")
        assert (image[5, 5, :3] < 60).all()  # the dark header: the page, not a blank or an error

        # Once `arrl run` has stopped its Redis, the same page goes on from the run directory.
        def finished() -> dict[str, Any] | None:
            probe = json.loads(browser.evaluate(PAGE_PROBE) or "{}")
            done = probe.get("source", "").startswith("source: run directory") and len(probe["rows"]) == LIVE_EXPERIMENTS
            return probe if done else None

        final = wait_until(finished, 30, "the page to show the finished campaign from its run directory")
        assert final["state"] == "stopped"
        ledger = {r["experiment_id"]: r for r in RunDir(run_dir).records()}
        assert sorted(final["rows"]) == sorted(ledger)

        # Sortable: by val_bpb, then reversed (blanks stay last either way).
        browser.evaluate("""document.querySelector('#ledger th[data-key="val_bpb"]').click()""")
        rows = browser.evaluate("""[...document.querySelectorAll('#ledger tr.row')].map(e => e.dataset.id)""")
        valued = sorted((r for r in ledger.values() if r["val_bpb"] is not None), key=lambda r: r["val_bpb"])
        assert rows[:len(valued)] == [r["experiment_id"] for r in valued]
        browser.evaluate("""document.querySelector('#ledger th[data-key="val_bpb"]').click()""")
        rows = browser.evaluate("""[...document.querySelectorAll('#ledger tr.row')].map(e => e.dataset.id)""")
        assert rows[:len(valued)] == [r["experiment_id"] for r in reversed(valued)]

        # A diff is one click away: the row opens, fetches the experiment and shows its lines.
        edit = next(r for r in ledger.values() if r.get("diff"))
        browser.evaluate(f"""document.querySelector('#ledger tr.row[data-id="{edit['experiment_id']}"]').click()""")
        added = wait_until(lambda: browser.evaluate("""[...document.querySelectorAll('pre.diff .add')].map(e => e.textContent)"""),
                           10, "the diff to open")
        assert all(line in edit["diff"].splitlines() for line in added)
        (tmp_path / "finished.png").write_bytes(browser.screenshot())
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:  # twice for `arrl run`: stop now, not after in-flight experiments
                proc.send_signal(signal.SIGINT)
                if name == "run":
                    time.sleep(0.5)
                    proc.send_signal(signal.SIGINT)
        reap(procs.values())
