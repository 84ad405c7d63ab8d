"""
The registry in a Redis that several relays share, through ``txredisapi``
(Twisted-native: every command is a Deferred on the reactor, nothing blocks).

Layout, under a prefix (default ``p2p:``):

- ``node:ID``: the peer's record, one JSON object of :class:`Peer`'s fields
  (all but ``files``, ``expires`` and ``control``, which is its own key) plus ``gen``, a token new at every
  registration.  Its TTL (``PX``) *is* the registration's lifetime: Redis
  drops it on time with no sweeper.
- ``files:ID``: the peer's file table and a copy of its record, kept a
  ``grace`` longer than ``node:ID``, so whoever sweeps can still unlink an
  expired node from the indexes (and say what it dropped).
- ``name:NAME``: a hash, node id -> ``GEN|[size, sha256, root, pieceSize]``:
  the set of holders of the name, each with its entry, so ``WHOHAS`` reads
  one hash (or a random sample of a big one) and the holders' records.
- ``root:ROOT``: the same per manifest root (64 hex digits), node id ->
  ``GEN|[size, sha256, root, pieceSize, name]`` (the first of its files with
  that root, when a node holds the bytes under several names), so
  ``WHOHAS root=`` finds identical content under any name.  Written,
  replaced and unlinked in the same scripts as the name hashes, and
  filtered (and tidied) on read the same way.
- ``control:ID``: the id of the relay holding the node's control connection
  (a firewalled node holds one, at one relay), with the registration's TTL,
  refreshed by the heartbeats on that connection and deleted when it
  closes.  Every relay lists a node that is not reachable while this key
  exists (``Peer.control``); a ``REVERSE`` at another relay is forwarded to
  the holder by a ``PUBLISH`` on its channel ``orders:RELAYID``.
- ``names`` (every name, for ``SEARCH``), ``addr:HOST:PORT`` and
  ``src:SOURCE`` (sets of node ids), ``expiry`` (a sorted set, node -> when
  it expires by Redis's clock: the live count for the caps, the sweep's
  list), ``epoch``.
- ``bucket:NAME:SOURCE`` (a hash: tokens, as of when) and ``checked:ID``
  (a ``SET NX PX`` claim): the relays' shared allowances (DEAD reports and
  dial-backs per source address) and re-check interval per node, so N
  relays on one Redis give a source one allowance, not N, and check a
  node once per interval.  Both expire by themselves.

Every change is one Lua script, so it is atomic: a re-registration unlinks
the old entry and writes the new one with nothing in between, and no lookup
sees half of it.  A heartbeat is one script, one round trip.  An index
entry whose node has expired (its record gone) or registered again without
the name (its ``gen`` differs) is filtered out on read and deleted there, so
leftovers vanish lazily even if no relay ever sweeps.

The scripts touch keys they compute, so this layout needs one Redis (or a
primary with replicas), not Redis Cluster, which wants every key named in
``KEYS``; a cluster would need one hash tag per registry, i.e. one slot.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import uuid
from array import array
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import attrs
import txredisapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...pieces import PIECE_SIZE
from ...wire import FileEntry
from ..registry import (
    DEFAULT_TTL,
    MAX_HOLDERS,
    MAX_PER_SOURCE,
    MAX_TOTAL,
    AddressTaken,
    FileTable,
    Figures,
    Peer,
    RegistryFull,
    SearchHit,
    matcher,
)
from .interface import IRegistryBackend, RegistryUnavailable
from .url import RedisAddress

_log = Logger()

PREFIX = "p2p:"
TIMEOUT = 5.0  # seconds one call (or connecting at start) may take before RegistryUnavailable
SCAN_COUNT = 2000  # names one SSCAN step asks for
FETCH_CHUNK = 256  # peers fetched by one script call (all(), active(), figures())
SEARCH_CHUNK = 500  # names whose holders one script call counts
EXPIRE_BATCH = 1000  # expired nodes one sweep script cleans up
RECONNECT_DELAY = 2.0  # seconds at most between two attempts to reach a lost Redis
# Redis errors that mean "not now" rather than a bug of ours.
_TRANSIENT = ("LOADING", "READONLY", "OOM", "MASTERDOWN", "BUSY", "NOAUTH", "WRONGPASS", "CLUSTERDOWN", "TRYAGAIN")

# Peer's fields a relay shares: everything but the file table (stored on its
# own), the lifetime (the key's TTL) and the per-relay connection state.
_LOCAL = frozenset({"files", "expires", "control"})
_FIELDS = frozenset(f.name for f in attrs.fields(Peer))
_SHARED = tuple(f.name for f in attrs.fields(Peer) if f.name not in _LOCAL)

_PRELUDE = """
local P = ARGV[1]
local function nowms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function record(node)
  local raw = redis.call('GET', P .. 'node:' .. node)
  if not raw then return nil, nil end
  return cjson.decode(raw), raw
end
-- Replies are one JSON text each, made of the stored JSON by concatenation:
-- one bulk string is parsed far faster by the client than an array of many.
local function held(node)
  if redis.call('EXISTS', P .. 'control:' .. node) == 1 then return 'true' end
  return 'false'
end
local function triple(node, raw)
  local files = redis.call('GET', P .. 'files:' .. node)
  if not files then return nil end
  return '[' .. raw .. ',' .. files .. ',' .. redis.call('PTTL', P .. 'node:' .. node) .. ',' .. held(node) .. ']'
end
local function list(parts)
  return '[' .. table.concat(parts, ',') .. ']'
end
-- A record opens with its gen and reachable (see _shared), so the lookups'
-- test of a holder is usually a prefix comparison, not a JSON decode: 'live' (the
-- registration the entry belongs to, listed: reachable, or its control
-- connection held by some relay), 'hidden' (that registration, not listed)
-- or nil (expired, or registered again since).
local function holder(raw, v, node)
  if not raw then return nil end
  local bar = string.find(v, '|', 1, true)
  local gen = string.sub(v, 1, bar - 1)
  local head = '{"gen":"' .. gen .. '","reachable":'
  local listed
  if string.sub(raw, 1, #head) == head then
    listed = string.sub(raw, #head + 1, #head + 4) == 'true'
  else  -- written some other way: read it whole
    local r = cjson.decode(raw)
    if r.gen ~= gen then return nil end
    listed = r.reachable == true
  end
  if listed or held(node) == 'true' then return 'live', string.sub(v, bar + 1) end
  return 'hidden'
end
local function unlink(node, keep)
  local raw = redis.call('GET', P .. 'files:' .. node)
  if not raw then return nil end
  local f = cjson.decode(raw)
  local mine = f.peer.gen .. '|'
  for _, name in ipairs(f.names) do
    if not (keep and keep[name]) then
      local hk = P .. 'name:' .. name
      local v = redis.call('HGET', hk, node)
      if v and string.sub(v, 1, #mine) == mine then
        redis.call('HDEL', hk, node)
        if redis.call('EXISTS', hk) == 0 then redis.call('SREM', P .. 'names', name) end
      end
    end
  end
  local roots, none = f.roots or '', string.rep('0', 64)
  for i = 1, #roots, 64 do
    local root = string.sub(roots, i, i + 63)
    if root ~= none then
      local rk = P .. 'root:' .. root
      local v = redis.call('HGET', rk, node)
      if v and string.sub(v, 1, #mine) == mine then redis.call('HDEL', rk, node) end
    end
  end
  redis.call('SREM', P .. 'addr:' .. f.peer.host .. ':' .. f.peer.port, node)
  if f.peer.source ~= cjson.null then redis.call('SREM', P .. 'src:' .. f.peer.source, node) end
  return raw
end
local function remove(node)
  unlink(node, nil)
  local existed = redis.call('DEL', P .. 'node:' .. node)
  redis.call('DEL', P .. 'files:' .. node)
  redis.call('ZREM', P .. 'expiry', node)
  return existed
end
local function room(node, source, maxTotal, maxPer)
  if redis.call('EXISTS', P .. 'node:' .. node) == 1 then return nil end
  if redis.call('ZCOUNT', P .. 'expiry', '(' .. nowms(), '+inf') >= maxTotal then return 'total' end
  if source ~= '' then
    local sk = P .. 'src:' .. source
    local n = 0
    for _, m in ipairs(redis.call('SMEMBERS', sk)) do
      local r = record(m)
      if r and r.source == source then n = n + 1 else redis.call('SREM', sk, m) end
    end
    if n >= maxPer then return 'source' end
  end
  return nil
end
"""

# ARGV: P node key reachable source host port ttl grace maxTotal maxPer gen record files
#       [name, entry, name, entry...] [root, rootEntry, ...] (two JSON arrays of strings)
_REGISTER = _PRELUDE + """
local node, key, reachable, source = ARGV[2], ARGV[3], ARGV[4] == '1', ARGV[5]
local host, port = ARGV[6], ARGV[7]
local ttl, grace = tonumber(ARGV[8]), tonumber(ARGV[9])
local gen = ARGV[12]
local cur = record(node)
if cur then
  local ck = cur.key
  if ck == cjson.null then ck = '' end
  if ck ~= key then return {'key'} end
else
  local why = room(node, source, tonumber(ARGV[10]), tonumber(ARGV[11]))
  if why then return {why} end
end
local addrKey = P .. 'addr:' .. host .. ':' .. port
local others, taken = {}, false
for _, other in ipairs(redis.call('SMEMBERS', addrKey)) do
  if other ~= node then
    local r = record(other)
    if r and r.host == host and tostring(r.port) == port then
      table.insert(others, other)
      if r.reachable then taken = true end
    else
      redis.call('SREM', addrKey, other)
    end
  end
end
if taken and not reachable then return {'taken'} end
if reachable then
  for _, other in ipairs(others) do remove(other) end
end
local rec, kept = ARGV[13], false
if cur and reachable and cur.reachable == true and cur.host == host and tostring(cur.port) == port then
  -- still direct where it was: its run of successes and misses carry on
  local since = cur.directSince
  if since == nil or since == cjson.null then since = 'null' else since = cjson.encode(since) end
  local misses = tonumber(cur.misses) or 0
  rec = (string.gsub(rec, '"misses":%d+,"directSince":[^,]*}$',
    '"misses":' .. misses .. ',"directSince":' .. since .. '}'))
  kept = {misses, since}
end
local entries = cjson.decode(ARGV[15])
local keep = {}
for i = 1, #entries, 2 do keep[entries[i]] = true end
unlink(node, keep)
redis.call('SET', P .. 'node:' .. node, rec, 'PX', ttl)
redis.call('SET', P .. 'files:' .. node, ARGV[14], 'PX', ttl + grace)
for i = 1, #entries, 2 do
  redis.call('HSET', P .. 'name:' .. entries[i], node, gen .. '|' .. entries[i + 1])
  redis.call('SADD', P .. 'names', entries[i])
end
local rooted = cjson.decode(ARGV[16])
for i = 1, #rooted, 2 do
  redis.call('HSET', P .. 'root:' .. rooted[i], node, gen .. '|' .. rooted[i + 1])
end
redis.call('SADD', addrKey, node)
if source ~= '' then redis.call('SADD', P .. 'src:' .. source, node) end
redis.call('ZADD', P .. 'expiry', nowms() + ttl, node)
if kept then return {'ok', tostring(kept[1]), kept[2]} end
return {'ok'}
"""

# ARGV: P node source maxTotal maxPer
_ROOM = _PRELUDE + """
return room(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])) or false
"""

# ARGV: P node ttl grace relay
_REFRESH = _PRELUDE + """
local node, ttl = ARGV[2], tonumber(ARGV[3])
local r, raw = record(node)
if not r then return false end
local ck = P .. 'control:' .. node
if redis.call('GET', ck) == ARGV[5] then redis.call('PEXPIRE', ck, ttl) end
redis.call('PEXPIRE', P .. 'node:' .. node, ttl)
redis.call('PEXPIRE', P .. 'files:' .. node, ttl + tonumber(ARGV[4]))
redis.call('ZADD', P .. 'expiry', nowms() + ttl, node)
return triple(node, raw) or false
"""

# ARGV: P node...
_FETCH = _PRELUDE + """
local out = {}
for i = 2, #ARGV do
  local r, raw = record(ARGV[i])
  local t = r and triple(ARGV[i], raw)
  if t then table.insert(out, t) end
end
return list(out)
"""

# ARGV: P host port
_AT = _PRELUDE + """
local host, port = ARGV[2], ARGV[3]
local ak = P .. 'addr:' .. host .. ':' .. port
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', ak)) do
  local r, raw = record(node)
  local t = r and r.host == host and tostring(r.port) == port and triple(node, raw)
  if t then table.insert(out, t) else redis.call('SREM', ak, node) end
end
return list(out)
"""

# The lookups' sample of one index hash ``hk`` (a name's or a root's): at
# most ARGV[3] live, listed holders into ``out``, stale entries deleted.
_SAMPLE = """
local limit = tonumber(ARGV[3])
local flat
if redis.call('HLEN', hk) <= 2 * limit then
  flat = redis.call('HGETALL', hk)
else
  flat = redis.call('HRANDFIELD', hk, 2 * limit, 'WITHVALUES')
end
local out = {}
for i = 1, #flat, 2 do
  local node = flat[i]
  local key = P .. 'node:' .. node
  local raw = redis.call('GET', key)
  local state, entry = holder(raw, flat[i + 1], node)
  if not state then
    redis.call('HDEL', hk, node)
  elseif state == 'live' and #out < limit then
    table.insert(out, '[' .. raw .. ',' .. entry .. ',' .. redis.call('PTTL', key) .. ',' .. held(node) .. ']')
  end
end
"""

# ARGV: P name limit
_HOLDERS = _PRELUDE + """
local hk = P .. 'name:' .. ARGV[2]
""" + _SAMPLE + """
if redis.call('EXISTS', hk) == 0 then redis.call('SREM', P .. 'names', ARGV[2]) end
return list(out)
"""

# ARGV: P root limit
_ROOT_HOLDERS = _PRELUDE + """
local hk = P .. 'root:' .. ARGV[2]
""" + _SAMPLE + """
return list(out)
"""

# ARGV: P name... -> for each name, the entries of its live listed holders
_VERSIONS = _PRELUDE + """
local out = {}
for i = 2, #ARGV do
  local hk = P .. 'name:' .. ARGV[i]
  local flat = redis.call('HGETALL', hk)
  local live = {}
  for j = 1, #flat, 2 do
    local state, entry = holder(redis.call('GET', P .. 'node:' .. flat[j]), flat[j + 1], flat[j])
    if not state then
      redis.call('HDEL', hk, flat[j])
    elseif state == 'live' then
      table.insert(live, entry)
    end
  end
  table.insert(out, list(live))
end
return list(out)
"""

# ARGV: P node
_UNREGISTER = _PRELUDE + """
return remove(ARGV[2])
"""

# ARGV: P node gen record -> the updated triple, or false if gone (or registered anew)
_UPDATE = _PRELUDE + """
local r = record(ARGV[2])
if not r or r.gen ~= ARGV[3] then return false end
redis.call('SET', P .. 'node:' .. ARGV[2], ARGV[4], 'KEEPTTL')
return triple(ARGV[2], ARGV[4]) or false
"""

# ARGV: P node relay ttl on -> the triple (control set or cleared), or false if gone
_CONTROL = _PRELUDE + """
local node, relay = ARGV[2], ARGV[3]
local ck = P .. 'control:' .. node
if ARGV[5] == '1' then
  if redis.call('EXISTS', P .. 'node:' .. node) == 0 then return false end
  redis.call('SET', ck, relay, 'PX', tonumber(ARGV[4]))
elseif redis.call('GET', ck) == relay then
  redis.call('DEL', ck)
end
local r, raw = record(node)
if not r then return false end
return triple(node, raw) or false
"""

# ARGV: P node relay order -> whether another relay holds the control connection and heard the order
_FORWARD = """
local P, node = ARGV[1], ARGV[2]
local holder = redis.call('GET', P .. 'control:' .. node)
if not holder or holder == ARGV[3] then return 0 end
return redis.call('PUBLISH', P .. 'orders:' .. holder, ARGV[4])
"""

# ARGV: P batch -> the files records of the nodes dropped
_EXPIRE = _PRELUDE + """
local now = nowms()
local due = redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, node in ipairs(due) do
  local left = redis.call('PTTL', P .. 'node:' .. node)
  if left > 0 then
    redis.call('ZADD', P .. 'expiry', now + left, node)
  else
    local raw = unlink(node, nil)
    redis.call('DEL', P .. 'files:' .. node)
    redis.call('ZREM', P .. 'expiry', node)
    if raw then table.insert(out, raw) end
  end
end
return list(out)
"""

# ARGV: P bucket key rate burst now -> '0' when a token was taken, else the seconds until one will be.
# A token bucket in a hash (tokens, as of when), on the relays' clock (``now``,
# seconds) as the in-memory TokenBucket is; it expires once it would be full
# again, so an attacker's many addresses cost Redis bounded memory.
_TAKE = """
local k = ARGV[1] .. 'bucket:' .. ARGV[2] .. ':' .. ARGV[3]
local rate, burst, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local h = redis.call('HMGET', k, 'tokens', 'at')
local tokens, at = tonumber(h[1]), tonumber(h[2])
if not tokens or not at then tokens, at = burst, now end
local level = math.min(burst, tokens + math.max(0, now - at) * rate)
if level < 1 then return string.format('%.17g', (1 - level) / rate) end
level = level - 1
redis.call('HSET', k, 'tokens', string.format('%.17g', level), 'at', ARGV[6])
redis.call('PEXPIRE', k, math.max(1, math.ceil((burst - level) / rate * 1000)))
return '0'
"""

# ARGV: P node intervalms force -> 1 if this relay claimed the node's re-check, else 0
_CLAIM = """
local k = ARGV[1] .. 'checked:' .. ARGV[2]
if ARGV[4] == '1' then
  redis.call('SET', k, '1', 'PX', tonumber(ARGV[3]))
  return 1
end
if redis.call('SET', k, '1', 'NX', 'PX', tonumber(ARGV[3])) then return 1 end
return 0
"""

# ARGV: P candidate
_EPOCH = """
local e = redis.call('GET', ARGV[1] .. 'epoch')
if e then return e end
redis.call('SET', ARGV[1] .. 'epoch', ARGV[2])
return ARGV[2]
"""


def _entries(table: FileTable) -> str:
    """
    One JSON array: each name, then its entry as JSON text
    (``[size,"sha256",root,pieceSize]``), made directly: a registration of
    a thousand files is one argument, not two thousand.
    """
    digests = table.digests.hex()
    roots = table.roots.hex()
    flat: List[str] = []
    for index, name in enumerate(table.names):
        at = index * 64
        root = roots[at : at + 64]
        root = "null" if not root or root == "0" * 64 else f'"{root}"'
        flat.append(name)
        flat.append(f'[{table.sizes[index]},"{digests[at : at + 64]}",{root},{table.pieceSize(index)}]')
    return json.dumps(flat, separators=(",", ":"))


def _rootEntries(table: FileTable) -> str:
    """
    One JSON array: each root a file of ``table`` has (the first file with
    it, when several share one), then that file's entry with its name last
    (``[size,"sha256","root",pieceSize,"name"]``).
    """
    if not table.roots:
        return "[]"
    digests = table.digests.hex()
    roots = table.roots.hex()
    seen = set()
    flat: List[str] = []
    for index, name in enumerate(table.names):
        at = index * 64
        root = roots[at : at + 64]
        if root == "0" * 64 or root in seen:
            continue
        seen.add(root)
        flat.append(root)
        flat.append(
            f'[{table.sizes[index]},"{digests[at : at + 64]}","{root}",{table.pieceSize(index)},'
            f"{json.dumps(name)}]"
        )
    return json.dumps(flat, separators=(",", ":"))


def _isRoot(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _shared(peer: Peer, gen: str) -> Dict[str, Any]:
    """The record: ``gen`` and ``reachable`` first (the lookup scripts read that prefix), then the rest."""
    fields: Dict[str, Any] = {"gen": gen, "reachable": bool(peer.reachable)}
    for name in _SHARED:
        if name != "reachable":
            fields[name] = getattr(peer, name)
    return fields


def _encodeFiles(peer: Peer, record: Dict[str, Any]) -> str:
    table = peer.files
    return json.dumps(
        {
            "peer": record,
            "names": list(table.names),
            "sizes": list(table.sizes),
            "digests": table.digests.hex(),
            "roots": table.roots.hex(),
            "pieces": None if table.pieces is None else list(table.pieces),
        },
        separators=(",", ":"),
    )


def _decodeFiles(data: Dict[str, Any]) -> FileTable:
    sizes: Sequence[int]
    try:
        sizes = array("q", data["sizes"])
    except OverflowError:
        sizes = tuple(data["sizes"])
    pieces = data.get("pieces")
    return FileTable(
        tuple(sys.intern(n) for n in data["names"]),
        sizes,
        bytes.fromhex(data["digests"]),
        bytes.fromhex(data.get("roots", "")),
        None if pieces is None else array("q", pieces),
    )


def _peer(record: Dict[str, Any], files: FileTable, expires: float, control: bool = False) -> Peer:
    """A Peer of a shared record: fields this version does not know are left out."""
    record.pop("gen", None)
    try:
        return Peer(files=files, expires=expires, control=control, **record)
    except TypeError:  # written by a relay that knows more fields (or a local one)
        known = {k: v for k, v in record.items() if k in _FIELDS and k not in _LOCAL}
        return Peer(files=files, expires=expires, control=control, **known)


def ordered(peers: Iterable[Peer], rng: random.Random) -> List[Peer]:
    """``peers`` by :attr:`Peer.tier`, in random order within a tier (as ``Registry.ordered``)."""
    tiers: Dict[int, List[Peer]] = {}
    for peer in peers:
        tiers.setdefault(peer.tier, []).append(peer)
    result: List[Peer] = []
    for tier in sorted(tiers):
        group = tiers[tier]
        rng.shuffle(group)
        result.extend(group)
    return result


def _single(entry: FileEntry) -> FileTable:
    """The table of one entry (a WHOHAS holder's), made directly."""
    roots = b"" if entry.root is None else bytes.fromhex(entry.root)
    pieces = None if entry.pieceSize == PIECE_SIZE else (entry.pieceSize,)
    return FileTable((entry.name,), (entry.size,), bytes.fromhex(entry.sha256), roots, pieces)


def _mapFailure(failure: Failure, where: str, what: str) -> Failure:
    if failure.check(RegistryUnavailable, RegistryFull, AddressTaken, ValueError):
        return failure
    if failure.check(defer.TimeoutError, defer.CancelledError):
        raise RegistryUnavailable(
            f"the registry's Redis at {where} did not answer {what} in time (is it running there?)"
        )
    if failure.check(txredisapi.ConnectionError, ConnectionError):
        reason = failure.getErrorMessage() or failure.type.__name__
        raise RegistryUnavailable(f"the registry's Redis at {where} did not answer {what}: {reason}")
    if failure.check(txredisapi.ResponseError):
        message = failure.getErrorMessage()
        if message.split(" ", 1)[0].upper() in _TRANSIENT:
            raise RegistryUnavailable(f"the registry's Redis at {where} refused {what}: {message}")
    return failure


@implementer(IRegistryBackend)
class RedisBackend:
    """
    The registry in the Redis ``client`` talks to (a txredisapi connection
    handler; :func:`connect` makes one).  ``now`` gives the local time that
    a peer's ``expires`` is reported in (its remaining TTL added to it).
    """

    def __init__(
        self,
        client: Any,
        reactor: IReactorTime,
        ttl: float = DEFAULT_TTL,
        *,
        maxPerSource: int = MAX_PER_SOURCE,
        maxTotal: int = MAX_TOTAL,
        maxHolders: int = MAX_HOLDERS,
        prefix: str = PREFIX,
        timeout: float = TIMEOUT,
        grace: Optional[float] = None,
        where: str = "?",
        now: Optional[Callable[[], float]] = None,
    ) -> None:
        self.client = client
        self._reactor = reactor
        self.ttl = ttl
        self.maxPerSource = maxPerSource
        self.maxTotal = maxTotal
        self.maxHolders = maxHolders
        self.prefix = prefix
        self.timeout = timeout
        self.grace = ttl if grace is None else grace
        self.where = where
        self._now = now if now is not None else reactor.seconds
        self.relayId = uuid.uuid4().hex[:16]  # this relay, as control:ID keys name it
        self.address: Optional[RedisAddress] = None  # where to subscribe (set by connect)
        self._random = random.Random()
        self._orders: Any = None  # the subscriber connection's factory, once listening
        self.onRefused: Optional[Callable[[Failure], None]] = None  # connect()'s, while it waits
        self._closed = False

    def _handshakeFailed(self, failure: Failure) -> None:
        if self.onRefused is not None:
            self.onRefused(failure)
        else:
            _log.warn(
                "the registry's Redis at {where} refused the relay: {why}",
                where=self.where, why=failure.getErrorMessage(),
            )

    # Plumbing: every call has a deadline and one error type for "unreachable".

    def _guard(self, d: defer.Deferred, what: str) -> defer.Deferred:
        d.addTimeout(self.timeout, self._reactor)
        return d.addErrback(_mapFailure, self.where, what)

    def _eval(self, script: str, *args: Any, what: str) -> defer.Deferred:
        try:
            d = self.client.eval(script, [], [self.prefix, *args])
        except Exception:
            d = defer.fail()
        return self._guard(d, what)

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    def _decode(self, triple: Sequence[Any]) -> Peer:
        record, files, pttl, control = triple
        return _peer(record, _decodeFiles(files), self._now() + max(pttl, 0) / 1000, control)

    # The interface.

    def register(
        self,
        node: str,
        host: str,
        port: int,
        files: Iterable[FileEntry],
        udp: int | None = None,
        *,
        key: str | None = None,
        reachable: bool = True,
        source: str | None = None,
        tls: int | None = None,
    ) -> defer.Deferred:
        peer = Peer(
            node=sys.intern(node),
            host=host,
            port=port,
            files=FileTable.of(files),
            expires=self._now() + self.ttl,
            udp=udp,
            key=key,
            reachable=reachable,
            source=source,
            tls=tls,
            directSince=self._now() if reachable else None,
        )
        gen = uuid.uuid4().hex[:16]
        record = _shared(peer, gen)
        d = self._eval(
            _REGISTER,
            node,
            key or "",
            "1" if reachable else "0",
            source or "",
            host,
            str(port),
            self._ms(self.ttl),
            self._ms(self.grace),
            self.maxTotal,
            self.maxPerSource,
            gen,
            json.dumps(record, separators=(",", ":")),
            _encodeFiles(peer, record),
            _entries(peer.files),
            _rootEntries(peer.files),
            what="a registration",
        )

        def registered(answer: List[str]) -> Peer:
            outcome = answer[0]
            if outcome == "ok":
                if len(answer) == 3:  # still direct where it was
                    peer.misses = int(answer[1])
                    peer.directSince = None if answer[2] == "null" else float(answer[2])
                return peer
            if outcome == "key":
                raise ValueError(f"node {node} is bound to another key")
            if outcome == "taken":
                raise AddressTaken(f"{host}:{port} is held by another node")
            raise RegistryFull(self._why(outcome, source))

        return d.addCallback(registered)

    def _why(self, outcome: str, source: str | None) -> str:
        if outcome == "total":
            return f"the relay holds {self.maxTotal} registrations"
        return f"{self.maxPerSource} registrations from {source} already"

    def room(self, node: str, source: str | None) -> defer.Deferred:
        d = self._eval(_ROOM, node, source or "", self.maxTotal, self.maxPerSource, what="a room check")
        return d.addCallback(lambda outcome: None if not outcome else self._why(outcome, source))

    def refresh(self, node: str) -> defer.Deferred:
        d = self._eval(
            _REFRESH, node, self._ms(self.ttl), self._ms(self.grace), self.relayId, what="a heartbeat"
        )
        return d.addCallback(lambda t: self._decode(json.loads(t)) if t else None)

    def unregister(self, node: str) -> defer.Deferred:
        return self._eval(_UNREGISTER, node, what="an unregistration").addCallback(bool)

    def get(self, node: str) -> defer.Deferred:
        d = self._eval(_FETCH, node, what="a lookup")
        d.addCallback(json.loads)
        return d.addCallback(lambda found: self._decode(found[0]) if found else None)

    def at(self, host: str, port: int) -> defer.Deferred:
        d = self._eval(_AT, host, str(port), what="an address lookup")
        d.addCallback(json.loads)
        return d.addCallback(lambda found: [self._decode(t) for t in found])

    def holders(self, name: str, limit: int | None = None) -> defer.Deferred:
        limit = self.maxHolders if limit is None else limit
        d = self._eval(_HOLDERS, name, limit, what="a WHOHAS lookup")

        def decoded(text: str) -> List[Tuple[Peer, FileEntry]]:
            now = self._now()
            entries = {}
            for record, (size, sha256, root, pieceSize), pttl, control in json.loads(text):
                entry = FileEntry(name, size, sha256, root=root, pieceSize=pieceSize)
                peer = _peer(record, _single(entry), now + max(pttl, 0) / 1000, control)
                entries[id(peer)] = (peer, entry)
            return [entries[id(p)] for p in ordered((p for p, _ in entries.values()), self._random)]

        return d.addCallback(decoded)

    def holdersOfRoot(self, root: str, limit: int | None = None) -> defer.Deferred:
        limit = self.maxHolders if limit is None else limit
        if not _isRoot(root):
            return defer.succeed([])
        d = self._eval(_ROOT_HOLDERS, root, limit, what="a WHOHAS lookup")

        def decoded(text: str) -> List[Tuple[Peer, FileEntry]]:
            now = self._now()
            entries = {}
            for record, (size, sha256, held, pieceSize, name), pttl, control in json.loads(text):
                entry = FileEntry(name, size, sha256, root=held, pieceSize=pieceSize)
                peer = _peer(record, _single(entry), now + max(pttl, 0) / 1000, control)
                entries[id(peer)] = (peer, entry)
            return [entries[id(p)] for p in ordered((p for p, _ in entries.values()), self._random)]

        return d.addCallback(decoded)

    @defer.inlineCallbacks
    def all(self):
        """Every live entry, in the order of their expiry (soonest first)."""
        nodes = yield self._guard(self.client.zrange(self.prefix + "expiry", 0, -1), "a listing")
        peers: List[Peer] = []
        for start in range(0, len(nodes), FETCH_CHUNK):
            found = json.loads((yield self._eval(_FETCH, *nodes[start : start + FETCH_CHUNK], what="a listing")))
            peers.extend(self._decode(t) for t in found)
        return peers

    def active(self) -> defer.Deferred:
        return self.all().addCallback(lambda peers: ordered((p for p in peers if p.listed), self._random))

    def figures(self) -> defer.Deferred:
        def count(peers: List[Peer]) -> Figures:
            names: set[str] = set()
            entries = size = 0
            for peer in peers:
                names.update(peer.files.names)
                entries += len(peer.files)
                size += sum(peer.files.sizes)
            return Figures(len(peers), len(names), entries, size)

        return self.active().addCallback(count)

    @defer.inlineCallbacks
    def search(self, pattern: str, limit: int):
        matches = matcher(pattern)
        names: List[str] = []
        cursor = 0
        while True:
            cursor, chunk = yield self._guard(
                self.client.sscan(self.prefix + "names", cursor, count=SCAN_COUNT), "a search"
            )
            names.extend(chunk if matches is None else [n for n in chunk if matches(n)])
            if int(cursor) == 0:
                break
        names = sorted(set(names))
        hits: List[SearchHit] = []
        for start in range(0, len(names), SEARCH_CHUNK):
            chunk = names[start : start + SEARCH_CHUNK]
            found = json.loads((yield self._eval(_VERSIONS, *chunk, what="a search")))
            for name, entries in zip(chunk, found):
                versions: Dict[Tuple[int, str], int] = {}
                for size, sha256, *_ in entries:
                    versions[(size, sha256)] = versions.get((size, sha256), 0) + 1
                for (size, sha256), holders in sorted(versions.items()):
                    hits.append(SearchHit(name, size, sha256, holders))
            if len(hits) > limit:
                break
        return hits[:limit], len(hits) > limit

    @defer.inlineCallbacks
    def setReachable(self, node: str, reachable: bool):
        peer = yield self.get(node)
        if peer is None or (peer.reachable == reachable and not peer.misses):
            return peer
        changes: Dict[str, Any] = {"misses": 0}
        if peer.reachable != reachable:
            changes.update(reachable=reachable, directSince=self._now() if reachable else None)
        return (yield self._update(node, **changes))

    @defer.inlineCallbacks
    def missed(self, node: str):
        peer = yield self.get(node)
        if peer is None or not peer.reachable:
            return peer
        return (yield self._update(node, misses=peer.misses + 1))

    def setControl(self, node: str, control: bool) -> defer.Deferred:
        d = self._eval(
            _CONTROL, node, self.relayId, self._ms(self.ttl), "1" if control else "0",
            what="a control connection's record",
        )
        return d.addCallback(lambda t: self._decode(json.loads(t)) if t else None)

    def forward(self, node: str, order: bytes) -> defer.Deferred:
        message = json.dumps({"node": node, "order": order.decode("ascii")})
        d = self._eval(_FORWARD, node, self.relayId, message, what="a forwarded order")
        return d.addCallback(lambda heard: bool(heard))

    def listen(self, onOrder: Callable[[str, bytes], None]) -> defer.Deferred:
        """
        Subscribe to ``orders:RELAYID`` on a connection of its own (reconnected
        when lost, as the commands' one is); fires once subscribed.
        """
        assert self.address is not None, "listen() needs a backend made by connect()"
        factory = _OrdersFactory(self.address, self.prefix + "orders:" + self.relayId, onOrder)
        self._orders = factory
        factory.startConnecting(_endpoint(self._reactor, self.address, self.timeout))
        return factory.subscribed

    @defer.inlineCallbacks
    def _update(self, node: str, **changes: Any):
        """Change shared fields of a live entry, keeping its lifetime; the peer, or None."""
        unknown = set(changes) - set(_SHARED)
        if unknown:
            raise TypeError(f"not shared fields of Peer: {sorted(unknown)}")
        found = json.loads((yield self._eval(_FETCH, node, what="an update")))
        if not found:
            return None
        record = found[0][0]
        gen = record["gen"]
        record.update(changes)
        t = yield self._eval(_UPDATE, node, gen, json.dumps(record, separators=(",", ":")), what="an update")
        return self._decode(json.loads(t)) if t else None

    @defer.inlineCallbacks
    def expire(self):
        """Unlink what Redis has expired (correctness needs no sweep; tidiness does)."""
        gone: List[Peer] = []
        while True:
            dropped = json.loads((yield self._eval(_EXPIRE, EXPIRE_BATCH, what="a sweep")))
            now = self._now()
            for data in dropped:
                gone.append(_peer(data["peer"], _decodeFiles(data), now))
            if len(dropped) < EXPIRE_BATCH:
                return gone

    def take(self, bucket: str, key: str, rate: float, burst: int) -> defer.Deferred:
        d = self._eval(_TAKE, bucket, key, repr(float(rate)), int(burst), repr(float(self._now())), what="an allowance")
        return d.addCallback(lambda wait: float(wait))

    def claimRecheck(self, node: str, interval: float, force: bool = False) -> defer.Deferred:
        d = self._eval(_CLAIM, node, self._ms(interval), "1" if force else "0", what="a re-check claim")
        return d.addCallback(bool)

    def releaseRecheck(self, node: str) -> defer.Deferred:
        d = self._guard(self.client.delete(self.prefix + "checked:" + node), "a re-check release")
        return d.addCallback(lambda _: None)

    def epoch(self) -> defer.Deferred:
        return self._eval(_EPOCH, uuid.uuid4().hex[:16], what="the registry's epoch")

    def revive(self) -> bool:
        """
        A new connection if txredisapi has given up on the one it had: it
        stops reconnecting for good when a handshake fails (a Redis still
        loading its data answers ``LOADING``, a password changed), which
        must not leave a relay without its registry once Redis is fine
        again.  Whether it made one.
        """
        orders = self._orders
        if orders is not None and orders.stopped and not self._closed:
            orders.disconnect().addErrback(lambda f: None)
            self.listen(orders.onOrder)
        factory = getattr(self.client, "_factory", None)
        if self.address is None or self._closed or factory is None or not factory.stopped:
            return False
        _log.info("reconnecting to the registry's Redis at {where}", where=self.where)
        old, self.client = self.client, _client(self.address, self.timeout, self._handshakeFailed)
        old.disconnect().addErrback(lambda f: None)
        return True

    def close(self) -> defer.Deferred:
        self._closed = True
        if self._orders is not None:
            self._orders.stopTrying()
            self._orders.disconnect()
        return self.client.disconnect()


class _OrdersProtocol(txredisapi.SubscriberProtocol):
    """The subscriber connection: orders other relays forward, to ``factory.onOrder``."""

    @defer.inlineCallbacks
    def connectionMade(self):
        yield super().connectionMade()
        if self.connected:
            yield self.subscribe(self.factory.channel)
            if not self.factory.subscribed.called:
                self.factory.subscribed.callback(None)

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        try:
            data = json.loads(message)
            node, order = data["node"], data["order"].encode("ascii")
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # not one of ours
        self.factory.onOrder(node, order)


class _OrdersFactory(txredisapi.RedisFactory):
    protocol = _OrdersProtocol
    noisy = False

    def __init__(self, address: RedisAddress, channel: str, onOrder: Callable[[str, bytes], None]) -> None:
        super().__init__(channel, address.db, 1, isLazy=True, password=address.password)
        self.channel = channel
        self.onOrder = onOrder
        self.subscribed: defer.Deferred = defer.Deferred()
        self.deferred.addErrback(
            lambda f: _log.warn("the registry's Redis refused the orders' subscription: {why}", why=f.getErrorMessage())
        )
        self.maxDelay = RECONNECT_DELAY
        self.initialDelay = min(self.initialDelay, RECONNECT_DELAY / 4)


def _endpoint(reactor: Any, address: RedisAddress, timeout: float) -> Any:
    from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint

    if address.path is not None:
        return UNIXClientEndpoint(reactor, address.path, timeout=timeout)
    return TCP4ClientEndpoint(reactor, address.host, address.port, timeout=timeout)


def preflight(address: RedisAddress, prefix: str = PREFIX, timeout: float = TIMEOUT) -> str:
    """
    The registry's epoch, read (or made) over a plain blocking socket:
    the relay's start, before the reactor runs, so a Redis that is not
    there (or refuses the password) fails the start at once with one line
    (:class:`RegistryUnavailable`), and the relay's first answers already
    carry the epoch as their ``boot=``.
    """
    where = address.describe()
    family = socket.AF_UNIX if address.path is not None else socket.AF_INET
    target: Any = address.path if address.path is not None else (address.host, address.port)
    try:
        if family == socket.AF_INET:
            sock = socket.create_connection(target, timeout=timeout)
        else:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(target)
    except OSError as e:
        raise RegistryUnavailable(f"cannot reach the registry's Redis at {where}: {e.strerror or e}") from None
    reader = sock.makefile("rb")

    def command(*args: str) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode("utf-8")
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        sock.sendall(b"".join(out))
        line = reader.readline()
        if not line:
            raise RegistryUnavailable(f"the registry's Redis at {where} closed the connection")
        kind, rest = line[:1], line[1:].rstrip(b"\r\n").decode("utf-8", "replace")
        if kind == b"-":
            raise RegistryUnavailable(f"the registry's Redis at {where} refused the relay: {rest}")
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else reader.read(size + 2)[:-2].decode("utf-8")
        return rest

    try:
        if address.password is not None:
            command("AUTH", address.password)
        command("SELECT", str(address.db))
        return command("EVAL", _EPOCH, "0", prefix, uuid.uuid4().hex[:16])
    except socket.timeout:
        raise RegistryUnavailable(
            f"the registry's Redis at {where} did not answer in time (is it running there?)"
        ) from None
    except OSError as e:
        raise RegistryUnavailable(f"the registry's Redis at {where} did not answer: {e.strerror or e}") from None
    finally:
        reader.close()
        sock.close()


def lazy(
    address: RedisAddress,
    reactor: Optional[Any] = None,
    *,
    timeout: float = TIMEOUT,
    **options: Any,
) -> RedisBackend:
    """
    A :class:`RedisBackend` on ``address`` at once, its connection being
    made (calls wait for it, each within ``timeout``).  A lost Redis is reconnected to every
    ``RECONNECT_DELAY`` seconds at most; calls meanwhile fail with
    RegistryUnavailable after their own ``timeout`` (a call still waiting for
    the connection is then never sent; one already sent may take effect, as
    any request whose answer was lost).  A Redis that stops answering on an
    open connection has it aborted after ``timeout`` (txredisapi's reply
    timeout), so it is reconnected to rather than waited on.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    backend = RedisBackend(None, reactor, timeout=timeout, where=address.describe(), **options)
    backend.address = address
    backend.client = _client(address, timeout, backend._handshakeFailed)
    return backend


def _client(address: RedisAddress, timeout: float, onHandshakeFailed: Callable[[Failure], None]) -> Any:
    """A lazy txredisapi connection to ``address``, reconnected every RECONNECT_DELAY at most."""
    if address.path is not None:
        client = txredisapi.lazyUnixConnection(
            address.path, dbid=address.db, password=address.password,
            connectTimeout=timeout, replyTimeout=timeout,
        )
    else:
        client = txredisapi.lazyConnection(
            address.host, address.port, dbid=address.db, password=address.password,
            connectTimeout=timeout, replyTimeout=timeout,
        )
    client._factory.maxDelay = RECONNECT_DELAY
    client._factory.initialDelay = min(client._factory.initialDelay, RECONNECT_DELAY / 4)
    if client._factory.deferred is not None:
        # A refused password or database, or a connection lost during its
        # handshake: said once (connect() fails with it), never an
        # unhandled error in a Deferred.
        client._factory.deferred.addErrback(onHandshakeFailed)
    return client


def connect(
    address: RedisAddress,
    reactor: Optional[Any] = None,
    *,
    timeout: float = TIMEOUT,
    **options: Any,
) -> "defer.Deferred[RedisBackend]":
    """
    A :class:`RedisBackend` on ``address`` once Redis has answered (its
    epoch read or made); fails with :class:`RegistryUnavailable` after
    ``timeout`` seconds without an answer (the relay's start then fails:
    exit 1 with the message).  See :func:`lazy` for what happens later.
    """
    backend = lazy(address, reactor, timeout=timeout, **options)
    client, where = backend.client, backend.where
    result: defer.Deferred = defer.Deferred()

    def ready(_: object) -> None:
        backend.onRefused = None  # later refusals are warnings (see lazy)
        if not result.called:
            result.callback(backend)

    def failed(failure: Failure) -> None:
        client.disconnect()
        if not result.called:
            result.errback(failure)

    def refused(failure: Failure) -> None:
        # A wrong password or database: txredisapi gives up on the
        # connection and says why here, long before the first call times out.
        if not result.called:
            result.errback(RegistryUnavailable(
                f"the registry's Redis at {where} refused the relay: {failure.getErrorMessage()}"
            ))
        asked.cancel()  # ends its timeout; failed() lets go of the connection

    backend.onRefused = refused
    asked = backend.epoch()
    asked.addCallbacks(ready, failed)
    return result
