"""A campaign's configuration and shared state in Redis.

Every stage reads the configuration once (it never changes during a campaign) and reads or
updates the small shared state: the run state, counters, the ledger of recorded experiments,
and the scores of candidate scripts by content hash.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack
import structlog

from arrl.bus import Bus
from arrl.reward import DEFAULT_SIGMA, speed_mismatch
from arrl.scores import class_score, experiment_number, measured_by, of_class, score_speed

log = structlog.get_logger()

# Run states: proposers work only while "running"; "stopping" lets in-flight experiments finish.
RUNNING, STOPPING, STOPPED = "running", "stopping", "stopped"
CAMPAIGNS_KEY = "arrl:campaigns"  # sorted set of campaign ids by creation time, across campaigns

# Stream names (namespaced per campaign by the bus).
PROPOSALS, RESULTS, TRANSITIONS = "proposals", "results", "transitions"
QUEUE_NAME = "gpu"
# A running job renews its lease key this often; the key expires LEASE_TTL_S after the job's
# process stopped renewing it (it died), which is how the sweeper learns that within seconds.
LEASE_TTL_S = float(os.environ.get("ARRL_LEASE_TTL_S", "15"))
LEASE_RENEW_S = min(2.0, LEASE_TTL_S / 3)
WEIGHTS = "policy"

# Reserve the next experiment id unless the campaign is over or the cap is reached. The
# reservation (id -> token) stays in KEYS[3] until the proposal is published, so an id whose
# proposer died in between is found and proposed by another one (nothing waits on it forever).
_RESERVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
local n = redis.call('HINCRBY', KEYS[2], 'proposed', 1)
if tonumber(ARGV[1]) > 0 and n > tonumber(ARGV[1]) then
  redis.call('HINCRBY', KEYS[2], 'proposed', -1)
  return -2
end
redis.call('HSET', KEYS[3], string.format('e%05d', n), ARGV[3])
return n
"""

# Publish a proposal only while its reservation is still the caller's, and end the reservation
# in the same step: a proposal id is published exactly once, even if another proposer took over
# a reservation that looked abandoned.
_PUBLISH_RESERVED = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', ARGV[5], ARGV[3])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# Take over an abandoned reservation (compare-and-set on its token).
_TAKE_RESERVATION = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# The commit point of the reward computer: the record and the counters it moves, in one step,
# so a reward computer killed in between can neither lose nor double a count.
# ARGV: exp_id, record, baseline val_bpb ('' if none), since_improvement ('reset', 'incr' or ''),
# then the names of the counters to increment.
_RECORD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[3]) end
if ARGV[4] == 'reset' then redis.call('HSET', KEYS[2], 'since_improvement', 0) end
if ARGV[4] == 'incr' then redis.call('HINCRBY', KEYS[2], 'since_improvement', 1) end
for i = 5, #ARGV do redis.call('HINCRBY', KEYS[2], ARGV[i], 1) end
return 1
"""

# Claim the re-run of the incumbent KEYS field ARGV[1] for experiment ARGV[2], once its latest
# measurement (ARGV[3]) and its latest claim are both ARGV[4] experiments old or more: several
# proposers claim it once, and a re-run that never gave a measurement is claimed again later.
_CLAIM_REMEASURE = """
local last = math.max(tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0'), tonumber(ARGV[3]))
if tonumber(ARGV[2]) - last < tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Count an event once per experiment (a redelivered message must not count twice).
_COUNT_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], 1) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
"""


@dataclass
class CampaignConfig:
    """Everything fixed for one campaign; stored in Redis as msgpack of plain types."""

    campaign_id: str = field(default_factory=lambda: time.strftime("c%Y%m%d%H%M%S") + uuid.uuid4().hex[:4])
    profile: str = "cpu"  # frozen_env profile every experiment runs under
    budget_s: float = 0.0  # training budget override for benchmarks (0: the profile's own)
    fingerprint: str = ""  # data + constants fingerprint a worker must match
    strategy: str = "random"  # proposal strategy
    seed: int = 0  # seeds the proposers' random generators
    max_experiments: int = 0  # stop after this many proposals (0: no limit)
    max_wall_s: float = 0.0  # stop after this much wall-clock time (0: no limit)
    max_gpu_hours: float = 0.0  # stop after this much executor time (0: no limit)
    patience: int = 0  # stop after this many recorded experiments without improvement (0: off)
    queue_depth_per_worker: int = 1  # jobs kept waiting per live worker, so none idles
    baseline_repeats: int = 1  # runs of the unmodified script at the start (noise floor)
    noise_sigma: float = DEFAULT_SIGMA  # val_bpb noise unit for rewards until the baseline repeats measure it
    remeasure_every: int = 0  # re-run the incumbent once its score is this many experiments old (0: never)
    # Re-run the incumbent once the machine's speed (each run's `machine_gflops`) has moved this
    # fraction from the speed its score was measured at, and meanwhile compare no edit run at such
    # a speed with that score (`arrl.reward.speed_mismatch`; 0: neither).
    remeasure_on_speed: float = 0.0
    keep_margin_sigmas: float = 0.0  # an edit is kept when it beats the incumbent by this many sigmas
    job_timeout_s: float = 0.0  # rq's backstop timeout; 0: derived from the profile's deadline
    selfeval: bool = False  # whether `arrl run` starts the self-evaluator, which may abort runs
    selfeval_options: dict = field(default_factory=dict)  # overrides of arrl.selfeval.SelfEvalConfig
    warm_executor: bool = True  # workers keep the next trainer process started (frozen_env.warm)
    policy_checkpoint: str = ""  # ppo: start from this policy (an earlier campaign's or pretrained)
    hardware_class: str = ""  # "": the first worker's hardware class binds the campaign; "any": no check
    created_at: float = field(default_factory=time.time)
    baseline_hash: str = ""  # content hash of the unmodified script

    def frozen_profile(self):
        """The frozen_env Profile of every experiment, with the budget override if any."""
        import dataclasses

        from frozen_env.constants import get_profile

        profile = get_profile(self.profile)
        return dataclasses.replace(profile, budget_s=self.budget_s) if self.budget_s else profile

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CampaignConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Campaign:
    """Typed access to one campaign's shared state through its bus."""

    def __init__(self, bus: Bus, config: CampaignConfig) -> None:
        self.bus = bus
        self.config = config
        self._reserve = bus.redis.register_script(_RESERVE)
        self._publish_reserved = bus.redis.register_script(_PUBLISH_RESERVED)
        self._take_reservation = bus.redis.register_script(_TAKE_RESERVATION)
        self._record = bus.redis.register_script(_RECORD)
        self._count_once = bus.redis.register_script(_COUNT_ONCE)
        self._claim_remeasure = bus.redis.register_script(_CLAIM_REMEASURE)
        self._reservation_tokens: dict[str, str] = {}

    @classmethod
    async def load(cls, bus: Bus) -> Campaign:
        data = await bus.get_obj("config")
        if data is None:
            raise LookupError(f"campaign {bus.campaign_id!r} does not exist in this Redis")
        return cls(bus, CampaignConfig.from_dict(data))

    @classmethod
    async def create(cls, bus: Bus, config: CampaignConfig, baseline_source: str, baseline_hash: str) -> Campaign:
        config.baseline_hash = baseline_hash
        await bus.store_source(baseline_hash, baseline_source)
        await bus.put_obj("config", config.to_dict())
        await bus.redis.set(bus.key("state"), RUNNING)
        await bus.redis.zadd(CAMPAIGNS_KEY, {config.campaign_id: config.created_at})
        return cls(bus, config)

    # -- run state ----------------------------------------------------------------------
    async def state(self) -> str:
        value = await self.bus.redis.get(self.bus.key("state"))
        return value.decode() if value else STOPPED

    async def set_state(self, state: str, reason: str = "") -> None:
        await self.bus.redis.set(self.bus.key("state"), state)
        if reason:
            await self.bus.redis.set(self.bus.key("stop_reason"), reason)

    async def stop_reason(self) -> str:
        value = await self.bus.redis.get(self.bus.key("stop_reason"))
        return value.decode() if value else ""

    # -- stage processes that have finished starting up ------------------------------------
    async def mark_ready(self, stage: str) -> None:
        """This process has done its start-up work (imports, the policy's weights) and now serves
        `stage`. `arrl run` starts the proposer only once the other stages are ready, so that no
        start-up shares the machine with the first run's speed probe and training."""
        await self.bus.redis.hset(self.bus.key("ready"), str(os.getpid()), stage)
        log.info("stage.ready")  # the stage is bound to the log context

    async def ready_pids(self) -> set[int]:
        """The processes that marked themselves ready (`mark_ready`), by process id."""
        return {int(pid) for pid in await self.bus.redis.hkeys(self.bus.key("ready"))}

    # -- counters -----------------------------------------------------------------------
    async def reserve_experiment(self) -> str | None:
        """The next experiment id (`e00001`, ...), or None when no more may be proposed.

        The id stays reserved until :meth:`publish_proposal`; see :meth:`take_abandoned`.
        """
        token = _token()
        n = await self._reserve(keys=[self.bus.key("state"), self.bus.key("counters"), self.bus.key("reserved")],
                                args=[self.config.max_experiments, RUNNING, token])
        if int(n) < 0:
            return None
        exp_id = f"e{int(n):05d}"
        self._reservation_tokens[exp_id] = token
        return exp_id

    async def publish_proposal(self, proposal: dict[str, Any]) -> bool:
        """Publish a reserved id's proposal, once; False if another proposer took the id over."""
        from arrl.bus import MESSAGE_FIELD
        from arrl.messages import encode

        exp_id = proposal["experiment_id"]
        token = self._reservation_tokens.pop(exp_id, "")
        data = encode("proposal", {**proposal, "campaign_id": self.bus.campaign_id})
        done = await self._publish_reserved(
            keys=[self.bus.key("reserved"), self.bus.stream_key(PROPOSALS)],
            args=[exp_id, token, data, self.bus.maxlen, MESSAGE_FIELD])
        return bool(int(done))

    async def take_abandoned(self, older_than_s: float) -> list[str]:
        """Reserved ids whose proposal was not published within `older_than_s` (its proposer
        died in between): taken over by the caller, who must now publish them."""
        taken = []
        now = time.time()
        for raw_id, raw_token in (await self.bus.redis.hgetall(self.bus.key("reserved"))).items():
            exp_id, token = raw_id.decode(), raw_token.decode()
            if now - _token_time(token) < older_than_s:
                continue
            mine = _token()
            if int(await self._take_reservation(keys=[self.bus.key("reserved")], args=[exp_id, token, mine])):
                self._reservation_tokens[exp_id] = mine
                taken.append(exp_id)
        return sorted(taken)

    async def proposer_seed(self) -> int:
        """The seed of a proposer process starting now: the campaign's `--seed` for the first, so the
        same seed gives the same opening proposals, and another for each later one (a second
        machine's, or one started again), so that proposers never propose in step."""
        slot = int(await self.bus.redis.incr(self.bus.key("proposer_slots"))) - 1
        return self.config.seed * 1_000_003 + slot

    async def count(self, name: str, by: int = 1) -> int:
        return int(await self.bus.redis.hincrby(self.bus.key("counters"), name, by))

    async def count_once(self, name: str, exp_id: str) -> bool:
        """Increment counter `name` once per experiment id; False when this id was counted before."""
        return bool(int(await self._count_once(keys=[self.bus.key("counted", name), self.bus.key("counters")],
                                               args=[exp_id, name])))

    async def claim_remeasure(self, exp_id: str, incumbent: dict[str, Any],
                              speed_shift: tuple[float, dict[str, Any]] | None = None,
                              unscored: str | None = None) -> str | None:
        """Why experiment `exp_id` should re-run the incumbent ("age", "class" or "speed"), or None;
        claimed once, so that concurrent proposers do not both re-run it.

        Due once the incumbent's latest score (`measured_by`, else the run that made it the
        incumbent) is `remeasure_every` experiments old and no re-run was claimed since then; once
        per latest score while an edit on a hardware class has found no score of the incumbent
        there (`unscored`, from `arrl.scores.unscored_class`); or once the machine's speed has
        moved by `remeasure_on_speed` or more since a score was measured (`speed_shift`: the move
        and that score, from `arrl.scores.speed_shift`), once per score.
        """
        if not incumbent:
            return None
        every, shift = self.config.remeasure_every, self.config.remeasure_on_speed
        measured = experiment_number(measured_by(incumbent))
        if every > 0 and int(await self._claim_remeasure(keys=[self.bus.key("remeasure_claims")],
                                                         args=[incumbent["hash"], experiment_number(exp_id),
                                                               measured, every])):
            return "age"
        if unscored is not None and await self.bus.redis.hsetnx(
                self.bus.key("remeasure_class_claims"), f"{incumbent['hash']}:{measured}:{unscored}", exp_id):
            return "class"
        if shift <= 0 or speed_shift is None or abs(speed_shift[0]) < shift:
            return None
        # Once per score that moved, and again after any other measurement: with several hardware
        # classes the re-run may land on another class than the one whose speed moved.
        moved_from = experiment_number(measured_by(speed_shift[1]))
        claimed = await self.bus.redis.hsetnx(self.bus.key("remeasure_speed_claims"),
                                              f"{incumbent['hash']}:{moved_from}:{measured}", exp_id)
        return "speed" if claimed else None

    async def mark_started(self, exp_id: str) -> bool:
        """Count an experiment as taken by a worker, once: a retried job does not count twice."""
        first = await self.bus.redis.hsetnx(self.bus.key("started_at"), exp_id, repr(time.time()))
        if first:
            await self.count("started")
        return bool(first)

    async def counters(self) -> dict[str, int]:
        raw = await self.bus.redis.hgetall(self.bus.key("counters"))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def add_busy_seconds(self, seconds: float) -> float:
        return float(await self.bus.redis.hincrbyfloat(self.bus.key("usage"), "executor_s", seconds))

    async def busy_seconds(self) -> float:
        value = await self.bus.redis.hget(self.bus.key("usage"), "executor_s")
        return float(value or 0.0)

    # -- the ledger: one record per experiment, the commit point of the reward computer ----
    async def record(self, exp_id: str, record: dict[str, Any], counters: tuple[str, ...] = (),
                     baseline_bpb: float | None = None, since_improvement: str = "", baseline_class: str = "") -> bool:
        """Store an experiment's record once, with the counters it moves; False when it was already recorded.

        `counters` are incremented, `baseline_bpb` is appended to the baseline repeats (as
        "VALUE|CLASS" with the `baseline_class` it was measured on, if any: `baseline_bpbs`), and
        `since_improvement` is "reset", "incr" or "", all in the same atomic step as the record.
        """
        entry = "" if baseline_bpb is None else repr(float(baseline_bpb)) + (f"|{baseline_class}" if baseline_class else "")
        added = await self._record(
            keys=[self.bus.key("ledger"), self.bus.key("counters"), self.bus.key("baseline_bpbs")],
            args=[exp_id, msgpack.packb(record, use_bin_type=True), entry, since_improvement, *counters])
        return bool(int(added))

    async def get_record(self, exp_id: str) -> dict[str, Any] | None:
        data = await self.bus.redis.hget(self.bus.key("ledger"), exp_id)
        return None if data is None else msgpack.unpackb(data, raw=False)

    async def records(self) -> dict[str, dict[str, Any]]:
        raw = await self.bus.redis.hgetall(self.bus.key("ledger"))
        return {k.decode(): msgpack.unpackb(v, raw=False) for k, v in sorted(raw.items())}

    async def recent_records(self, n: int = 32) -> list[dict[str, Any]]:
        """The last `n` recorded experiments in campaign order."""
        ids = sorted(k.decode() for k in await self.bus.redis.hkeys(self.bus.key("ledger")))[-n:]
        if not ids:
            return []
        values = await self.bus.redis.hmget(self.bus.key("ledger"), ids)
        return [msgpack.unpackb(v, raw=False) for v in values if v is not None]

    async def speed_shift(self, probe: object, incumbent: dict[str, Any] | None, cls: str) -> float | None:
        """How far a run whose probe read `probe` (`machine_gflops`) ran from the speed at which the
        incumbent's score on hardware class `cls` was measured, when that is `remeasure_on_speed` or
        more (`arrl.reward.speed_mismatch`): the keep rule compares no such run with that score, and
        the self-evaluator stops it. None otherwise, while that rule is off, or while the score's
        speed is unknown (`score_speed` with `top_up`: a median of three probes, so one odd probe of
        the score's run refuses nothing, and nothing until three are known)."""
        score = class_score(incumbent, cls) if incumbent else None
        if incumbent is None or score is None or self.config.remeasure_on_speed <= 0:
            return None
        speed = score_speed(of_class(await self.recent_records(32), incumbent, cls), score, top_up=True)
        return speed_mismatch(probe, speed, self.config.remeasure_on_speed)

    # -- scores of scripts by content hash ------------------------------------------------
    async def baseline_bpbs(self) -> dict[str, list[float]]:
        """The baseline repeats' val_bpb by the hardware class they ran on ("" where none was recorded)."""
        by_class: dict[str, list[float]] = {}
        for raw in await self.bus.redis.lrange(self.bus.key("baseline_bpbs"), 0, -1):
            value, _, cls = raw.decode().partition("|")
            by_class.setdefault(cls, []).append(float(value))
        return by_class

    async def set_score(self, content_hash: str, val_bpb: float) -> None:
        await self.bus.redis.hset(self.bus.key("scores"), content_hash, repr(float(val_bpb)))

    async def score(self, content_hash: str) -> float | None:
        value = await self.bus.redis.hget(self.bus.key("scores"), content_hash)
        return None if value is None else float(value)

    # -- experiments known to be queued or running, for the sweeper and status -----------
    async def track(self, exp_id: str, job: dict[str, Any]) -> None:
        await self.bus.redis.hset(self.bus.key("inflight"), exp_id, msgpack.packb(job, use_bin_type=True))

    async def untrack(self, exp_id: str) -> None:
        await self.bus.redis.hdel(self.bus.key("inflight"), exp_id)

    async def inflight(self) -> dict[str, dict[str, Any]]:
        raw = await self.bus.redis.hgetall(self.bus.key("inflight"))
        return {k.decode(): msgpack.unpackb(v, raw=False) for k, v in raw.items()}


    # -- the hardware class every result of the campaign is measured on -------------------
    async def bind_hardware(self, hardware_class: str) -> str:
        """The campaign's hardware class: the configured one, else the first worker's (set here, once)."""
        if self.config.hardware_class:
            return self.config.hardware_class
        earlier = await self.bus.redis.set(self.bus.key("hardware_class"), hardware_class, nx=True, get=True)
        return hardware_class if earlier is None else earlier.decode()


def _token() -> str:
    return f"{time.time():.6f}|{uuid.uuid4().hex[:12]}"


def _token_time(token: str) -> float:
    try:
        return float(token.split("|", 1)[0])
    except ValueError:
        return 0.0


async def latest_campaign_id(redis) -> str | None:
    newest = await redis.zrevrange(CAMPAIGNS_KEY, 0, 0)
    return newest[0].decode() if newest else None
