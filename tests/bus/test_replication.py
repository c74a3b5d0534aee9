"""The controller's replica book (bus/replication.py) and the rollback it drives: which positions of each request
a stage's replica holds, from acknowledgements that may come out of order, a whole-pool re-sync, or a replica
replaced; where each stage's replica goes; and the scheduler going back to what every stage holds."""

from __future__ import annotations

from bus.messages import Chunk, Sampling, StepRequest
from bus.replication import ReplicaBook, replica_holders
from bus.requests import Request
from bus.scheduler import Scheduler


def req(name: str, prompt: int = 5) -> Request:
    return Request(b"c", name, list(range(1, prompt + 1)), 50, Sampling(), frozenset(), None)


def step(mb: int, n: int, chunks: list[tuple[Request, int, int]]) -> tuple[StepRequest, list[tuple[Request, int, bool]]]:
    """A step of microbatch `mb` numbered `n`: each member feeds [start, start + length)."""
    cs = [Chunk(r.slot if r.slot is not None else i, start, length) for i, (r, start, length) in enumerate(chunks)]
    body = StepRequest(1, mb, n, cs, [], [Sampling()] * len(cs))
    return body, [(r, length, True) for r, _, length in chunks]


def test_acks_out_of_order_count_only_the_unbroken_prefix() -> None:
    book = ReplicaBook(num_stages=2)
    a, b = req("a"), req("b", 3)
    for n, chunks in enumerate([[(a, 0, 5), (b, 0, 3)], [(a, 5, 1), (b, 3, 1)], [(a, 6, 1), (b, 4, 1)]], start=1):
        book.record(*step(0, n, chunks))
    book.ack(1, [[1, 0, 3]], sync=False)  # the newest first: rows [6, 7) landed, but [0, 6) not yet
    assert (book.valid(1, a), book.valid(1, b)) == (0, 0)
    book.ack(1, [[1, 0, 1]], sync=False)
    assert (book.valid(1, a), book.valid(1, b)) == (5, 3)
    book.ack(1, [[1, 0, 2]], sync=False)  # fills the gap: the held-back step 3 counts now
    assert (book.valid(1, a), book.valid(1, b)) == (7, 5)
    assert book.valid(0, a) == 0  # per stage


def test_a_resync_counts_everything_up_to_the_step_it_covers_and_a_new_replica_counts_nothing() -> None:
    book = ReplicaBook(num_stages=1)
    a = req("a")
    book.record(*step(0, 1, [(a, 0, 5)]))
    book.record(*step(0, 2, [(a, 5, 1)]))
    book.ack(0, [[1, 0, 2]], sync=False)  # a delta alone does not count: [0, 5) is missing
    assert book.valid(0, a) == 0
    book.ack(0, [[1, 0, 2]], sync=True)  # the whole pool after step 2: [0, 6)
    assert book.valid(0, a) == 6
    book.reset(0)  # the replica's host was lost: a new, empty replica
    assert book.valid(0, a) == 0
    book.ack(0, [[1, 0, 1]], sync=False)
    assert book.valid(0, a) == 5


def test_a_long_resync_does_not_lose_the_deltas_acknowledged_meanwhile() -> None:
    """A replica re-synced whole after its host was lost: while the sync runs (here 100 decode steps), each step's
    delta lands beyond the missing prefix; once the sync's acknowledgement fills [0, 5), every one of them counts."""
    book = ReplicaBook(num_stages=1)
    a = req("a")
    book.record(*step(0, 1, [(a, 0, 5)]))
    for n in range(2, 102):
        book.record(*step(0, n, [(a, 3 + n, 1)]))
        book.ack(0, [[1, 0, n]], sync=False)
    assert book.valid(0, a) == 0
    book.ack(0, [[1, 0, 1]], sync=True)
    assert book.valid(0, a) == 105


def test_unknown_steps_finished_requests_and_bad_pairs_are_ignored() -> None:
    book = ReplicaBook(num_stages=1, keep_steps=2)
    a, done = req("a"), req("done")
    done.done = True
    for n in range(1, 5):
        book.record(*step(0, n, [(a, 0 if n == 1 else 4 + n, 5 if n == 1 else 1), (done, 0, 1)]))
    book.ack(0, [[1, 0, 1], [3], [1, 7, 7], [1, 0, 99], [2, 0, 4]], sync=False)  # step 1 fell out of the history
    # (keep_steps=2); step 4 of epoch 2 is another controller's
    assert book.valid(0, a) == 0 and done.replicated == {}
    book.ack(5, [[1, 0, 4]], sync=False)  # no such stage
    assert book.valid(0, a) == 0


def test_lag_counts_steps_and_positions_not_yet_in_the_replica() -> None:
    book = ReplicaBook(num_stages=1)
    a = req("a")
    a.mb, a.slot = 0, 0
    for n, (start, length) in enumerate([(0, 5), (5, 1), (6, 1)], start=1):
        book.record(*step(0, n, [(a, start, length)]))
        book.complete(0, n)
    a.cached = 7
    assert book.lag(0, [a]) == (3, 7)
    book.ack(0, [[1, 0, 1]], sync=False)
    assert book.lag(0, [a]) == (2, 2)
    book.ack(0, [[1, 0, 2], [1, 0, 3]], sync=False)
    assert book.lag(0, [a]) == (0, 0)


def test_replicas_go_to_the_next_host_around_the_ring() -> None:
    assert replica_holders(["a", "b", "c"]) == [1, 2, 0]
    assert replica_holders(["a", "a", "b", "b"]) == [2, 2, 0, 0]  # blocks of stages: still off the host
    assert replica_holders(["a", "b", "b"]) == [1, 0, 0]
    assert replica_holders(["a", "a"]) == [1, 0]  # one host: the next stage (the replica dies with the host)
    assert replica_holders(["a"]) == [0]


def test_the_scheduler_goes_back_to_what_every_stage_holds() -> None:
    s = Scheduler(num_microbatches=1, microbatch_size=2)
    a, b = req("a"), req("b")
    s.enqueue(a)
    s.enqueue(b)
    s.next_steps(0.0)
    s.complete(0, 1)
    a.generated.append(7)  # the tokens the step sampled, committed
    b.generated.append(8)
    assert (a.cached, b.cached) == (5, 5)
    s.reset_epoch(2, valid=lambda r: 3 if r is a else 9)  # never beyond what the request had cached
    assert (a.cached, b.cached) == (3, 5)
    (nxt,) = s.next_steps(1.0)  # replay: the tokens after the watermark are fed again
    assert [(c.start, c.length) for c in nxt.chunks] == [(3, 3), (5, 1)]
    assert nxt.token_ids == [4, 5, 7, 8]
    s.reset_epoch(3, keep_cache=False)
    assert (a.cached, b.cached) == (0, 0)
