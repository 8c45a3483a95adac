"""How snapshots fare, as an operator sees it: the counters restores and publishes record, the bucket's state logged
once per change (with the breaker that sends fills straight upstream for a while after a restore failed), and a
failure named for a log line."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from .objectstore import ObjectStoreError

log = logging.getLogger("git_token_proxy.snapshots")

BREAK_FOR = 30.0  # after the bucket failed a restore, fills go straight upstream this long (one probe after it)


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class LabelledCounter(Protocol):
    def labels(self, *values: str) -> Counter: ...


class SnapshotMetrics(Protocol):
    """The counters `proxy.metrics.Metrics` carries for snapshots."""

    @property
    def snapshot_restores(self) -> LabelledCounter: ...  # {result}: snapshots.RestoreResult

    @property
    def snapshot_publishes(self) -> LabelledCounter: ...  # {result}: snapshot_publish.PublishResult

    @property
    def snapshot_restored_bytes(self) -> Counter: ...

    @property
    def snapshot_published_bytes(self) -> Counter: ...


class BucketHealth:
    """The bucket's state as restores or publishes see it: logged once per change of the kind of failure (not of
    its wording, which may hold a byte count or an address), and, when asked to, a breaker that keeps callers off
    the bucket for BREAK_FOR after a failure."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._failing: str | None = None  # the kind of the last failure, until a success
        self._broken_until = 0.0

    @property
    def usable(self) -> bool:
        return time.monotonic() >= self._broken_until

    def failed(self, error: BaseException, breaks: bool) -> None:
        if breaks:
            self._broken_until = time.monotonic() + BREAK_FOR
        kind = failure_kind(error)
        if self._failing != kind:
            self._failing = kind
            log.warning("snapshot %s failing: %s; mirrors fill from upstream meanwhile (logged once per change)",
                        self._what, describe_error(error))  # fmt: skip

    def succeeded(self, where: str) -> None:
        if self._failing is not None:
            self._failing = None
            log.info("snapshot %s work again (%s)", self._what, where)


def failure_kind(error: BaseException) -> str:
    if isinstance(error, ObjectStoreError):
        return error.kind
    if isinstance(error, TimeoutError):
        return "timeout"
    return type(error).__name__


def describe_error(error: BaseException) -> str:
    """One line for the log: the kind, and the message (an ObjectStoreError's never holds a credential)."""
    if isinstance(error, ObjectStoreError):
        return f"{error.kind}: {error}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {str(error)[:200]}"
