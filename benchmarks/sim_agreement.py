"""Does the real system behave as the simulator says? One recorded trace, both ways.

    .venv/bin/python -m benchmarks.cost_profile --tiny --threads 1 --parallel 2 --modes none \\
        --profile-out scheduling/profiles/cpu-tiny.json          # the CPU profile
    .venv/bin/python -m benchmarks.sim_agreement [--requests 80] [--load 0.3]

Starts the Serve graph on the tiny model (CPU) with two Denoiser replicas (one torch thread each)
and the cost-aware policy, measures each trace size's unloaded time outside the Denoiser's forwards
(latency minus the forward time the Denoisers measured), then replays a trace of mixed sizes and
steps through HTTP at the recorded times (Poisson, or `--arrivals bursty`: the simulator's bursts).
The same trace goes through benchmarks/simulate.py twice: with the step costs the Denoisers
measured during the trace (on 2 cores the Decoder and the Ingress take CPU from them: steps are
slower than alone), and with the isolated CPU profile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import httpx

from benchmarks.common import RESULTS_DIR, Result, markdown_table, render
from benchmarks.simulate import ARRIVALS, Job, arrivals, quantile, simulate, summary
from scheduling.cost_model import PROFILES, CostModel, ProfilePoint
from settings import get_settings
from tests.harness import denoiser_stats, running_serve, tiny_env

SIZES = [(512, 512), (1024, 768), (1024, 1024)]
T2I = "/fal-ai/flux/srpo"
STEPS = [20, 28, 36]  # long enough that denoising, not the stages around it, dominates


def make_trace(count: int, load: float, cost: CostModel, overheads: dict[tuple[int, int], float],
               seed: int, kind: str = "poisson") -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        size = rng.choice(SIZES)
        jobs.append(Job(0.0, *size, rng.choice(STEPS), overhead_s=overheads[size]))
    rate = load * 2 / statistics.fmean(j.alone_s(cost) for j in jobs)  # of the Denoisers' capacity
    for job, at in zip(jobs, arrivals(rate, count, rng, kind)):
        job.at_s = round(at, 3)
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


def forward_tallies() -> dict[str, list[float]]:
    """Both Denoiser replicas' forwards so far, merged: "<image tokens>x<samples>" -> [count, seconds]."""
    merged: dict[str, list[float]] = {}
    for stats in denoiser_stats(2).values():
        for key, (count, seconds) in stats["forward_seconds"].items():
            merged.setdefault(key, [0, 0.0])
            merged[key][0] += count
            merged[key][1] += seconds
    return merged


def unloaded_overheads_s(base: str) -> dict[tuple[int, int], float]:
    """Per trace size: median of (unloaded latency - the forwards' own time, as the Denoisers measured
    it), the time spent outside the Denoiser's forwards (encoding, decoding the image, which grows with
    its size, admission and the hops)."""
    overheads: dict[tuple[int, int], list[float]] = {size: [] for size in SIZES}
    with httpx.Client(base_url=base, timeout=600) as client:
        for i, size in enumerate(SIZES * 3):
            before = forward_tallies()
            sent = time.perf_counter()
            client.post(T2I, json=body(Job(0.0, *size, 8), 10_000 + i)).raise_for_status()
            latency = time.perf_counter() - sent
            denoised = sum(seconds - before.get(key, [0, 0.0])[1] for key, (_, seconds) in forward_tallies().items())
            overheads[size].append(latency - denoised)
    return {size: statistics.median(values) for size, values in overheads.items()}


def in_situ_profile(isolated: CostModel, before: dict[str, list[float]]) -> CostModel:
    """The step costs the Denoisers saw during the trace (every forward after `before`), as a profile."""
    points = [ProfilePoint(image_tokens=int(key.split("x")[0]), batch=int(key.split("x")[1]),
                           step_ms=1000 * (seconds - before.get(key, [0, 0.0])[1]) / (count - before.get(key, [0])[0]))
              for key, (count, seconds) in forward_tallies().items() if count > before.get(key, [0])[0]]
    return CostModel(isolated.profile.model_copy(update={
        "modes": {"none": points}, "command": "forward times the Denoisers measured during the trace"}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv  # the result records the command as it was given
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--load", type=float, default=0.3, help="of two replicas' capacity by the isolated profile")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="as benchmarks.simulate's")
    parser.add_argument("--profile", type=Path, default=PROFILES / "cpu-tiny.json")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    cost = CostModel.load(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        # A burst holds many synchronous requests at once: none may be turned away (429) for the comparison.
        env = tiny_env(get_settings().tiny_dir, Path(tmp), OMP_NUM_THREADS="1", SRPO_COST_PROFILE=str(args.profile),
                       SRPO_SYNC_MAX_CONCURRENCY=str(args.requests))
        options = {"Denoiser": {"num_replicas": 2, "autoscaling_config": None}}
        with running_serve(env, {"deployment_options": options}) as base:
            overheads = unloaded_overheads_s(base)
            jobs = make_trace(args.requests, args.load, cost, overheads, args.seed, args.arrivals)
            before = forward_tallies()
            per_request = asyncio.run(replay(base, jobs))
            in_situ = in_situ_profile(cost, before)
            after_stats = list(denoiser_stats(2).values())
    measured = sorted(per_request)
    options = {"admit_ahead_s": 0.2}  # as the Denoiser sets it
    simulated_jobs = simulate(jobs, in_situ, "cost", replicas=2, policy_options=options)
    simulated = summary(simulated_jobs, in_situ)
    isolated = summary(simulate(jobs, cost, "cost", replicas=2, policy_options=options), cost)
    real = {"mean_s": statistics.fmean(measured), "p50_s": quantile(measured, 0.5), "p99_s": quantile(measured, 0.99)}
    rows = [[name, f"{real[k]:.2f}", f"{simulated[k]:.2f}", f"{real[k] / simulated[k] - 1:+.0%}",
             f"{isolated[k]:.2f}", f"{real[k] / isolated[k] - 1:+.0%}"]
            for name, k in (("mean", "mean_s"), ("p50", "p50_s"), ("p99", "p99_s"))]
    batch_sizes: dict[str, int] = {}  # forwards by samples, both replicas (shows whether a burst batched)
    for stats in after_stats:
        for size, count in stats["batch_sizes"].items():
            batch_sizes[str(size)] = batch_sizes.get(str(size), 0) + count
    kind = "cpu-tiny" + ("" if args.arrivals == "poisson" else f"-{args.arrivals}")
    result = Result(
        name="sim_agreement", kind=kind, title="Real system against the simulator (one trace)",
        device="CPU, tiny model, 2 Denoiser replicas (1 thread each)", date=date.today().isoformat(),
        command=" ".join([".venv/bin/python -m benchmarks.sim_agreement", *argv]),
        software="Ray Serve graph over HTTP vs benchmarks/simulate.py", weights="tiny preset (random, CPU)",
        table=markdown_table(["latency", "real (s)", "simulated, in-situ profile (s)", "real vs it",
                              "simulated, isolated profile (s)", "real vs it"], rows),
        notes=[f"{args.requests} requests, {args.arrivals} arrivals at {args.load:.0%} of two replicas' capacity, "
               f"sizes {SIZES}, {STEPS} steps; time outside the Denoiser, measured unloaded per size: "
               + ", ".join(f"{w}x{h} {s * 1000:.0f} ms" for (w, h), s in overheads.items()) + ".",
               "Forwards by samples (both replicas, whole run): "
               + ", ".join(f"{n}: {c}" for n, c in sorted(batch_sizes.items(), key=lambda i: int(i[0]))) + "."],
        data={"trace": [asdict(j) for j in jobs], "real_s": per_request, "simulated": simulated,
              "in_situ_profile": in_situ.profile.model_dump(), "simulated_isolated": isolated,
              "simulated_s": [j.finished_s - j.at_s for j in simulated_jobs]},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sim_agreement.{kind}.json").write_text(json.dumps(asdict(result), indent=2, default=str))
    print(render(result))


if __name__ == "__main__":
    main()
