"""The controller's side of swapping: the swap book counts, per request and stage, the prefix its swap pool holds
(acknowledged write-backs), apart from the replicas'; a microbatch a stage could not swap in is recomputed from
its first token."""

from __future__ import annotations

from bus.messages import SwapFailed
from bus.replication import ReplicaBook
from bus.swap_book import SwapBook
from tests.bus.test_controller_core import answer, make, req


def test_the_swap_book_counts_acknowledged_write_backs_apart_from_the_replicas() -> None:
    core = make(mbs=2, size=2)
    core.book, core.swap_book = ReplicaBook(2), SwapBook(2)
    core.submit(b"c", req("a", [5, 6, 7], n=5), 0.0)
    (s,), _ = core.outbox.drain()
    answer(core, s, [11])
    (s2,), _ = core.outbox.drain()
    (r,) = core.sched.running()
    core.swap_book.ack(1, [[s.epoch, s.mb, s.step]], False)
    assert (core.swap_book.valid(1, r), core.book.valid(1, r), core.swap_book.valid(0, r)) == (3, 0, 0)
    core.swap_book.ack(1, [[s2.epoch, s2.mb, s2.step]], False)
    assert core.swap_book.valid(1, r) == 4
    core.swap_book.reset(1)  # a new swap pool (another host): it holds nothing
    assert core.swap_book.valid(1, r) == 0


def test_a_microbatch_that_could_not_swap_in_is_recomputed_from_its_first_token() -> None:
    core = make(mbs=2, size=2)
    core.submit(b"c", req("a", [5, 6, 7], n=5), 0.0)
    (s,), _ = core.outbox.drain()
    answer(core, s, [11])
    (s2,), _ = core.outbox.drain()
    assert [(c.start, c.length) for c in s2.chunks] == [(3, 1)]
    fail = SwapFailed(s2.epoch, s2.mb, s2.step, "swap-in failed")
    core.recompute_microbatch(fail.mb, fail.step + 1, 2.0)  # not the step in flight: nothing happens
    assert core.outbox.drain() == ([], [])
    core.recompute_microbatch(fail.mb, fail.step, 2.0)
    (s3,), out = core.outbox.drain()
    assert out == [] and [(c.start, c.length) for c in s3.chunks] == [(0, 4)] and s3.token_ids == [5, 6, 7, 11]
    answer(core, s3, [12])  # the recompute samples the next token, as the lost step would have
    (s4,), out = core.outbox.drain()
    assert out[0][1].token_ids == [12] and [(c.start, c.length) for c in s4.chunks] == [(4, 1)]
