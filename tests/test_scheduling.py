"""The scheduling policy, cost model and dispatch rule alone: no model, no Ray, a virtual clock."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from benchmarks.simulate import Job, simulate
from scheduling.cost_model import PROFILES, CostModel, Profile, ProfilePoint
from scheduling.dispatch import BacklogLedger, ReplicaLoad, choose_replica
from scheduling.policy import Active, CostAware, QueueInFront, Waiting
from scheduling.split import even_parts, plan_split

H100 = CostModel.load(PROFILES / "h100.json")


def active(key: int, *, tokens: int = 3072, remaining: int = 28, total: int = 28, arrived: float = 0.0,
           samples: int = 1, size: tuple[int, int] = (768, 1024)) -> Active:
    return Active(key, arrived, (size, "none"), tokens, samples, "none", remaining, total)


def flat_profile(batch_cost: dict[int, float]) -> CostModel:
    """A one-size profile whose forward of `b` samples costs batch_cost[b] ms."""
    points = [ProfilePoint(image_tokens=3072, batch=b, step_ms=ms) for b, ms in batch_cost.items()]
    return CostModel(Profile(device="test", date="2026-11-25", command="test", attention_tokens=18432,
                             modes={"none": points}))


def test_the_cost_model_returns_measured_points_and_interpolates_between_them():
    assert H100.step_s(3072, 1) == pytest.approx(0.143)
    assert H100.step_s(3072, 4) == pytest.approx(0.554)
    assert H100.step_s(3072, 2) == pytest.approx(0.282)
    assert 0.282 < H100.step_s(3072, 3) < 0.554
    assert H100.step_s(1024, 1) < H100.step_s(2304, 1) < H100.step_s(3072, 1) < H100.step_s(4096, 1)
    assert H100.step_s(3072, 1, "high") < H100.step_s(3072, 1, "regular") < H100.step_s(3072, 1)
    assert H100.step_s(3072, 1, "unprofiled") == H100.step_s(3072, 1)  # falls back to 'none'
    assert H100.step_s(4096, 8) > 2 * H100.step_s(4096, 4) * 0.95  # extrapolates past the largest batch


def test_a_profile_must_be_well_formed(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device": "x", "date": "x", "command": "x", "attention_tokens": 1,
                               "modes": {"none": [{"image_tokens": 3072, "batch": 0, "step_ms": 1}]}}))
    with pytest.raises(ValidationError, match="batch"):
        CostModel.load(bad)
    with pytest.raises(ValueError, match="'none'"):
        CostModel(Profile(device="x", date="x", command="x", attention_tokens=1, modes={}))


def test_batching_follows_the_cost_model():
    requests = [active(i) for i in range(4)]
    # A forward of 2 costs as much as two forwards of 1: nothing to gain, never batch, however long the queue.
    no_gain = CostAware(flat_profile({1: 100, 2: 200, 4: 400}), 16384)
    assert len(no_gain.pick(requests, 0.0, Waiting(requests=1000))) == 1
    # Nearly free batching: batch at once, even with nothing else waiting.
    cheap = CostAware(flat_profile({1: 100, 2: 105, 4: 115}), 16384)
    assert len(cheap.pick(requests, 0.0)) == 4
    # The H100 at 1024x768 saves ~1.5% per added sample: alone while the queue is short, batched when long.
    h100 = CostAware(H100, 16384)
    assert len(h100.pick(requests, 0.0)) == 1
    assert len(h100.pick(requests, 0.0, Waiting(requests=200, work_s=200 * 28 * 0.143))) == 4
    # ... but not when so little work waits that a batch of four (15.5 s) would make the tail.
    assert len(h100.pick(requests, 0.0, Waiting(requests=200, work_s=2.0))) < 4
    # The token budget caps the batch whatever the model says.
    assert len(CostAware(flat_profile({1: 100, 2: 105, 4: 115}), 2 * 3584).pick(requests, 0.0)) == 2


def test_small_images_batch_at_a_shorter_queue_than_large_ones():
    def threshold(tokens: int) -> int:
        policy = CostAware(H100, 16384)
        pair = [active(0, tokens=tokens), active(1, tokens=tokens)]
        return next(n for n in range(10_000) if len(policy.pick(pair, 0.0, Waiting(requests=n))) == 2)

    assert threshold(1024) < threshold(3072)


def test_requests_of_another_size_or_mode_never_share_a_forward():
    cheap = CostAware(flat_profile({1: 100, 2: 101, 4: 102}), 16384)
    other = Active(9, 0.0, ((1024, 1024), "none"), 4096, 1, "none", 28, 28)
    assert {a.key for a in cheap.pick([active(0), other, active(1)], 0.0)} == {0, 1}


def test_least_remaining_work_goes_first():
    policy = CostAware(H100, 16384)
    long_, short = active(0, remaining=28), active(1, remaining=5)
    assert policy.pick([long_, short], 1.0) == [short]


def test_no_starvation_under_a_stream_of_shorter_requests():
    """A 50-step 1024x1024 request, then a new 4-step 512x512 request every 0.2 s for 20 minutes (more
    work than the replica can do): least-remaining-first alone would never run the large one; with the
    wait bound it finishes within its bound plus its own run time."""
    big = Job(0.0, 1024, 1024, 50)
    small = [Job(0.1 + 0.2 * i, 512, 512, 4) for i in range(6000)]
    bounded = CostAware(H100, 16384)
    bound = bounded.wait_bound_s(active(0, tokens=4096, total=50))
    done = simulate([big, *small], H100, "cost", replicas=1)
    big_latency = done[0].finished_s - done[0].at_s
    assert big_latency <= bound + big.alone_s(H100) + H100.request_overhead_s + 1.0
    assert max(j.finished_s for j in done[1:]) > done[0].finished_s + 600  # the stream really outlasted it

    unbounded = simulate([big, *small[:1500]], H100, "cost", replicas=1, policy_options={"wait_factor": 1e9,
                                                                                        "wait_slack_s": 1e9})
    assert unbounded[0].finished_s > max(j.finished_s for j in unbounded[1:])  # the bound is what saved it


def test_dispatch_picks_the_least_loaded_replica_that_admits():
    loads = {"a": ReplicaLoad(2.0, 0.1), "b": ReplicaLoad(0.05, 0.1), "c": ReplicaLoad(0.0, 0.0)}
    assert choose_replica(loads) == "c"
    assert choose_replica({"a": ReplicaLoad(2.0, 0.1), "b": ReplicaLoad(0.05, 0.1)}) == "b"
    assert choose_replica({"a": ReplicaLoad(2.0, 0.1), "b": ReplicaLoad(0.5, 0.1)}) is None  # wait in front


def test_the_ledger_runs_reports_down_and_adds_what_was_sent_since():
    ledger = BacklogLedger(default_horizon_s=0.0)
    assert ledger.load("r", 10.0) == ReplicaLoad(0.0, 0.0)
    ledger.sent("r", "x", 4.0, now_s=10.0)
    assert ledger.load("r", 10.5).backlog_s == 4.0  # no report yet: all it was sent
    ledger.report("r", ReplicaLoad(4.0, 0.15), at_s=11.0)  # the report includes x
    assert ledger.load("r", 12.0) == ReplicaLoad(3.0, 0.15)
    ledger.sent("r", "y", 4.0, now_s=12.0)
    assert ledger.load("r", 12.0).backlog_s == 7.0
    ledger.completed("r", "y")
    ledger.report("r", ReplicaLoad(1.0, 0.15), at_s=10.5)  # older than the last report: ignored
    assert ledger.load("r", 13.0).backlog_s == 2.0
    ledger.forget("r")
    assert ledger.load("r", 13.0).backlog_s == 0.0


def test_multi_image_requests_split_only_over_free_replicas_and_only_when_faster():
    # 1024x768 fills an H100: four idle replicas finish four images ~3.9x sooner than one.
    assert plan_split(H100, 3072, 4, 28, "none", [0.0, 0.0, 0.0, 0.0], 0.02) == [1, 1, 1, 1]
    assert plan_split(H100, 3072, 4, 28, "none", [0.0, 0.0], 0.02) == [2, 2]
    assert plan_split(H100, 3072, 3, 28, "none", [0.0, 0.0], 0.02) == [2, 1]
    assert plan_split(H100, 3072, 4, 28, "none", [0.0], 0.02) == [4]  # one free replica: one call
    assert plan_split(H100, 3072, 4, 28, "none", [], 0.02) == [4]  # none free: the request waits whole
    # A second replica busy for longer than the whole request would take alone: no split.
    alone = 28 * H100.step_s(3072, 4)
    assert plan_split(H100, 3072, 4, 28, "none", [0.0, alone], 0.02) == [4]
    # Where batching is almost free, the extra call costs more than it saves.
    nearly_free = flat_profile({1: 100.0, 2: 101.0})
    assert plan_split(nearly_free, 3072, 2, 28, "none", [0.0, 0.0], 0.05) == [2]
    assert plan_split(nearly_free, 3072, 2, 28, "none", [0.0, 0.0], 0.0) == [1, 1]
    assert even_parts(4, 3) == [2, 1, 1] and even_parts(2, 2) == [1, 1]


def test_the_simulator_splits_a_four_image_request_over_four_idle_replicas():
    request = Job(0.0, 1024, 768, 28, num_images=4)
    whole = simulate([request], H100, "fcfs", replicas=4)[0]
    split = simulate([request], H100, "cost", replicas=4)[0]
    assert whole.finished_s == pytest.approx(28 * H100.step_s(3072, 4) + H100.request_overhead_s)
    assert split.finished_s == pytest.approx(28 * H100.step_s(3072, 1) + H100.request_overhead_s
                                             + 3 * H100.part_overhead_s)
    assert split.finished_s < whole.finished_s / 3.5


def test_a_request_sent_just_before_a_report_stays_counted_until_the_replica_can_have_it():
    ledger = BacklogLedger(default_horizon_s=0.0, in_flight_s=0.1)
    ledger.sent("r", "x", 2.0, now_s=10.0)
    ledger.report("r", ReplicaLoad(0.0, 0.15), at_s=10.05)  # x may still be on its way: keep it
    assert ledger.load("r", 10.05).backlog_s == 2.0
    ledger.report("r", ReplicaLoad(2.0, 0.15), at_s=10.2)  # long enough after: the report has it
    assert ledger.load("r", 10.2).backlog_s == 2.0


def test_a_deep_queue_in_front_makes_replicas_batch_and_an_empty_one_makes_them_run_alone():
    """Eight H100 replicas, 1024x768 (a batch of three saves ~2% of device time): 400 requests in the
    first 10 s leave hundreds waiting in front, and the replicas batch them; once the queue has
    drained, requests 20 s apart find nothing in front and run alone. (A policy blind to the queue in
    front runs all 400 alone, as fcfs does.)"""
    burst = [Job(i * 0.025, 1024, 768, 28) for i in range(400)]
    quiet = [Job(600.0 + 20 * i, 1024, 768, 28) for i in range(20)]
    done = simulate([*burst, *quiet], H100, "cost", replicas=8)
    assert max(j.finished_s for j in done[:400]) < 600  # the burst was over before the quiet part
    batched = sum(j.largest_forward >= 3 for j in done[:400])
    assert batched >= 120, f"only {batched} of 400 burst requests ran in batches of three or more"
    assert all(j.largest_forward == 1 for j in done[400:])
    # Batching is what drained the burst sooner than one request at a time would have.
    alone = simulate([*burst, *quiet], H100, "fcfs", replicas=8)
    assert max(j.finished_s for j in done[:400]) < max(j.finished_s for j in alone[:400])


def test_the_queue_in_front_adds_its_sources_and_runs_down_between_reports():
    front = QueueInFront()
    front.report("router a", Waiting(10, 40.0), at_s=100.0)
    front.report("store", Waiting(5, 20.0), at_s=101.0)
    assert front.at(101.0, replicas=2) == Waiting(pytest.approx(14.5), pytest.approx(58.0))
    assert front.at(130.0, replicas=2) == Waiting(0.0, 0.0)  # two replicas drained 60 s of work by then
    front.report("router a", Waiting(1, 4.0), at_s=102.0)  # a newer report replaces the router's last
    assert front.at(102.0, replicas=1) == Waiting(pytest.approx(5.75), pytest.approx(23.0))


def busy_all_window(replicas: int) -> CostAware:
    """One of `replicas` H100 replicas that admitted a 1024x768 request every 4 s for 5 minutes: its
    admissions read a load of 1, as at 95% load with work waiting in front, as in overload."""
    policy = CostAware(H100, 16384)
    policy.replicas = replicas
    for i in range(75):
        policy.admitted(active(i), 4.0 * i)
    return policy


def test_a_replica_busy_all_window_runs_alone_while_the_queue_in_front_is_short():
    """One of eight H100 replicas has admitted a 4 s request every 4 s for 5 minutes (its admissions read
    a load of 1, as at 95% load with work waiting in front as in overload). A queue of a few requests in
    front, usual at 95%, is no sign of a long busy period: it runs alone; hundreds waiting (each replica's
    share of them is behind its next forward): it batches."""
    policy = busy_all_window(replicas=8)
    held = [active(100 + i) for i in range(4)]
    assert policy.load.rates(300.0)[1] >= 0.98
    assert len(policy.pick(held, 300.0, Waiting(requests=4, work_s=16.0))) == 1
    assert len(policy.pick(held, 300.0, Waiting(requests=600, work_s=2400.0))) == 4


def test_the_queue_in_fronts_work_lengthens_a_lone_replicas_busy_period_not_each_of_eights():
    """The same 20 requests waiting: a lone replica runs all of them, so their work is its busy period
    and it batches; each of eight runs an eighth, and counting the whole queue's work in every replica's
    busy period (counted ~R / (1 - rho) times over) made replicas batch at steady Poisson loads."""
    def picked(replicas: int) -> int:
        policy = busy_all_window(replicas)
        return len(policy.pick([active(100 + i) for i in range(4)], 300.0, Waiting(requests=20, work_s=80.0)))

    assert picked(1) == 4
    assert picked(8) == 1


def test_a_replicas_own_backlog_counts_its_busy_period_at_the_load_it_reads():
    """One of eight replicas busy all window (its admissions read a load of 1) holds four 1024x768
    requests, 15 more per replica wait in front: its own 16 s are the start of a long busy period, whose
    arrivals count with the load up to 0.98, and it batches. (Capped at 0.9 like a lone replica's, whose
    busy period holds the queue's work too, it ran alone, and fal's mix on 4 replicas at 95% lost 2% of
    its mean to the 2026-12-01 table.)"""
    policy = busy_all_window(replicas=8)
    assert len(policy.pick([active(100 + i) for i in range(4)], 300.0, Waiting(requests=120, work_s=480.0))) == 3


def test_the_room_for_a_batch_shrinks_as_more_replicas_share_the_queue_in_front():
    """Where batching pays, a replica takes room for a batch beyond one forward; what it holds there waits
    while another replica might free first, so each of R replicas takes 4 / R batches' worth (a lone
    replica four: it has no other to keep work for), and never less than one forward."""
    def room(replicas: int) -> float:
        policy = busy_all_window(replicas)
        return policy.horizon_s([active(100)], 300.0, Waiting(requests=600, work_s=2400.0))

    batch_s = 3 * 28 * H100.step_s(3072, 1)  # three more 1024x768 requests: a batch of four
    assert room(1) == pytest.approx(4 * batch_s)
    assert room(4) == pytest.approx(batch_s)
    assert room(8) == pytest.approx(batch_s / 2)
    assert room(16) == pytest.approx(batch_s / 4)
