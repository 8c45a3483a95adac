"""LFS handles: bound to a client, expiring, and bounded per client so that one client cannot evict another's."""

from __future__ import annotations

import pytest

from proxy.config import parse_config
from proxy.errors import HandleRefused
from proxy.lfs import HandleStore, StorageAction
from proxy.lfs.handles import MAX_HANDLES, MAX_HANDLES_PER_CLIENT
from proxy.routing import Router
from tests.support import static_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def action(client: str | None, oid: str = "a" * 64, expires: float = 4000.0) -> StorageAction:
    config = parse_config(static_config("http://127.0.0.1:9"))
    route = Router(config.upstreams, config.auth).resolve_route(
        "GET", "/github.com/acme/private/info/refs", "service=git-upload-pack"
    )
    return StorageAction("download", "GET", "https://s.example/o", (), "s.example", oid, 1, route, client, expires)


def test_one_client_flooding_made_up_objects_cannot_evict_another_clients_live_handle() -> None:
    """The red team's attack: 101 batch requests of 1,000 made-up oids (upload and verify: 202,000 handles) from
    one client, then another client's live download. Before, the flood evicted it and the download got a 404."""
    store = HandleStore(clock=Clock())
    victim = store.issue(action("victim"))
    flood = action("attacker")
    for _ in range(101 * 1000 * 2):
        store.issue(flood)
    assert store.find(victim, "victim").client == "victim"
    assert len(store) <= MAX_HANDLES_PER_CLIENT + 1  # the attacker's own oldest went first


def test_a_full_store_evicts_from_the_client_holding_the_most() -> None:
    store = HandleStore(limit=10, per_client=8, clock=Clock())
    small = [store.issue(action("small")) for _ in range(2)]
    big = [store.issue(action("big")) for _ in range(8)]
    newcomer = store.issue(action("newcomer"))
    assert len(store) == 10
    assert all(store.find(handle, "small") for handle in small)
    with pytest.raises(HandleRefused, match="unknown"):
        store.find(big[0], "big")  # the largest holder lost its oldest
    assert store.find(newcomer, "newcomer")


def test_expired_handles_go_first_and_are_refused() -> None:
    clock = Clock()
    store = HandleStore(limit=4, per_client=4, clock=clock)
    old = store.issue(action("c", expires=clock.now + 10))
    clock.now += 11
    with pytest.raises(HandleRefused, match="expired"):
        store.find(old, "c")
    late = [store.issue(action("c", expires=clock.now + 100)) for _ in range(4)]
    assert len(store) == 4 and all(store.find(handle, "c") for handle in late)


def test_a_handle_is_bound_to_its_client() -> None:
    store = HandleStore(clock=Clock())
    handle = store.issue(action("a"))
    with pytest.raises(HandleRefused, match="another client"):
        store.find(handle, "b")
    assert MAX_HANDLES >= 10 * MAX_HANDLES_PER_CLIENT
