"""The dashboard's state from a running campaign's Redis (see `arrl.dashboard.data` for the document).

Everything is read incrementally, because the page asks every second: ledger records are
immutable once written, so only ids not seen before are fetched; each running experiment's
event stream is read from the last entry id seen; a recorded experiment's curve is read once.
The methods are coroutines on one event loop (the server's blocking portal), so the cached
state needs no lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import redis

from arrl.bus import Bus
from arrl.campaign import Campaign, latest_campaign_id
from arrl.dashboard.data import (
    Curve,
    budget_of,
    curve_from_log,
    detail_of,
    display_ids,
    document,
    experiment_row,
)
from arrl.ledger import for_files
from arrl.status import queue_numbers, snapshot

EVENTS_PER_READ = 5_000


class LiveSource:
    """A campaign's state from its Redis; `run_dir`, when known, supplies curves Redis lacks."""

    def __init__(self, url: str, campaign_id: str | None = None, run_dir: Path | str | None = None) -> None:
        self.url = url
        self.campaign_id = campaign_id
        self.run_dir = Path(run_dir) if run_dir else None
        self.campaign: Campaign | None = None
        self._sync: redis.Redis | None = None  # rq's counts (queue_numbers) need a blocking client
        self._records: dict[str, dict[str, Any]] = {}
        self._rows: dict[str, dict[str, Any]] = {}
        self._curves: dict[str, Curve] = {}

    async def open(self) -> Campaign:
        if self.campaign is None:
            # A short socket timeout: a Redis that went away must turn into the run directory's
            # view within a poll or two, not after redis-py's 30 s default for blocking reads.
            probe = Bus.from_url(self.url, "probe", socket_timeout=2.0, retries=0)
            try:
                self.campaign_id = self.campaign_id or await latest_campaign_id(probe.redis)
            finally:
                await probe.aclose()
            if not self.campaign_id:
                raise LookupError(f"no campaign in {self.url}")
            self.campaign = await Campaign.load(Bus.from_url(self.url, self.campaign_id, socket_timeout=2.0,
                                                             retries=0))
            self._sync = redis.Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return self.campaign

    async def aclose(self) -> None:
        if self.campaign is not None:
            await self.campaign.bus.aclose()
            self.campaign = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    # -- reading ------------------------------------------------------------------------------
    async def _sync_records(self, campaign: Campaign) -> None:
        bus = campaign.bus
        ids = sorted(k.decode() for k in await bus.redis.hkeys(bus.key("ledger")))
        for exp_id in ids:
            if exp_id not in self._records:
                record = await campaign.get_record(exp_id)
                if record is not None:
                    record.setdefault("experiment_id", exp_id)
                    self._records[exp_id] = for_files(record)  # without the policy's state vector
                    self._rows[exp_id] = experiment_row(record)

    async def _follow(self, campaign: Campaign, curve: Curve) -> Curve:
        """Read the experiment's events after the last one seen into its curve."""
        while batch := await campaign.bus.read_events(curve.exp_id, curve.last_id, count=EVENTS_PER_READ):
            for entry_id, event in batch:
                curve.last_id = entry_id
                curve.add(event)
            if len(batch) < EVENTS_PER_READ:
                break
        return curve

    async def _recorded_curve(self, campaign: Campaign, exp_id: str) -> Curve:
        """A recorded experiment's whole curve, read once: from Redis, else from its log file."""
        curve = self._curves.get(exp_id)
        if curve is None or not curve.complete:
            curve = await self._follow(campaign, curve or Curve(exp_id))
            if not curve.points and self.run_dir is not None:
                curve = curve_from_log(self.run_dir / "logs" / f"{exp_id}.jsonl", exp_id)
            curve.complete = True
            self._curves[exp_id] = curve
        return curve

    async def state(self) -> dict[str, Any]:
        campaign = await self.open()
        bus = campaign.bus
        assert self._sync is not None
        queues = await anyio.to_thread.run_sync(queue_numbers, self._sync)
        summary = await snapshot(campaign, queues)
        await self._sync_records(campaign)
        inflight = await campaign.inflight()
        started = {k.decode(): float(v) for k, v in (await bus.redis.hgetall(bus.key("started_at"))).items()}
        running = sorted((i for i in inflight if i in started and i not in self._records), key=started.__getitem__)
        queued = [{"id": i, "description": (inflight[i].get("proposal") or {}).get("description") or ""}
                  for i in sorted(inflight) if i not in started and i not in self._records]
        curves = []
        for exp_id in running:
            curve = await self._follow(campaign, self._curves.setdefault(exp_id, Curve(exp_id)))
            description = (inflight[exp_id].get("proposal") or {}).get("description")
            curves.append(curve.entry("running", None, description))
        rows = list(self._rows.values())
        shown = display_ids(rows, summary.get("best_experiment"))
        for exp_id, role in shown:
            if exp_id in self._rows:
                curves.append((await self._recorded_curve(campaign, exp_id)).entry(role, self._rows[exp_id]))
        # Forget the curves no longer on the chart: a long campaign must not grow this cache.
        keep = set(running) | {i for i, _ in shown}
        self._curves = {i: c for i, c in self._curves.items() if i in keep}
        return document(summary, rows, curves, budget_of(campaign.config.to_dict()), "live", queued)

    async def detail(self, exp_id: str) -> dict[str, Any] | None:
        campaign = await self.open()
        record = self._records.get(exp_id) or await campaign.get_record(exp_id)
        if record is None:
            return None
        record.setdefault("experiment_id", exp_id)
        curve = self._curves.get(exp_id) or await self._follow(campaign, Curve(exp_id))
        if not curve.points and self.run_dir is not None:
            curve = curve_from_log(self.run_dir / "logs" / f"{exp_id}.jsonl", exp_id)
        return detail_of(record, curve)
