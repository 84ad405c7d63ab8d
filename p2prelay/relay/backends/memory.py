"""
The registry in this process: :class:`~p2prelay.relay.registry.Registry`
behind the backend interface, every answer an already-fired Deferred.

The default backend (and the one ``--state PATH`` persists).  A search that
needs more than one step runs its remaining steps on a cooperator, as the
relay has always run them, so other requests are answered in between.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet import defer, task
from zope.interface import implementer

from ...wire import FileEntry
from ..dialback import TokenBucket
from ..registry import Figures, Peer, Registry, SearchHit
from .interface import IRegistryBackend


def _fired(call: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    try:
        return defer.succeed(call(*args, **kwargs))
    except Exception:
        return defer.fail()


@implementer(IRegistryBackend)
class MemoryBackend:
    """
    ``registry`` (a :class:`Registry`) as a backend; ``epoch`` names this
    registry's life (a fresh one per relay run unless given).  The
    allowances (``take``) are token buckets (:class:`TokenBucket`), the re-check
    claims a dict, in this process, on ``now`` (seconds; the registry's
    clock unless given).
    """

    def __init__(
        self,
        registry: Registry,
        epoch: Optional[str] = None,
        cooperator: Optional[task.Cooperator] = None,
        now: Optional[Callable[[], float]] = None,
    ) -> None:
        self.registry = registry
        self._epoch = epoch if epoch is not None else uuid.uuid4().hex[:16]
        self._cooperator = cooperator
        self._now = now if now is not None else registry._now
        self._buckets: Dict[str, TokenBucket] = {}  # allowance name -> its bucket
        self._checked: Dict[str, float] = {}  # node -> when a re-check of it was last claimed

    @property
    def ttl(self) -> float:
        return self.registry.ttl

    @property
    def maxTotal(self) -> int:
        return self.registry.maxTotal

    @property
    def maxHolders(self) -> int:
        return self.registry.maxHolders

    def register(self, node: str, host: str, port: int, files: Iterable[FileEntry], udp: int | None = None, **kwargs: Any) -> defer.Deferred:
        return _fired(self.registry.register, node, host, port, files, udp, **kwargs)

    def room(self, node: str, source: str | None) -> defer.Deferred:
        return _fired(self.registry.room, node, source)

    def refresh(self, node: str) -> defer.Deferred:
        return _fired(self.registry.refresh, node)

    def unregister(self, node: str) -> defer.Deferred:
        return _fired(self.registry.unregister, node)

    def get(self, node: str) -> defer.Deferred:
        return _fired(self.registry.get, node)

    def at(self, host: str, port: int) -> defer.Deferred:
        return _fired(self.registry.at, host, port)

    def holders(self, name: str, limit: int | None = None) -> defer.Deferred:
        return _fired(self.registry.holders, name, limit)

    def holdersOfRoot(self, root: str, limit: int | None = None) -> defer.Deferred:
        return _fired(self.registry.holdersOfRoot, root, limit)

    def active(self) -> defer.Deferred:
        return _fired(self.registry.active)

    def all(self) -> defer.Deferred:
        return _fired(self.registry.all)

    def figures(self) -> "defer.Deferred[Figures]":
        return _fired(self.registry.figures)

    def setReachable(self, node: str, reachable: bool) -> defer.Deferred:
        return _fired(self.registry.setReachable, node, reachable)

    def missed(self, node: str) -> defer.Deferred:
        return _fired(self.registry.missed, node)

    def setControl(self, node: str, control: bool) -> defer.Deferred:
        return _fired(self.registry.setControl, node, control)

    def forward(self, node: str, order: bytes) -> "defer.Deferred[bool]":
        return defer.succeed(False)  # one relay: no other to hold a control connection

    def listen(self, onOrder: Callable[[str, bytes], None]) -> "defer.Deferred[None]":
        return defer.succeed(None)

    def bucket(self, name: str, rate: float, burst: int) -> TokenBucket:
        """The allowance ``name``'s bucket (made on first use), at ``rate`` and ``burst``."""
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(self._now, rate, burst)
        bucket.rate, bucket.burst = rate, burst
        return bucket

    def take(self, bucket: str, key: str, rate: float, burst: int) -> "defer.Deferred[float]":
        return _fired(self.bucket(bucket, rate, burst).take, key)

    def claimRecheck(self, node: str, interval: float, force: bool = False) -> "defer.Deferred[bool]":
        now = self._now()
        last = self._checked.get(node)
        if not force and last is not None and now - last < interval:
            return defer.succeed(False)
        if len(self._checked) > self.registry.maxTotal:
            self._checked = {n: t for n, t in self._checked.items() if now - t < interval}
        self._checked[node] = now
        return defer.succeed(True)

    def releaseRecheck(self, node: str) -> "defer.Deferred[None]":
        self._checked.pop(node, None)
        return defer.succeed(None)

    def expire(self) -> "defer.Deferred[List[Peer]]":
        return _fired(self.registry.expire)

    def epoch(self) -> "defer.Deferred[str]":
        return defer.succeed(self._epoch)

    def close(self) -> "defer.Deferred[None]":
        return defer.succeed(None)

    def search(self, pattern: str, limit: int) -> "defer.Deferred[Tuple[List[SearchHit], bool]]":
        """The first step at once (a small search is done in it), the rest cooperatively."""
        steps = self.registry.searchSteps(pattern, limit)
        try:
            next(steps)
        except StopIteration as done:
            return defer.succeed(done.value)
        except Exception:
            return defer.fail()
        result: List[Tuple[List[SearchHit], bool]] = []

        def run():
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    result.append(done.value)
                    return
                yield None

        work = (self._cooperator or task).cooperate(run())

        stopping = []

        def stop(d: defer.Deferred) -> None:
            # Cancelled (its client left): no more steps for nobody; the
            # answer then fails with CancelledError.
            stopping.append(True)
            try:
                work.stop()
            except (task.TaskDone, task.TaskFailed):
                pass

        answer: defer.Deferred = defer.Deferred(stop)

        def done(_: object) -> None:
            if not answer.called:
                answer.callback(result[0])

        def failed(failure) -> None:
            if not answer.called and not stopping:
                answer.errback(failure)

        work.whenDone().addCallbacks(done, failed)
        return answer
