"""Phases: where a request in flight stands, one named state for each of its two halves."""

from __future__ import annotations

from enum import Enum


class Upload(Enum):
    """The client's request body, as far as upstream (or the mirror) is concerned."""

    ARRIVING = "arriving"  # still coming from the client, or not yet passed on
    SENT = "sent"  # upstream (or the mirror) has all of it, or there was none
    BROKE = "broke"  # it broke off before its end: whatever upstream answers belongs to a request it never got


class Answer(Enum):
    """The answer to the client. The status line goes out before the body (see `relay`), so STREAMING means no
    refusal can follow any more: only a broken transfer."""

    PENDING = "pending"  # nothing has gone to the client yet
    STREAMING = "streaming"  # the status line is out and the body is flowing
    DONE = "done"  # a whole answer went out: upstream's, the mirror's, or the proxy's own refusal
