"""How often pushes may ask GitHub's compare API: per auth entry, and per party within it.

Each question spends the entry's REST rate limit (5000 an hour for an installation, shared with whatever else uses
its tokens). A party that may push could otherwise send pushes that each ask 16 questions, and spend the whole
limit in minutes for everyone. Past its share, an update is refused as undecidable, with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from ..bounded import BoundedDict

ENTRY_PER_HOUR = 1800  # about a third of an installation's smallest hourly limit
PARTY_PER_HOUR = 600  # one client's share of its entry's
_BURST_MINUTES = 4  # a bucket holds this many minutes of its rate: a burst of pushes is not refused
_PARTIES = 4096  # parties remembered per entry; one that falls out starts again with a full bucket


@dataclass
class CompareBudget:
    """Leaky buckets (aiolimiter) per entry and per (entry, party); a question needs room in both."""

    entry_per_hour: int = ENTRY_PER_HOUR
    party_per_hour: int = PARTY_PER_HOUR
    _entries: dict[str, AsyncLimiter] = field(default_factory=dict)
    _parties: BoundedDict[tuple[str, str], AsyncLimiter] = field(default_factory=lambda: BoundedDict(_PARTIES))

    async def spend(self, entry: str, party: str) -> bool:
        """Takes one question from both buckets, or none (False) when either is empty. Never waits."""
        entry_bucket = self._entries.get(entry)
        if entry_bucket is None:
            entry_bucket = self._entries[entry] = _bucket(self.entry_per_hour)
        party_bucket = self._parties.get((entry, party))
        if party_bucket is None:
            party_bucket = self._parties[entry, party] = _bucket(self.party_per_hour)
        if not (entry_bucket.has_capacity() and party_bucket.has_capacity()):
            return False
        # With room in both, neither acquire suspends: nothing can take the room between the check and here.
        await entry_bucket.acquire()
        await party_bucket.acquire()
        return True

    def describe(self, entry: str, party: str) -> str:
        """Which share ran out, for the refusal."""
        bucket = self._entries.get(entry)
        if bucket is not None and not bucket.has_capacity():
            return f"the auth entry's {self.entry_per_hour} questions to GitHub an hour are spent"
        return f"'{party}' has spent its {self.party_per_hour} questions to GitHub an hour"


def _bucket(per_hour: int) -> AsyncLimiter:
    minutes = _BURST_MINUTES
    return AsyncLimiter(max(1, per_hour * minutes // 60), minutes * 60)
