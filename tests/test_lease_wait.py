"""The lease waiter's clock (credentials.shared.LeaseWait), on a clock of the test's own: the holders get the
lease's life counted from when the waiter began, whatever a Redis writer does to the holder's value."""

from __future__ import annotations

from proxy.credentials.shared import LeaseWait

LEASE = 10.0  # the lease's life; a waiter gives up past LEASE + 1 s


def test_a_holder_that_keeps_changing_does_not_restart_the_clock() -> None:
    """Red team, round 4: a new holder value every 0.2 s used to restart the wait each time."""
    wait = LeaseWait(started=0.0, lease_ttl=LEASE)
    now, turn = 0.0, 0
    while now <= LEASE + 1:
        turn += 1
        assert not wait.note_holder(f"attacker-{turn}", now), f"gave up at {now:.1f} s, before the lease's life"
        now += 0.2
    # Past the deadline: a holder that was there before it is given up on at once.
    assert wait.note_holder(f"attacker-{turn}", now)
    assert wait.given_up_on == f"attacker-{turn}"


def test_a_holder_that_came_after_the_deadline_gets_half_a_lease_to_publish() -> None:
    """Another waiter that took the lease over just now is minting: it is not robbed at once (a second mint),
    but neither is a writer's fresh value waited on for ever."""
    wait = LeaseWait(started=0.0, lease_ttl=LEASE)
    deadline = LEASE + 1
    assert not wait.note_holder("peer", deadline + 0.1)  # appeared after the deadline
    assert not wait.note_holder("peer", deadline + LEASE / 2 - 0.1)
    assert wait.note_holder("peer", deadline + LEASE / 2 + 0.1)


def test_one_holder_is_given_up_on_once() -> None:
    wait = LeaseWait(started=0.0, lease_ttl=LEASE)
    assert not wait.note_holder("stuck", 1.0)
    assert wait.note_holder("stuck", LEASE + 2)
    assert not wait.note_holder("stuck", LEASE + 3)  # taking it over failed: the next look decides anew
    assert wait.over(2 * (LEASE + 1) + 0.1)
