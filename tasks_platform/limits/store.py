"""The Redis side of tenant limits: rate buckets, concurrency leases and the deferred jobs.

Every decision is one Lua script, atomic across all producers and workers, on Redis' clock
(so that the hosts' clocks never disagree about a slot):

* ``pace``: the intake bucket (GCRA without burst): reserves the tenant's next start slot;
  if it is in the future, stores the job in the deferred set under that slot;
* ``admit``: a worker's decision before it runs a job: the concurrency lease (a sorted set per
  tenant and job type, member = job id, score = lease expiry; expired leases are dropped,
  taking it again with the same id is a no-op, a full set refuses) and the execution bucket
  (GCRA with ``TOLERANCE`` of burst). A job that comes back holding the execution slot it
  was deferred to (``SLOT_HEADER``) spends no second one;
* ``take_due``: the mover's claim on up to ``count`` due deferred jobs: each one's score is
  pushed ``MOVE_LEASE`` seconds ahead rather than removed, so that a mover dying before it
  published them leaves them to another.

Keys start with the platform's queue prefix: ``<prefix>tasks.limits.{pace,run,leases}/<tenant>/
<job>`` and ``<prefix>tasks.limits.deferred``. Buckets and lease sets expire on their own.
"""

from __future__ import annotations

import random
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from kombu.utils.json import dumps, loads

from tasks_platform.errors import ConfigurationError, LimitsUnavailable
from tasks_platform.settings import Settings, TenantLimit

#: header of a job that went through intake pacing (or the mover): it is not paced again
PACED_HEADER = "x-tasks-paced"
#: header of a job deferred to an execution slot: ``"<retries>:<unix time>"``
SLOT_HEADER = "x-tasks-slot"
#: seconds an execution start may be early or late against its slot (publishing jitter)
TOLERANCE = 0.25
#: seconds a concurrency lease outlives the job's hard time limit (then it frees itself)
LEASE_MARGIN = 60.0
#: seconds a mover's claim on a deferred job lasts before another mover may publish it
MOVE_LEASE = 30.0
#: seconds to wait for Redis before giving up (the job is then kept, not run unlimited)
SOCKET_TIMEOUT = 2.0

_CLOCK = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
local function bucket(key, interval)
  local slot = math.max(tonumber(redis.call('GET', key) or '0'), now)
  local after = slot + interval
  redis.call('SET', key, fmt(after), 'PX', math.ceil((after - now) * 1000) + 1000)
  return slot
end
"""

# KEYS: intake bucket, deferred set; ARGV: seconds between starts, the job (JSON)
_PACE = (
    _CLOCK
    + """
local slot = bucket(KEYS[1], tonumber(ARGV[1]))
if slot - now > 0.001 then
  redis.call('ZADD', KEYS[2], fmt(slot), ARGV[2])
end
return {fmt(now), fmt(slot)}
"""
)

# KEYS: execution bucket, lease set; ARGV: job id, seconds between starts (0: no rate),
# tolerance, concurrency (0: none), lease seconds, the slot the job holds (0: none)
_ADMIT = (
    _CLOCK
    + """
local id, interval, tolerance = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local concurrency, lease, held = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
  if not redis.call('ZSCORE', KEYS[2], id) and redis.call('ZCARD', KEYS[2]) >= concurrency then
    return {'concurrency', fmt(now), fmt(now)}
  end
end
if interval > 0 and not (held > 0 and math.abs(now - held) <= tolerance) then
  local slot = bucket(KEYS[1], interval)
  if slot - tolerance > now then
    return {'rate', fmt(now), fmt(slot)}
  end
end
if concurrency > 0 then
  redis.call('ZADD', KEYS[2], fmt(now + lease), id)
  local keep = math.ceil(lease * 1000) + 1000
  if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
end
return {'ok', fmt(now), fmt(now)}
"""
)

# KEYS: deferred set; ARGV: how many, seconds of the claim
_TAKE_DUE = (
    _CLOCK
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now), 'LIMIT', 0, tonumber(ARGV[1]))
for _, job in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', fmt(now + tonumber(ARGV[2])), job)
end
return due
"""
)


@dataclass(frozen=True)
class Decision:
    """A worker's answer for one job: run it, or defer it (``reason``) until ``until``."""

    reason: str | None  #: None = run it; "rate" or "concurrency"
    now: float  #: Redis' clock when it was decided
    until: float  #: the execution slot it was given (rate) or ``now`` (concurrency)

    @property
    def admitted(self) -> bool:
        return self.reason is None


def interval(limit: TenantLimit) -> float:
    """Seconds between two starts under ``limit``'s rate (0 when it has none)."""
    return limit.per / limit.rate if limit.rate else 0.0


def slot_header(retries: int, slot: float) -> str:
    """The ``SLOT_HEADER`` value of a job (at ``retries``) deferred to the slot ``slot``."""
    return f"{retries}:{slot:.6f}"


def held_slot(value: object, retries: int) -> float:
    """The slot a job holds (0.0 for none): only for the attempt it was given to."""
    if not isinstance(value, str) or ":" not in value:
        return 0.0
    given, _, slot = value.partition(":")
    try:
        return float(slot) if int(given) == retries else 0.0
    except ValueError:
        return 0.0


def retry_delay(base: float) -> float:
    """When a job over a concurrency limit tries again: ``base`` plus up to half of it, so that
    jobs deferred together do not all come back at the same moment."""
    return base * (1.0 + random.random() / 2)


def entry(signature: dict[str, Any]) -> str:
    """A deferred set member for a job (its Celery signature as a dict).

    Every deferral is a member of its own: a job deferred again while the mover that just
    published it has not yet dropped it must not be dropped with it.
    """
    return str(dumps({"deferral": uuid.uuid4().hex, "job": signature}))


def job_of(member: str) -> dict[str, Any]:
    """The Celery signature (a dict) in a deferred set member."""
    return dict(loads(member)["job"])


def moment(unix: float) -> str:
    """``unix`` as an ISO 8601 UTC timestamp (history details)."""
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")


class TenantLimits:
    """The limits of one platform (its settings) in its Redis; thread-safe, fork-safe."""

    def __init__(self, settings: Settings) -> None:
        url = settings.effective_limits_url
        if url is None:
            raise ConfigurationError("tenant limits need Redis: set TASKS_LIMITS_URL")
        self.settings = settings
        self.url = url
        self.client: Any = redis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
        )
        self._pace = self.client.register_script(_PACE)
        self._admit = self.client.register_script(_ADMIT)
        self._take_due = self.client.register_script(_TAKE_DUE)
        self.deferred_key = f"{settings.queue_prefix}tasks.limits.deferred"

    def key(self, kind: str, tenant: str | None, job: str) -> str:
        """The key of ``kind`` (pace, run, leases) for a tenant (None: no tenant) and job type."""
        return f"{self.settings.queue_prefix}tasks.limits.{kind}/{tenant or ''}/{job}"

    # -- intake ------------------------------------------------------------------------------
    def pace(self, tenant: str | None, job: str, limit: TenantLimit, member: str) -> float | None:
        """Reserve the next start slot; None if it is now, else its time (``member`` is then
        stored in the deferred set until then)."""
        keys = [self.key("pace", tenant, job), self.deferred_key]
        now, slot = self._call(self._pace, keys, [repr(interval(limit)), member], "pace a job")
        return slot if slot - now > 0.001 else None

    # -- admission ---------------------------------------------------------------------------
    def admit(
        self,
        tenant: str | None,
        job: str,
        limit: TenantLimit,
        *,
        job_id: str,
        lease_seconds: float,
        held: float = 0.0,
    ) -> Decision:
        """Whether job ``job_id`` may start now (taking its lease and execution slot)."""
        keys = [self.key("run", tenant, job), self.key("leases", tenant, job)]
        args = [job_id, repr(interval(limit)), repr(TOLERANCE), limit.concurrency or 0,
                repr(lease_seconds), repr(held)]  # fmt: skip
        reply = self._raw(self._admit, keys, args, "admit a job")
        verdict, now, until = (part.decode() if isinstance(part, bytes) else part for part in reply)
        return Decision(None if verdict == "ok" else str(verdict), float(now), float(until))

    def release(self, tenant: str | None, job: str, job_id: str) -> None:
        """Give back job ``job_id``'s concurrency lease."""
        try:
            self.client.zrem(self.key("leases", tenant, job), job_id)
        except redis.RedisError as exc:
            raise self._unavailable("release a lease", exc) from exc

    # -- the deferred set --------------------------------------------------------------------
    def defer(self, member: str, until: float) -> None:
        """Store ``member`` (a job) to be published at ``until`` (unix time)."""
        try:
            self.client.zadd(self.deferred_key, {member: until})
        except redis.RedisError as exc:
            raise self._unavailable("defer a job", exc) from exc

    def take_due(self, count: int) -> list[str]:
        """Claim up to ``count`` deferred jobs whose time has come (for ``MOVE_LEASE`` s)."""
        reply = self._raw(self._take_due, [self.deferred_key], [count, repr(MOVE_LEASE)],
                          "take due jobs")  # fmt: skip
        return [m.decode() if isinstance(m, bytes) else str(m) for m in reply]

    def forget(self, members: list[str]) -> None:
        """Drop published jobs from the deferred set."""
        if members:
            try:
                self.client.zrem(self.deferred_key, *members)
            except redis.RedisError as exc:
                raise self._unavailable("forget published jobs", exc) from exc

    def put_back(self, members: list[str], delay: float) -> None:
        """Make claimed but unpublished jobs due again in ``delay`` seconds."""
        if members:
            try:
                now = float(self.client.time()[0])
                self.client.zadd(self.deferred_key, dict.fromkeys(members, now + delay), xx=True)
            except redis.RedisError as exc:
                raise self._unavailable("put jobs back", exc) from exc

    def deferred(self) -> int:
        """How many jobs wait in the deferred set."""
        try:
            return int(self.client.zcard(self.deferred_key))
        except redis.RedisError as exc:
            raise self._unavailable("count deferred jobs", exc) from exc

    def close(self) -> None:
        self.client.close()

    # -- helpers -----------------------------------------------------------------------------
    def _call(self, script: Any, keys: list[str], args: list[Any], what: str) -> tuple[float, ...]:
        return tuple(float(part) for part in self._raw(script, keys, args, what))

    def _raw(self, script: Any, keys: list[str], args: list[Any], what: str) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise self._unavailable(what, exc) from exc

    def _unavailable(self, what: str, exc: Exception) -> LimitsUnavailable:
        where = self.url.rsplit("@", 1)[-1]  # no password in messages
        return LimitsUnavailable(
            f"cannot {what}: the Redis keeping tenant limits ({where}) did not answer "
            f"({exc.__class__.__name__}: {exc})"
        )


_by_settings: dict[int, tuple[Settings, TenantLimits]] = {}
_lock = threading.Lock()


def limits_for(settings: Settings) -> TenantLimits:
    """The :class:`TenantLimits` of ``settings`` (one per settings object and process)."""
    known = _by_settings.get(id(settings))
    if known is not None and known[0] is settings:
        return known[1]
    with _lock:
        known = _by_settings.get(id(settings))
        if known is None or known[0] is not settings:
            known = _by_settings[id(settings)] = (settings, TenantLimits(settings))
        return known[1]
