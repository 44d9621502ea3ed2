"""The Redis coordination protocol, without I/O: scripts, keys and every decision.

Nothing here touches a socket, a thread or an event loop.  The drivers
(``_sync.py``, ``_async.py``) send what a :class:`Plan` asks for, hand the
replies back, and do what it says next; the same plan serves both.  Time is
always passed in (``time.monotonic()`` seconds), so every rule here can be
tested with made-up clocks.

Keys of one flight share a hash tag, so they live in one Redis Cluster slot
and one script may touch them all::

    sf:{<ns>:<key>}:res           the result, PX result_ttl (late joiners)
    sf:{<ns>:<key>}:lease         the leader's token, PX lease (liveness)
    sf:{<ns>:<key>}:fence         hash {tok, ep, w, det}: who may complete
    sf:{<ns>:<key>}:done:<token>  stream with one completion record

``<ns>`` is the namespace with ``%`` and ``:`` percent-escaped, so the first
``:`` after ``{`` always ends it: no two (namespace, key) pairs share a key
(``users`` + ``admin:42`` is not ``users:admin`` + ``42``).  The first ``}``
of a key ends the hash tag, so even a user key containing ``}`` gives every
key of its flight the same tag.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._options import check_count, check_duration

PREFIX = "sf"


class Script:
    """A Lua script and its SHA1, for EVALSHA with an EVAL fallback after NOSCRIPT."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# ACQUIRE(res, lease, fence; token, lease_ms, fence_ttl_ms, use_hit)
#   {0, payload}       hit: a result is stored
#   {1, epoch}         lead: the lease is ours; epoch is this key's fencing epoch
#   {2, holder, pttl}  wait for holder's completion, at most pttl ms
# The epoch is the stored one plus one, or the server's clock (TIME, in
# microseconds) when that is larger: it grows with every leader while the
# fence record lives, and still grows after the record is lost (FLUSHALL, a
# restart without persistence, eviction) unless the server's clock went back.
# A retried ACQUIRE whose first reply was lost finds its own token in the lease
# and leads, rather than waiting on itself for a whole lease.  A waiter counts
# itself in fence.w, which each leader starts at 1: so HINCRBY answering 1
# means the fence was missing (a foreign lease), and only then does it need
# the extra PEXPIRE that keeps every key expiring.
_ACQUIRE = """
if ARGV[4] == '1' then
  local v = redis.call('GET', KEYS[1])
  if v then return {0, v} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local ep = redis.call('HINCRBY', KEYS[3], 'ep', 1)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if now > ep then
    ep = now
    redis.call('HSET', KEYS[3], 'tok', ARGV[1], 'w', 1, 'ep', string.format('%.0f', ep))
  else
    redis.call('HSET', KEYS[3], 'tok', ARGV[1], 'w', 1)
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  return {1, ep}
end
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
  return {1, tonumber(redis.call('HGET', KEYS[3], 'ep') or 0)}
end
if redis.call('HINCRBY', KEYS[3], 'w', 1) == 1 then
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return {2, holder, redis.call('PTTL', KEYS[2])}
"""

# RENEW(lease, fence; token, lease_ms, fence_ttl_ms, expected_ms, tolerance_ms)
#   1 renewed; 2 resurrected (the lease had lapsed and nobody took it);
#   0 lost (another leader, or the flight was forgotten or completed);
#   3 late: refused, nothing written
# expected_ms is how long the watchdog, when it sent the RENEW, knew the lease
# had left at least.  A RENEW the server runs later than that by more than
# tolerance_ms (it waited behind a stall: a stopped or paused server, a slow
# network) finds less left, or the lease lapsed although the watchdog thought
# it live: it may come from a leader that has finished since (its completion
# stuck behind the same stall), so it extends nothing and takes nothing back.
# The watchdog's next RENEW, sent after the stall, does if the loader still runs.
_RENEW = """
local cur = redis.call('GET', KEYS[1])
local late = tonumber(ARGV[4]) - tonumber(ARGV[5])
if cur == ARGV[1] then
  if late > 0 and redis.call('PTTL', KEYS[1]) < late then return 3 end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 1
end
if not cur and redis.call('HGET', KEYS[2], 'tok') == ARGV[1] then
  if late > 0 then return 3 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 2
end
return 0
"""

# COMPLETE(fence, res, lease, done; token, status, payload, result_ttl_ms, done_ttl_ms)
#   {1, w}  completed: stored (status o) and announced; w > 0 if anyone waited
#   {2, 0}  the flight had been forgotten: neither stored nor announced (FORGET
#           told its waiters already)
#   {0, 0}  fenced: another leader owns the key now; nothing written
#   {3, 0}  already completed (a retried COMPLETE whose first reply was lost)
# The token check is the fence: Redis holds the result, so a leader that lost
# its lease can never overwrite a newer one.  Status a (abandon) stores nothing.
# While the fence names our token the lease is ours or gone (only ACQUIRE sets
# another, and it renames the fence in the same script), so DEL needs no check.
# A forgotten flight's lease may be somebody else's by now: left alone.
_COMPLETE = """
local f = redis.call('HMGET', KEYS[1], 'tok', 'det', 'w')
if f[1] == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'tok', 'w')
  redis.call('DEL', KEYS[3])
  if ARGV[2] == 'o' and tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  end
elseif f[2] == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'det')
  return {2, 0}
elseif redis.call('EXISTS', KEYS[4]) == 1 then
  return {3, 0}
else
  return {0, 0}
end
redis.call('XADD', KEYS[4], '*', 's', ARGV[2], 'v', ARGV[3])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return {1, math.max(0, tonumber(f[3] or 1) - 1)}
"""

# FORGET(res, lease, fence; only_unshared, done_ttl_ms)
#   Drops the stored result and detaches the running flight: new callers lead
#   a new one.  Its waiters in other processes find a "forgotten" record (f)
#   on its completion stream, first, and ask again: the old flight's outcome
#   reaches none of them (nor its leader's process, which runs again when its
#   completion finds the flight detached).  Returns 0 (and does nothing) when
#   only_unshared is 1 and somebody waited.  The stream's name is made from the
#   fence's (same hash tag, same slot): the token is only known here.
_FORGET = """
local f = redis.call('HMGET', KEYS[3], 'tok', 'w')
if ARGV[1] == '1' and f[2] and tonumber(f[2]) > 1 then return 0 end
redis.call('DEL', KEYS[1])
if f[1] then
  redis.call('HDEL', KEYS[3], 'tok', 'w')
  redis.call('HSET', KEYS[3], 'det', f[1])
  if redis.call('GET', KEYS[2]) == f[1] then redis.call('DEL', KEYS[2]) end
  local done = string.sub(KEYS[3], 1, -7) .. ':done:' .. f[1]
  redis.call('XADD', done, '*', 's', 'f', 'v', '')
  redis.call('PEXPIRE', done, ARGV[2])
end
return 1
"""

# FLEET_ACQUIRE(res, lease, fence; token, lease_ms, fence_ttl_ms, use_hit, min_fresh_ms,
#               stale_ok): ACQUIRE for a fleet cache, whose stored result is an entry
#   (see entry_header): {0, entry, pttl} when the entry is fresh for more than
#   min_fresh_ms, or (stale_ok = 1) still in its stale window; else lead or wait
#   as ACQUIRE.  Freshness is the entry's PTTL minus its tail (the windows after
#   expiry): the server's clock alone, so the clients' clocks never matter.
_FLEET_ACQUIRE = """
if ARGV[4] == '1' then
  local v = redis.call('GET', KEYS[1])
  if v then
    local pttl = redis.call('PTTL', KEYS[1])
    local tail, stale = string.match(v, '^(%d+),(%d+),')
    if tail then
      local fresh = pttl - tonumber(tail)
      if fresh > tonumber(ARGV[5]) or (ARGV[6] == '1' and fresh + tonumber(stale) > 0) then
        return {0, v, pttl}
      end
    end
  end
end
""" + _ACQUIRE.split("end\n", 2)[2]

ACQUIRE_SCRIPT = Script("acquire", _ACQUIRE)
FLEET_ACQUIRE_SCRIPT = Script("fleet acquire", _FLEET_ACQUIRE)
RENEW_SCRIPT = Script("renew", _RENEW)
COMPLETE_SCRIPT = Script("complete", _COMPLETE)
FORGET_SCRIPT = Script("forget", _FORGET)

# Completion statuses, as written in the done stream's ``s`` field.
OK = "o"
ERROR = "e"
ABANDONED = "a"
FORGOTTEN = "f"  # written by FORGET, never by a leader


def new_token() -> str:
    """A fresh 128-bit leader token: one per ACQUIRE, never shared between flights."""
    return secrets.token_hex(16)


class Keys:
    """The Redis keys of one flight."""

    __slots__ = ("base", "fence", "lease", "res")

    def __init__(self, namespace: str, key: str) -> None:
        self.base = base = f"{PREFIX}:{{{escape_namespace(namespace)}:{key}}}"
        self.res = base + ":res"
        self.lease = base + ":lease"
        self.fence = base + ":fence"

    def done(self, token: str) -> str:
        return f"{self.base}:done:{token}"

    def forget_keys(self) -> list[str]:
        return [self.res, self.lease, self.fence]


def escape_namespace(namespace: str) -> str:
    """``namespace`` with ``%`` and ``:`` percent-escaped: it then holds no ``:``."""
    if "%" in namespace or ":" in namespace:
        return namespace.replace("%", "%25").replace(":", "%3A")
    return namespace


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not namespace:
        raise TypeError(f"namespace must be a non-empty str; got {namespace!r}")
    bad = [c for c in namespace if c in "{}" or not c.isprintable() or c.isspace()]
    if bad:
        raise ValueError(
            f"namespace {namespace!r} must not contain braces, spaces or control characters "
            f"(found {''.join(sorted(set(bad)))!r}): braces would break the cluster hash tag"
        )
    return namespace


# -- settings ----------------------------------------------------------------------


def _ms(seconds: float) -> int:
    """Whole milliseconds for PX, never 0 for a positive duration (PX 0 is an error)."""
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


class Settings:
    """A group's validated options, in the units the scripts and plans use."""

    __slots__ = (
        "backoff_base",
        "backoff_cap",
        "breaker_cooldown",
        "breaker_threshold",
        "done_ttl_ms",
        "fence_ttl_ms",
        "lease",
        "lease_ms",
        "max_payload",
        "max_wait",
        "policy",
        "redis_timeout",
        "renew_interval",
        "result_ttl",
        "result_ttl_ms",
        "retry_budget",
        "slack_ms",
    )

    def __init__(
        self,
        *,
        lease: float = 3.0,
        result_ttl: float = 5.0,
        max_wait: float = 30.0,
        on_redis_error: str = "open",
        redis_timeout: float = 0.5,
        retry_budget: float = 0.5,
        max_payload: int = 1 << 20,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 2.0,
        fence_ttl: float = 600.0,
        slack: float = 0.02,
    ) -> None:
        self.lease = check_duration("lease", lease)
        if self.lease < 0.01:
            raise ValueError(f"lease must be at least 0.01 seconds; got {lease!r}")
        self.result_ttl = check_duration("result_ttl", result_ttl, zero=True)
        self.max_wait = check_duration("max_wait", max_wait)
        if on_redis_error not in ("open", "closed"):
            raise ValueError(
                f'on_redis_error must be "open" (run the loader locally) or "closed" '
                f"(raise RedisUnavailableError); got {on_redis_error!r}"
            )
        self.policy = on_redis_error
        self.redis_timeout = check_duration("redis_timeout", redis_timeout)
        self.retry_budget = check_duration("retry_budget", retry_budget, zero=True)
        self.max_payload = check_count("max_payload", max_payload, "a positive number of bytes")
        self.breaker_threshold = check_count("breaker_threshold", breaker_threshold, "an int >= 1")
        self.breaker_cooldown = check_duration("breaker_cooldown", breaker_cooldown, zero=True)
        fence_ttl = check_duration("fence_ttl", fence_ttl)
        if fence_ttl < self.lease:
            raise ValueError(f"fence_ttl ({fence_ttl}) must be at least the lease ({self.lease})")
        self.lease_ms = _ms(self.lease)
        self.result_ttl_ms = _ms(self.result_ttl)
        self.fence_ttl_ms = _ms(fence_ttl)
        self.slack_ms = _ms(check_duration("slack", slack, zero=True))
        # A completion record only has to outlive the gap between a waiter's
        # ACQUIRE and its XREAD; a waiter that still misses it waits out one
        # lease slice and asks again.
        self.done_ttl_ms = self.lease_ms + self.slack_ms + 1000
        self.renew_interval = self.lease / 3
        self.backoff_base = 0.01
        self.backoff_cap = 0.1

    def leased_until(self, replied: float) -> float:
        """The earliest the lease set (or renewed) by a command answered at ``replied``
        can end: the command was sent at most ``redis_timeout`` before its reply."""
        return replied + self.lease - self.redis_timeout

    def operation_deadline(self, now: float) -> float:
        """When a flight's own operation (COMPLETE, FORGET) stops retrying: one
        attempt's timeout, then the retry budget, so a first attempt that timed
        out (a pause) is always retried at least once."""
        return now + self.redis_timeout + self.retry_budget

    @property
    def blocking_timeout(self) -> float:
        """Socket timeout for XREAD BLOCK: the longest slice plus one command's time."""
        return (self.lease_ms + self.slack_ms) / 1000 + self.redis_timeout


# -- retries and the circuit breaker ----------------------------------------------------


class RetryBudget:
    """Backoff between retries of one operation, within a time budget and a deadline.

    The budget starts at the first failure and is reset by a success: a flight
    rides out a short Redis restart but never waits past its deadline for one.
    """

    __slots__ = ("_backoff", "_settings", "_until")

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._until: float | None = None
        self._backoff = settings.backoff_base

    def delay(self, now: float, deadline: float) -> float | None:
        """Seconds to sleep before the next attempt, or None when the budget is spent."""
        if self._until is None:
            self._until = min(now + self._settings.retry_budget, deadline)
        delay = self._backoff
        if now + delay > self._until:
            return None
        self._backoff = min(delay * 2, self._settings.backoff_cap)
        return delay

    def reset(self) -> None:
        self._until = None
        self._backoff = self._settings.backoff_base


CLOSED_STATE, OPEN_STATE, HALF_OPEN_STATE = "closed", "open", "half-open"


class Breaker:
    """A circuit breaker over Redis operations, shared by all flights of a group.

    ``threshold`` failed operations in a row open it: calls then skip Redis
    (and apply the error policy at once) for ``cooldown`` seconds.  Then one
    call is let through as a probe; its success closes the breaker, its failure
    opens it for another cooldown.  A probe that never reports (its caller was
    interrupted) is replaced after another cooldown.  Thread-safe.
    """

    __slots__ = (
        "_cooldown",
        "_failures",
        "_lock",
        "_opened_at",
        "_probe_at",
        "_threshold",
        "opens",
    )

    def __init__(self, threshold: int, cooldown: float) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_at: float | None = None
        self._lock = threading.Lock()
        self.opens = 0

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED_STATE
        return HALF_OPEN_STATE if self._probe_at is not None else OPEN_STATE

    def allow(self, now: float) -> bool:
        """Whether a new flight may use Redis now (claims the probe when half-open)."""
        if self._opened_at is None:  # the common case, without the lock
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            since = self._opened_at if self._probe_at is None else self._probe_at
            if now < since + self._cooldown:
                return False
            self._probe_at = now
            return True

    def is_open(self) -> bool:
        return self._opened_at is not None and self._probe_at is None

    def success(self) -> None:
        if self._failures or self._opened_at is not None:
            with self._lock:
                self._failures = 0
                self._opened_at = None
                self._probe_at = None

    def failure(self, now: float) -> bool:
        """Count a failed operation; true if this failure opened the breaker."""
        with self._lock:
            self._failures += 1
            probing = self._probe_at is not None
            if probing or (self._opened_at is None and self._failures >= self._threshold):
                opened = self._opened_at is None
                self._opened_at = now
                self._probe_at = None
                if opened:
                    self.opens += 1
                return opened
            return False


# -- the caller's state machine ----------------------------------------------------------

# What a plan asks its driver to do next (Plan.op).
ACQUIRE = 1  # run ACQUIRE_SCRIPT with acquire_keys() / acquire_args()
READ = 2  # XREAD BLOCK block_ms STREAMS stream 0-0: read_command()
SLEEP = 3  # sleep delay seconds, then call resume()
HIT = 4  # decode payload and return it (on a decode error: call bad_payload())
REMOTE_ERROR = 5  # decode payload as an error record and raise it
LEAD = 6  # run the loader as leader with token and epoch
LOCAL = 7  # run the loader locally, without Redis (policy "open")
FAIL = 8  # raise error (policy "closed")

# Why a plan went LOCAL or FAIL (Plan.reason).
REASON_UNAVAILABLE = "unavailable"
REASON_CIRCUIT_OPEN = "circuit open"
REASON_TIMEOUT = "timeout"


class Plan:
    """What one process does, as the local leader of a key, to get its value through Redis.

    ``deadline = now + max_wait``.  ACQUIRE answers hit, lead, or wait on
    holder T; a wait is one XREAD BLOCK on T's completion stream, bounded by
    the lease's remaining time, after which the plan asks again (and takes
    over if T died).  Redis errors are retried within the retry budget, then
    the error policy applies, as it does at the deadline.
    """

    __slots__ = (
        "_after_sleep",
        "_breaker",
        "_retry",
        "_skip",
        "bad_status",
        "block_ms",
        "deadline",
        "delay",
        "epoch",
        "error",
        "first_bad",
        "fleet",
        "keys",
        "leased_until",
        "op",
        "payload",
        "pttl",
        "reason",
        "record_id",
        "result_ms",
        "sent",
        "settings",
        "stream",
        "token",
        "use_hit",
        "waited",
    )

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        breaker: Breaker,
        now: float,
        deadline: float | None = None,
        fleet: FleetCall | None = None,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.pttl = 0
        self.sent = now  # when the last ACQUIRE was sent (monotonic): a fleet entry's age
        self.result_ms = settings.result_ttl_ms
        self.keys = keys
        self._breaker = breaker
        self._retry = RetryBudget(settings)
        self.deadline = now + settings.max_wait if deadline is None else deadline
        self.token = new_token()
        self.use_hit = True
        self.waited = False  # true once it waited on another leader (a lead then is a takeover)
        self.epoch = 0
        self.leased_until = 0.0
        self.payload = b""
        self.stream = ""
        self.block_ms = 0
        self.delay = 0.0
        self.error: BaseException | None = None
        self.reason = ""
        # The entry of a completion stream the payload came from (None: from the
        # stored result), and a status no leader writes, if the record had one.
        self.record_id: bytes | None = None
        self.bad_status: bytes | None = None
        self.first_bad = False
        # Per completion stream, the last entry read that did not end the wait
        # (undecodable, of an unknown status, or "abandoned" / "forgotten" while
        # its holder still held the lease): later reads start after it.
        self._skip: dict[str, bytes] = {}
        self._after_sleep = ACQUIRE
        if breaker.allow(now):
            self.op = ACQUIRE
        else:
            self.op = self._unusable(REASON_CIRCUIT_OPEN, None)

    # -- requests --

    def acquire_keys(self) -> list[str]:
        keys = self.keys
        return [keys.res, keys.lease, keys.fence]

    def acquire_script(self) -> Script:
        return ACQUIRE_SCRIPT if self.fleet is None else FLEET_ACQUIRE_SCRIPT

    def acquire_args(self) -> list[str | int]:
        s = self.settings
        args: list[str | int] = [
            self.token,
            s.lease_ms,
            s.fence_ttl_ms,
            "1" if self.use_hit else "0",
        ]
        fleet = self.fleet
        if fleet is not None:
            args += [fleet.min_fresh_ms, "1" if fleet.stale_ok else "0"]
        return args

    def read_command(self) -> list[str | int | bytes]:
        """READ's command: wait up to block_ms for the first entry of the holder's stream
        (after the last one that did not end the wait, if any)."""
        after = self._skip.get(self.stream, b"0-0")
        return ["XREAD", "COUNT", 1, "BLOCK", self.block_ms, "STREAMS", self.stream, after]

    def read_timeout(self) -> float:
        """How long READ may take in all: its block plus one command's time.  The block
        never outlasts the deadline, so neither does the read, by more than redis_timeout."""
        return self.block_ms / 1000 + self.settings.redis_timeout

    def complete_keys(self) -> list[str]:
        keys = self.keys
        return [keys.fence, keys.res, keys.lease, keys.done(self.token)]

    def complete_args(self, status: str, payload: bytes) -> list[str | int | bytes]:
        s = self.settings
        return [self.token, status, payload, self.result_ms, s.done_ttl_ms]

    # -- replies --

    def acquired(self, reply: Any, now: float) -> int:
        """Take ACQUIRE's reply; returns (and sets) the next op."""
        self._succeeded()
        self.record_id = self.bad_status = None
        kind = int(reply[0])
        if kind == 0:
            self.payload = reply[1]
            self.pttl = int(reply[2]) if len(reply) > 2 and reply[2] is not None else 0
            self.op = HIT
        elif kind == 1:
            self.epoch = int(reply[1]) if len(reply) > 1 and reply[1] is not None else 0
            self.leased_until = self.settings.leased_until(now)
            self.op = LEAD
        else:
            holder = reply[1] if len(reply) > 1 else None
            pttl = int(reply[2]) if len(reply) > 2 and reply[2] is not None else -2
            if holder is None or pttl == -2:  # the lease ended between SET NX and GET
                return self._again(now)
            s = self.settings
            if pttl < 0:  # a lease without expiry was not set by us; wait one lease
                pttl = s.lease_ms
            remaining = int((self.deadline - now) * 1000)
            if remaining <= 0:
                return self._give_up()
            if isinstance(holder, bytes):
                holder = holder.decode("ascii", "replace")
            self.stream = self.keys.done(holder)
            self.block_ms = max(1, min(pttl + s.slack_ms, s.lease_ms + s.slack_ms, remaining))
            self.waited = True
            self.op = READ
        return self.op

    def read(self, reply: Any, now: float) -> int:
        """Take XREAD's reply (empty when the slice ended); returns the next op."""
        self._succeeded()
        entry = _first_record(reply)
        if entry is None:
            return self._again(now)
        self.record_id, record = entry
        status = record.get(b"s")
        self.payload = record.get(b"v", b"")
        if status == b"o" and self.fleet is not None:
            # A fleet entry's freshness is read with it (PTTL): ask again, for the entry.
            self.fleet.min_fresh_ms = 0
            return self._again(now)
        if status == b"o":
            self.op = HIT
        elif status == b"e":
            self.op = REMOTE_ERROR
        elif status == b"a" or status == b"f":
            # Abandoned or forgotten: ask again at once.  The holder has let the
            # lease go; if ACQUIRE still names it, the record was not its own
            # (forged), and is skipped rather than read again.
            self._skip[self.stream] = self.record_id
            return self._again(now)
        else:  # no leader writes this: an untrusted record (see bad_payload)
            self.bad_status = status if isinstance(status, bytes) else b""
            self.op = REMOTE_ERROR
        return self.op

    def bad_payload(self, now: float) -> int:
        """The payload did not decode (or its record's status is unknown): a miss.

        A stored result is ignored from now on; a completion record is skipped:
        the next read of its stream waits for the records after it (the
        holder's real completion), so a forged record costs one more ACQUIRE
        and read, never a spin.  Then ask again; returns the next op.
        ``first_bad`` tells whether this was the first bad payload of its stream
        (or the stored result) in this plan: the one to log.
        """
        if self.record_id is None:
            self.use_hit = False
            self.first_bad = True
        else:
            self.first_bad = self.stream not in self._skip
            self._skip[self.stream] = self.record_id
        return self._again(now)

    def failed(self, error: BaseException, transient: bool, now: float) -> int:
        """A Redis operation failed: sleep and retry, or apply the error policy."""
        if transient and not self._breaker.is_open():
            delay = self._retry.delay(now, self.deadline)
            if delay is not None:
                self.delay = delay
                self._after_sleep = ACQUIRE  # after a failed read too: state may be lost
                self.op = SLEEP
                return SLEEP
        self._breaker.failure(now)
        return self._unusable(REASON_UNAVAILABLE, error)

    def resume(self, now: float) -> int:
        """The sleep is over."""
        if now >= self.deadline:
            return self._give_up()
        self.op = self._after_sleep
        return self.op

    # -- internals --

    def _succeeded(self) -> None:
        self._retry.reset()
        self._breaker.success()

    def _again(self, now: float) -> int:
        if now >= self.deadline:
            return self._give_up()
        self.token = new_token()
        self.op = ACQUIRE
        return ACQUIRE

    def _give_up(self) -> int:
        return self._unusable(REASON_TIMEOUT, None)

    def _unusable(self, reason: str, error: BaseException | None) -> int:
        self.reason = reason
        self.error = error
        self.op = LOCAL if self.settings.policy == "open" else FAIL
        return self.op


def _first_record(reply: Any) -> tuple[bytes, dict[bytes, bytes]] | None:
    """The id and fields of the first entry of an XREAD reply, or None if it has none."""
    if not reply:
        return None
    if isinstance(reply, dict):  # RESP3 shape: {stream: [[id, fields]]}
        entries = next(iter(reply.values()))
        entries = entries[0] if entries and isinstance(entries[0], list) else entries
    else:  # RESP2: [[stream, [(id, fields)]]]
        entries = reply[0][1]
    if not entries:
        return None
    entry_id, fields = entries[0][0], entries[0][1]
    if isinstance(entry_id, str):
        entry_id = entry_id.encode()
    if isinstance(fields, dict):
        return entry_id, fields
    return entry_id, dict(zip(fields[::2], fields[1::2], strict=False))


class Completion:
    """COMPLETE's reply, decoded."""

    __slots__ = ("code", "waiters")

    COMPLETED, DETACHED, FENCED, ALREADY = 1, 2, 0, 3

    def __init__(self, reply: Any) -> None:
        self.code = int(reply[0])
        self.waiters = int(reply[1]) if len(reply) > 1 and reply[1] is not None else 0

    @property
    def fenced(self) -> bool:
        return self.code == self.FENCED


# -- the watchdog's bookkeeping -------------------------------------------------------------

RENEWED, RESURRECTED, LOST, LATE = 1, 2, 0, 3


class Held:
    """A lease this process holds while its loader runs (one per leading flight).

    It belongs to the flight, never to a thread: a token is never shared.
    """

    __slots__ = (
        "_on_settled",
        "due",
        "epoch",
        "expires",
        "forgotten_here",
        "kept",
        "keys",
        "lost",
        "stored",
        "token",
    )

    def __init__(self, keys: Keys, token: str, epoch: int, expires: float = 0.0) -> None:
        self.keys = keys
        self.token = token
        self.epoch = epoch
        self.expires = expires  # the earliest the lease can end, as this process knows it
        self.due = 0.0
        self.lost = False
        self.forgotten_here = False  # this process forgot the key while the flight ran
        self.kept: bool | None = None  # once settled: whether Redis took the outcome
        self.stored: FleetEntry | None = None  # a fleet flight: the entry to store
        self._on_settled: list[Callable[[bool], None]] = []

    def renew_keys(self) -> list[str]:
        return [self.keys.lease, self.keys.fence]

    def when_settled(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(kept)`` once the flight's outcome is settled (now if it is)."""
        if self.kept is None:
            self._on_settled.append(callback)
        else:
            callback(self.kept)

    def settle(self, kept: bool) -> None:
        """The outcome is settled: tell the callbacks, once."""
        if self.kept is not None:
            return
        self.kept = kept
        callbacks, self._on_settled = self._on_settled, []
        for callback in callbacks:
            callback(kept)


class Renewals:
    """Which held leases are due for renewal, and when the watchdog should wake next.

    Renewal runs every ``lease / 3``: two renewals can fail before a lease
    lapses.  A failed renewal is retried sooner.  The watchdog ends once
    nothing was held for ``idle_exit`` seconds.  Not thread-safe: the sync
    watchdog guards it with its lock.
    """

    __slots__ = ("_idle_since", "held", "idle_exit", "interval", "retry_interval", "settings")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.interval = settings.renew_interval
        self.retry_interval = min(self.interval, 0.1)
        self.idle_exit = max(settings.lease, 1.0)
        self.held: dict[str, Held] = {}
        self._idle_since: float | None = None

    def wait(self, now: float) -> float | None:
        """The watchdog's next step: seconds to sleep (0: renew ``due(now)`` now), or
        None when nothing was held for ``idle_exit`` (the watchdog ends)."""
        wait = self.next_wake(now)
        if wait is not None:
            self._idle_since = None
            return wait
        if self._idle_since is None:
            self._idle_since = now
        idle = now - self._idle_since
        return None if idle >= self.idle_exit else self.idle_exit - idle

    def renew_commands(self, due: list[Held], now: float, *, fallback: bool) -> list[list[Any]]:
        """One RENEW per lease of ``due``, sent at ``now``: EVALSHA, or EVAL as the
        ``fallback`` after NOSCRIPT."""
        name, code = ("EVAL", RENEW_SCRIPT.source) if fallback else ("EVALSHA", RENEW_SCRIPT.sha)
        return [[name, code, 2, *h.renew_keys(), *self.renew_args(h, now)] for h in due]

    def apply(self, due: list[Held], codes: list[int | None], now: float) -> list[tuple[Held, int]]:
        """The RENEW replies of ``due`` arrived at ``now`` (None where one failed);
        returns the (lease, code) pairs to count, of leases still held."""
        news = []
        for held, code in zip(due, codes, strict=True):
            if held.token not in self.held:
                continue  # its loader finished meanwhile
            if code is None:
                self.failed(held, now)
            else:
                self.renewed(held, code, now)
                news.append((held, code))
        return news

    def renew_args(self, held: Held, now: float) -> list[str | int]:
        """RENEW's arguments for ``held``, sent at ``now`` (see RENEW_SCRIPT)."""
        s = self.settings
        expected = round((held.expires - now) * 1000)
        return [held.token, s.lease_ms, s.fence_ttl_ms, expected, _ms(s.redis_timeout)]

    def add(self, held: Held, now: float) -> None:
        held.due = now + self.interval
        self.held[held.token] = held

    def remove(self, held: Held) -> None:
        self.held.pop(held.token, None)

    def due(self, now: float) -> list[Held]:
        return [h for h in self.held.values() if h.due <= now]

    def next_wake(self, now: float) -> float | None:
        """Seconds until the next renewal is due, or None when nothing is held."""
        if not self.held:
            return None
        return max(0.0, min(h.due for h in self.held.values()) - now)

    def renewed(self, held: Held, code: int, now: float) -> None:
        """A RENEW answered at ``now``: ``code`` is its reply."""
        if code == LOST:
            held.lost = True
            self.remove(held)
        elif code == LATE:  # it waited behind a stall: send a fresh one soon
            self.failed(held, now)
        else:
            held.expires = self.settings.leased_until(now)
            held.due = now + self.interval

    def failed(self, held: Held, now: float) -> None:
        held.due = now + self.retry_interval


# -- counters ---------------------------------------------------------------------------------


class Counters:
    """What a group has done, for metrics.  Thread-safe increments."""

    __slots__ = (
        "_lock",
        "aborted",
        "errors",
        "fenced",
        "hits",
        "leads",
        "local_runs",
        "lost_leases",
        "redis_errors",
        "remote_errors",
        "resurrections",
        "shared",
        "takeovers",
        "timeouts",
        "unavailable",
        "untrusted_payloads",
        "wait_seconds",
        "waits",
    )

    FIELDS = (
        "hits",
        "leads",
        "takeovers",
        "waits",
        "fenced",
        "lost_leases",
        "resurrections",
        "remote_errors",
        "local_runs",
        "unavailable",
        "timeouts",
        "redis_errors",
        "untrusted_payloads",
        "shared",
        "errors",
        "aborted",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        for name in self.FIELDS:
            setattr(self, name, 0)
        self.wait_seconds = 0.0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def add_wait(self, seconds: float) -> None:
        with self._lock:
            self.wait_seconds += seconds

    def snapshot(self) -> tuple[dict[str, int], float]:
        """The counts, and the seconds waited, read together."""
        with self._lock:
            return {name: getattr(self, name) for name in self.FIELDS}, self.wait_seconds


# -- fleet caches: entries stored in Redis ----------------------------------------------------

VALUE_ENTRY = "v"
ERROR_ENTRY = "e"  # a not-found error (the cache's negative=), stored as its error record


@dataclass(slots=True, eq=False)
class FleetCall:
    """What a fleet cache asks of one flight: which stored entry is good enough.

    ``min_fresh_ms``: an entry fresh for at most this long is the one being
    refreshed (an early refresh); ``stale_ok``: an entry in its stale window
    answers (stale-while-revalidate, for a caller with nothing better).
    """

    min_fresh_ms: int = 0
    stale_ok: bool = False


@dataclass(slots=True, eq=False)
class FleetEntry:
    """An entry as stored in Redis, or as read back: its lifetimes in milliseconds.

    ``fresh_ms`` is what remains of its freshness (negative once expired),
    ``stale_ms`` / ``error_ms`` its stale-while-revalidate and stale-if-error
    windows after expiry, ``delta_ms`` how long its load took (XFetch), ``kind``
    :data:`VALUE_ENTRY` or :data:`ERROR_ENTRY`.  Stored as
    ``b"<tail>,<stale>,<error>,<delta>,<kind>|" + payload`` with
    ``PX fresh + tail``, ``tail = max(stale, error)``: PTTL minus the tail is
    the freshness left, on the server's clock.  ``counted_at`` is when (on
    ``time.monotonic()``) a leader counted ``fresh_ms``: what has passed since is
    taken off when it is stored, so the stored entry expires when the leader's
    own copy does, however long the completion took to reach Redis.
    """

    fresh_ms: int
    stale_ms: int
    error_ms: int
    delta_ms: int
    kind: str
    payload: bytes = b""
    counted_at: float | None = None

    @property
    def tail_ms(self) -> int:
        return max(self.stale_ms, self.error_ms)

    def px(self, now: float) -> int:
        """The PX to store it with at ``now`` (at least 1: PX 0 is an error)."""
        fresh = self.fresh_ms
        if self.counted_at is not None:
            fresh -= int((now - self.counted_at) * 1000)  # whole ms passed: never too short
        return max(1, max(0, fresh) + self.tail_ms)

    def header(self) -> bytes:
        return (
            f"{self.tail_ms},{self.stale_ms},{self.error_ms},{self.delta_ms},{self.kind}|"
        ).encode()

    @classmethod
    def parse(cls, stored: bytes, pttl: int) -> FleetEntry | None:
        """The entry ``stored`` holds, read with ``pttl`` ms left; None if malformed."""
        head, sep, payload = stored.partition(b"|")
        if not sep:
            return None
        try:
            tail, stale, error, delta, kind = head.decode("ascii").split(",")
            if kind not in (VALUE_ENTRY, ERROR_ENTRY):
                return None
            return cls(pttl - int(tail), int(stale), int(error), int(delta), kind, payload)
        except ValueError:
            return None
