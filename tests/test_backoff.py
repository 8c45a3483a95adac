"""Backoff tables: heals bounded per installation, paused mints, look-up budgets; all bounded, all forgettable."""

from __future__ import annotations

from proxy.credentials import Credential
from proxy.credentials.backoff import FIRST_HEAL_PAUSE, MAX_HEAL_PAUSE, CallBudget, HealBackoff, Pauses


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def token(name: str) -> Credential:
    return Credential("x-access-token", name, "cached")


def test_one_heal_is_free_and_a_rejected_fresh_token_suspends_heals() -> None:
    clock = Clock()
    heals = HealBackoff(100, clock)
    assert heals.suspended_for("k", token("t1")) == 0
    heals.healed("k", token("t1"))
    clock.now += 1
    assert heals.suspended_for("k", token("t1")) == 0  # a late request with the token just evicted: no harm
    assert heals.suspended_for("k", token("t2")) == FIRST_HEAL_PAUSE  # the fresh token was rejected too
    clock.now += FIRST_HEAL_PAUSE - 1
    assert heals.suspended_for("k", token("t2")) == 1
    assert heals.suspended_for("other-installation", token("t9")) == 0


def test_pauses_double_up_to_the_cap_and_allow_one_heal_each() -> None:
    clock = Clock()
    heals = HealBackoff(100, clock)
    pauses, generation = [], 0
    heals.healed("k", token("t0"))
    while len(pauses) < 8:
        generation += 1
        clock.now += 1
        suspended = heals.suspended_for("k", token(f"t{generation}"))  # the heal's fresh token fails at once
        assert suspended
        pauses.append(suspended)
        clock.now += suspended
        assert heals.suspended_for("k", token(f"t{generation}")) == 0  # the pause is over: one heal may go
        heals.healed("k", token(f"t{generation}"))
    assert pauses == [30, 60, 120, 240, 480, 900, 900, 900] and max(pauses) == MAX_HEAL_PAUSE


def test_a_heal_that_worked_resets_the_pause() -> None:
    clock = Clock()
    heals = HealBackoff(100, clock)
    heals.healed("k", token("t0"))
    assert heals.suspended_for("k", token("t1")) == 30
    clock.now += 30
    heals.healed("k", token("t1"))
    clock.now += 3600  # t2 served an hour without complaint
    assert heals.suspended_for("k", token("t2")) == 0
    heals.healed("k", token("t2"))
    assert heals.suspended_for("k", token("t3")) == FIRST_HEAL_PAUSE


def test_heal_states_are_bounded_and_forgotten_on_clear() -> None:
    clock = Clock()
    heals = HealBackoff(3, clock)
    for i in range(10):
        heals.healed(f"k{i}", token("t0"))
    assert len(heals._states) == 3
    assert heals.suspended_for("k9", token("t1")) == 30
    heals.clear()
    assert heals.suspended_for("k9", token("t1")) == 0


def test_pauses_double_and_end_on_success() -> None:
    clock = Clock()
    pauses = Pauses(10, first=5, cap=20, clock=clock)
    assert pauses.current("k") is None
    lengths = []
    for _ in range(4):
        pauses.failed("k", "malformed")
        current = pauses.current("k")
        assert current is not None and current[1] == "malformed"
        lengths.append(current[0])
        clock.now += current[0]
        assert pauses.current("k") is None
    assert lengths == [5, 10, 20, 20]
    pauses.failed("k", "malformed")
    pauses.succeeded("k")
    assert pauses.current("k") is None
    pauses.failed("k", "again")
    assert pauses.current("k") == (5, "again")
    pauses.clear()
    assert pauses.current("k") is None


def test_call_budget_per_key_per_minute() -> None:
    clock = Clock()
    budget = CallBudget(100, per_minute=3, clock=clock)
    assert [budget.take("acme") for _ in range(3)] == [0, 0, 0]
    assert budget.take("acme") == 60
    assert budget.take("octo") == 0  # another owner has its own budget
    clock.now += 60
    assert budget.take("acme") == 0
    budget.clear()
    assert [budget.take("acme") for _ in range(3)] == [0, 0, 0]


def test_call_budget_table_is_bounded() -> None:
    budget = CallBudget(5, per_minute=1)
    for i in range(1000):
        budget.take(f"owner-{i}")
    assert len(budget._calls) == 5
