"""Does the real system behave as the simulator says? One recorded trace, both ways.

    .venv/bin/python -m benchmarks.cost_profile --tiny --threads 1 --modes none \\
        --profile-out scheduling/profiles/cpu-tiny.json          # the CPU profile, same conditions
    .venv/bin/python -m benchmarks.sim_agreement [--requests 80] [--load 0.6]

Starts the Serve graph on the tiny model (CPU) with two Denoiser replicas (one torch thread each)
and the cost-aware policy, measures each trace size's unloaded latency (the per-request overhead
outside the Denoiser is that latency minus the profile's denoising time), then replays a Poisson
trace of mixed sizes and steps through HTTP at the recorded times. The same trace goes through
benchmarks/simulate.py with the CPU profile and the measured overhead; the table compares p50 and
p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import httpx

from benchmarks.common import RESULTS_DIR, Result, markdown_table, render
from benchmarks.simulate import Job, quantile, simulate, summary
from scheduling.cost_model import PROFILES, CostModel
from settings import get_settings
from tests.harness import running_serve, tiny_env

SIZES = [(512, 512), (1024, 768), (1024, 576)]
T2I = "/fal-ai/flux/srpo"


def make_trace(count: int, load: float, cost: CostModel, seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = [Job(0.0, *rng.choice(SIZES), rng.choice([8, 12, 16, 20])) for _ in range(count)]
    rate = load * 2 / statistics.fmean(j.alone_s(cost) + cost.request_overhead_s for j in jobs)
    t = 0.0
    for job in jobs:
        t += rng.expovariate(rate)
        job.at_s = round(t, 3)
    return jobs


def body(job: Job, seed: int) -> dict:
    return {"prompt": f"trace request {seed}", "seed": seed, "num_inference_steps": job.steps,
            "image_size": {"width": job.width, "height": job.height}, "enable_safety_checker": False}


async def replay(base: str, jobs: list[Job]) -> list[float]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        start = time.perf_counter()

        async def one(i: int, job: Job) -> float:
            await asyncio.sleep(max(0.0, start + job.at_s - time.perf_counter()))
            sent = time.perf_counter()
            response = await client.post(T2I, json=body(job, i))
            response.raise_for_status()
            return time.perf_counter() - sent

        return list(await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs))))


async def unloaded_overhead_s(base: str, cost: CostModel) -> float:
    """Median over the trace sizes of (unloaded latency - the profile's denoising time)."""
    overheads = []
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        for i, (width, height) in enumerate(SIZES * 3):
            job = Job(0.0, width, height, 8)
            sent = time.perf_counter()
            (await client.post(T2I, json=body(job, 10_000 + i))).raise_for_status()
            overheads.append(time.perf_counter() - sent - job.alone_s(cost))
    return statistics.median(overheads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--load", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--profile", type=Path, default=PROFILES / "cpu-tiny.json")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    cost = CostModel.load(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        env = tiny_env(get_settings().tiny_dir, Path(tmp), OMP_NUM_THREADS="1", SRPO_COST_PROFILE=str(args.profile))
        options = {"Denoiser": {"num_replicas": 2, "autoscaling_config": None}}
        with running_serve(env, {"deployment_options": options}) as base:
            overhead = asyncio.run(unloaded_overhead_s(base, cost))
            cost.profile.request_overhead_ms = overhead * 1000
            jobs = make_trace(args.requests, args.load, cost, args.seed)
            measured = sorted(asyncio.run(replay(base, jobs)))
    simulated = summary(simulate(jobs, cost, "cost", replicas=2), cost)
    real = {"mean_s": statistics.fmean(measured), "p50_s": quantile(measured, 0.5), "p99_s": quantile(measured, 0.99)}
    rows = [[name, f"{real[k]:.2f}", f"{simulated[k]:.2f}", f"{real[k] / simulated[k] - 1:+.0%}"]
            for name, k in (("mean", "mean_s"), ("p50", "p50_s"), ("p99", "p99_s"))]
    result = Result(
        name="sim_agreement", kind="cpu-tiny", title="Real system against the simulator (one trace)",
        device="CPU, tiny model, 2 Denoiser replicas (1 thread each)", date=date.today().isoformat(),
        command=" ".join([".venv/bin/python -m benchmarks.sim_agreement", *(argv or [])]),
        software="Ray Serve graph over HTTP vs benchmarks/simulate.py", weights="tiny preset (random, CPU)",
        table=markdown_table(["latency", "real (s)", "simulated (s)", "real vs simulated"], rows),
        notes=[f"{args.requests} requests, Poisson at {args.load:.0%} of two replicas' capacity, sizes {SIZES}, "
               f"8-20 steps; measured per-request overhead {overhead * 1000:.0f} ms."],
        data={"trace": [asdict(j) for j in jobs], "real_s": measured, "simulated": simulated},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim_agreement.cpu-tiny.json").write_text(json.dumps(asdict(result), indent=2, default=str))
    print(render(result))


if __name__ == "__main__":
    main()
