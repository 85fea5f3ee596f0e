"""Discrete-event simulation of the Denoisers: the real policies and dispatch on a virtual clock.

    .venv/bin/python -m benchmarks.simulate                     # the table in docs/scheduling.md
    .venv/bin/python -m benchmarks.simulate --replicas 2 --profile scheduling/profiles/cpu-tiny.json \\
        --trace trace.json                                       # one recorded trace

Each replica runs a policy from scheduling/policy.py (the objects the engine runs) and takes one
forward at a time, costed by a profile (scheduling/cost_model.py). Three set-ups:

- today: co-batching up to the token budget; each request goes to a replica as it arrives (Ray
  Serve's default router: the less loaded of two random replicas, up to 32 requests each);
- fcfs: one request at a time per replica; requests wait in front, FIFO, for the first free replica;
- cost: the cost-aware policy; requests wait in front, FIFO, and go to a replica through
  scheduling/dispatch.py (least remaining work, within the horizon the replica's policy sets); a
  multi-image request splits over the replicas that admit work when scheduling/split.py says so.

A request's latency is its time in the Denoisers plus the profile's per-request overhead (text
encoding and decoding, which run on other replicas and are not queued here).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import math
import random
import statistics
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from api.schemas import PRESET_SIZES
from benchmarks.common import RESULTS_DIR, Result, markdown_table, render
from scheduling.cost_model import PROFILES, CostModel
from scheduling.dispatch import ReplicaLoad, choose_replica, replica_load
from scheduling.policy import Active, Policy, Waiting, make_policy
from scheduling.split import plan_split

SETUPS = {"today": ("cobatch", "early"), "fcfs": ("fcfs", "front"), "cost": ("cost", "split")}
MAX_ONGOING = 32  # Serve's max_ongoing_requests per Denoiser replica today


@dataclass
class Job:
    """One request of a workload or trace (times in seconds)."""

    at_s: float
    width: int
    height: int
    steps: int
    num_images: int = 1
    mode: str = "none"
    overhead_s: float | None = None  # outside the Denoiser; None: the profile's
    key: int = 0
    whole: Job | None = field(default=None, repr=False)  # a part of this split request
    parts: int = 1  # Denoiser calls it runs as
    parts_left: int = 0  # a split request: parts still running
    admitted_s: float = math.nan
    started_s: float = math.nan
    finished_s: float = math.nan
    largest_forward: int = 0  # samples in the largest forward it was part of
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = self.steps

    @property
    def image_tokens(self) -> int:
        return (self.width // 16) * (self.height // 16)

    def view(self) -> Active:
        return Active(self.key, self.admitted_s, ((self.height, self.width), self.mode), self.image_tokens,
                      self.num_images, self.mode, self.remaining, self.steps)

    def overhead(self, cost: CostModel) -> float:
        return cost.request_overhead_s if self.overhead_s is None else self.overhead_s

    def alone_s(self, cost: CostModel) -> float:
        return self.steps * cost.step_s(self.image_tokens, self.num_images, self.mode)


@dataclass
class Replica:
    policy: Policy
    jobs: list[Job] = field(default_factory=list)
    busy: bool = False

    def views(self) -> list[Active]:
        return [j.view() for j in self.jobs]


def simulate(jobs: list[Job], cost: CostModel, setup: str, replicas: int, max_batch_tokens: int = 16384,
             seed: int = 0, policy_options: dict | None = None) -> list[Job]:
    """Run `jobs` (copied) through `replicas` Denoisers; return them with their times filled in."""
    policy_name, dispatch = SETUPS[setup]
    jobs = [dataclasses.replace(j, key=i) for i, j in enumerate(jobs)]
    part_keys = itertools.count(len(jobs))
    reps = [Replica(make_policy(policy_name, cost, max_batch_tokens, **(policy_options or {})))
            for _ in range(replicas)]
    for rep in reps:
        rep.policy.replicas = replicas
    rng = random.Random(seed)
    events: list[tuple[float, int, str, object]] = []
    order = itertools.count()
    front: deque[Job] = deque()
    for job in jobs:
        heapq.heappush(events, (job.at_s, next(order), "arrive", job))

    def admit(rep: Replica, job: Job, now: float) -> None:
        job.admitted_s = now
        rep.jobs.append(job)
        rep.policy.admitted(job.view(), now)
        # As the router tells the replica with each request: what still waits in front after it.
        rep.policy.front.report("router", Waiting(len(front), sum(j.alone_s(cost) for j in front)), now)

    def place(now: float) -> None:
        while front:
            if dispatch == "early":  # Ray's power of two choices on ongoing requests
                pair = rng.sample(range(replicas), min(2, replicas))
                best = min(pair, key=lambda i: len(reps[i].jobs))
                if len(reps[best].jobs) >= MAX_ONGOING:
                    return
                admit(reps[best], front.popleft(), now)
                continue
            queued = len(front)  # what a router knows: its own queue
            loads = {}
            for i, r in enumerate(reps):
                load = replica_load(cost, r.policy, r.views(), now, up_to=queued)  # the same horizon, sooner
                loads[i] = ReplicaLoad(load.backlog_s, load.horizon_for(queued))
            job = front[0]
            if dispatch == "split" and job.num_images > 1 and job.whole is None:  # as GraphBackend.parts
                open_ = [load.backlog_s for load in loads.values() if load.backlog_s <= load.horizon_s]
                counts = plan_split(cost, job.image_tokens, job.num_images, job.steps, job.mode, open_,
                                    cost.part_overhead_s)
                if len(counts) > 1:
                    front.popleft()
                    job.parts = job.parts_left = len(counts)
                    front.extendleft(reversed([dataclasses.replace(job, num_images=n, key=next(part_keys), whole=job)
                                               for n in counts]))
                    continue
            chosen = choose_replica(loads)
            if chosen is None:
                return
            admit(reps[chosen], front.popleft(), now)

    def start(i: int, now: float) -> None:
        rep = reps[i]
        if rep.busy or not rep.jobs:
            return
        by_key = {j.key: j for j in rep.jobs}
        batch = [by_key[a.key] for a in rep.policy.pick(rep.views(), now)]  # as the engine: the front it was told
        head = batch[0]
        samples = sum(j.num_images for j in batch)
        for job in batch:
            job.largest_forward = max(job.largest_forward, samples)
            if math.isnan(job.started_s):
                job.started_s = now
                if job.whole is not None and math.isnan(job.whole.started_s):
                    job.whole.started_s = now
        rep.busy = True
        duration = cost.step_s(head.image_tokens, samples, head.mode)
        heapq.heappush(events, (now + duration, next(order), "step", (i, batch)))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            front.append(payload)
        else:
            i, batch = payload
            reps[i].busy = False
            for job in batch:
                job.remaining -= 1
                if job.remaining == 0:
                    job.finished_s = now + job.overhead(cost)
                    if job.whole is not None:  # the request ends with its last part
                        job.whole.parts_left -= 1
                        if job.whole.parts_left == 0:
                            job.whole.finished_s = job.finished_s + (job.whole.parts - 1) * cost.part_overhead_s
            reps[i].jobs = [j for j in reps[i].jobs if j.remaining > 0]
        place(now)
        for i in range(replicas):
            start(i, now)
    return jobs


def summary(jobs: list[Job], cost: CostModel) -> dict:
    latencies = sorted(j.finished_s - j.at_s for j in jobs)
    slowdowns = sorted((j.finished_s - j.at_s) / (j.alone_s(cost) + j.overhead(cost)) for j in jobs)
    waits = [j.started_s - j.at_s for j in jobs]
    span = max(j.finished_s for j in jobs) - min(j.at_s for j in jobs)
    return {
        "mean_s": statistics.fmean(latencies), "p50_s": quantile(latencies, 0.5), "p99_s": quantile(latencies, 0.99),
        "wait_s": statistics.fmean(waits), "throughput_rps": len(jobs) / span,
        "slowdown_p50": quantile(slowdowns, 0.5), "slowdown_p99": quantile(slowdowns, 0.99),
    }


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- workloads -------------------------------------------------------------------------------

def fixed_size(rng: random.Random) -> Job:
    return Job(0.0, 1024, 768, 28)


def fal_mix(rng: random.Random) -> Job:
    """A guess at fal's traffic (no published mix): mostly presets, some custom sizes, 1-4 images,
    10-50 steps around the default 28, a fifth image-to-image (strength shortens the schedule)."""
    sizes = list(PRESET_SIZES.values()) + [(1536, 640), (768, 1344), (1280, 1280)]
    weights = [20, 10, 8, 7, 30, 10, 5, 5, 5]
    width, height = rng.choices(sizes, weights)[0]
    steps = 28 if rng.random() < 0.6 else rng.randint(10, 50)
    if rng.random() < 0.2:  # image-to-image runs int(steps * strength) of them
        steps = max(1, int(steps * rng.uniform(0.6, 0.95)))
    num_images = rng.choices([1, 2, 4], [80, 12, 8])[0]
    return Job(0.0, width, height, steps, num_images)


WORKLOADS = {"1024x768": fixed_size, "fal-mix": fal_mix}


ARRIVALS = ("poisson", "bursty", "heavy")


def arrivals(rate: float, count: int, rng: random.Random, kind: str = "poisson") -> Iterable[float]:
    """Arrival times at a mean `rate`. poisson: exponential gaps; bursty: Poisson whose rate alternates
    between 3x and 1/3x (mean periods 30 s and 90 s, which keeps the mean); heavy: heavy-tailed gaps
    (Pareto, shape 1.5: finite mean, infinite variance), so long quiet spells and tight clusters."""
    if kind not in ARRIVALS:
        raise ValueError(f"unknown arrivals {kind!r}; choose from {', '.join(ARRIVALS)}")
    t = 0.0
    high_until, low_until = 0.0, 0.0
    shape = 1.5
    for _ in range(count):
        if kind == "heavy":
            t += rng.paretovariate(shape) * (shape - 1) / shape / rate  # Pareto's mean is shape / (shape - 1)
            yield t
            continue
        factor = 1.0
        if kind == "bursty":
            while t >= max(high_until, low_until):
                high_until = t + rng.expovariate(1 / 30)
                low_until = high_until + rng.expovariate(1 / 90)
            factor = 3.0 if t < high_until else 1 / 3
        t += rng.expovariate(rate * factor)
        yield t


def workload(name: str, load: float, replicas: int, count: int, cost: CostModel, seed: int,
             kind: str = "poisson") -> list[Job]:
    rng = random.Random(seed)
    shapes = [WORKLOADS[name](rng) for _ in range(count)]
    mean_alone = statistics.fmean(j.alone_s(cost) for j in shapes)
    rate = load * replicas / mean_alone  # load: of the replicas' capacity running one request at a time
    for job, at in zip(shapes, arrivals(rate, count, rng, kind)):
        job.at_s = at
    return shapes


# --- command line ----------------------------------------------------------------------------

def load_trace(path: Path) -> list[Job]:
    fields = {f.name for f in dataclasses.fields(Job) if f.init} - {"admitted_s", "started_s", "finished_s",
                                                                    "largest_forward"}
    return [Job(**{k: v for k, v in item.items() if k in fields}) for item in json.loads(path.read_text())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=PROFILES / "h100.json")
    parser.add_argument("--trace", type=Path, help="simulate this trace (JSON list of jobs) and print its latencies")
    parser.add_argument("--setups", default="today,fcfs,cost")
    parser.add_argument("--workloads", default="1024x768,fal-mix")
    parser.add_argument("--loads", default="0.5,0.8,0.95")
    parser.add_argument("--replicas", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=4000, help="per run")
    parser.add_argument("--arrivals", choices=ARRIVALS, default="poisson")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    cost = CostModel.load(args.profile)
    setups = args.setups.split(",")
    if args.trace:
        jobs = load_trace(args.trace)
        for setup in setups:
            for replicas in map(int, args.replicas.split(",")):
                print(json.dumps({"setup": setup, "replicas": replicas, **summary(simulate(jobs, cost, setup, replicas), cost)}))
        return
    header = ["workload", "replicas", "load"] + [f"{s}: mean / p50 / p99 (s)" for s in setups]
    rows, data = [], []
    for name in args.workloads.split(","):
        for replicas in map(int, args.replicas.split(",")):
            for load in map(float, args.loads.split(",")):
                jobs = workload(name, load, replicas, args.requests, cost, args.seed, args.arrivals)
                cells = []
                for setup in setups:
                    s = summary(simulate(jobs, cost, setup, replicas, seed=args.seed), cost)
                    data.append({"workload": name, "replicas": replicas, "load": load, "setup": setup, **s})
                    cells.append(f"{s['mean_s']:.1f} / {s['p50_s']:.1f} / {s['p99_s']:.1f}")
                rows.append([name, replicas, f"{load:.0%}", *cells])
                print(" | ".join(map(str, rows[-1])), flush=True)
    kind = args.profile.stem + ("" if args.arrivals == "poisson" else f"-{args.arrivals}")
    result = Result(
        name="simulate", kind=kind, title="Scheduling policies in simulation", device=f"simulated ({args.profile.name})",
        date=date.today().isoformat(), command=" ".join([".venv/bin/python -m benchmarks.simulate", *(sys.argv[1:] if argv is None else argv)]),
        software="benchmarks/simulate.py", weights="none (cost profile)", table=markdown_table(header, rows),
        notes=[(f"{args.requests} requests per run, seed {args.seed}; latency includes "
                f"{cost.profile.request_overhead_ms:.0f} ms per-request overhead outside the Denoiser.")],
        data={"runs": data},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"simulate.{kind}.json").write_text(json.dumps(asdict(result), indent=2))
    print(render(result))


if __name__ == "__main__":
    main()
