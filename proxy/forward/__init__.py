"""Forward: stream one git request to its upstream with the credential added, and the answer back, byte for byte.

The package follows a request: `guards` (what every request must pass) → `edge` (its frame, refusals, audit) →
`git` or `lfs` (the handlers) → `upstream` (the request the proxy builds, its token retry, the answer's checks)
or `mirrored` (a pack from the mirror) → `relay` (the one streaming loop). `exchange` is the request in flight,
`watch` cuts the ones whose client went quiet, and `context` is what they all read."""

from .context import FORWARD_CONTEXT, ForwardContext, LiveContext
from .git import forward_request
from .lfs import forward_lfs_object
from .watch import BodySlots, TransferWatch

__all__ = [
    "FORWARD_CONTEXT", "BodySlots", "ForwardContext", "LiveContext", "TransferWatch", "forward_lfs_object",
    "forward_request",
]  # fmt: skip
