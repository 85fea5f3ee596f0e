"""(c) Throughput and p50/p99 latency under Poisson arrivals, per scheduling policy (one engine).

    .venv/bin/python -m benchmarks.load_test                                   # GPU, random FLUX.1-dev weights
    .venv/bin/python -m benchmarks.load_test --tiny --mix 128x128:4,192x128:6  # CPU smoke run

Engine level (no HTTP, no text encoder or VAE): requests drawn from a mix of sizes and step
counts arrive as a Poisson process at fractions of the measured capacity (a burst of the same
mix under co-batching: requests per second). Each load runs under each policy of
scheduling/policy.py (cost-aware, co-batching, one at a time, request-level), with the device's
shipped cost profile. Latency is submit to final latents; "slowdown" is a request's latency over the
same request's latency on an idle engine, so the target "p99 at 80% load <= 2x unloaded" reads
as p99 slowdown <= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time

from benchmarks.common import (
    bench_transformer, device_and_dtype, model_args, parse_list, parse_size, percentile, random_state, write_result,
)
from models.acceleration import Accelerator
from models.engine import DenoiseEngine
from scheduling.cost_model import CostModel, default_profile_path
from scheduling.policy import POLICIES, make_policy

Spec = tuple[int, int, int]  # width, height, steps


def parse_mix(text: str) -> list[Spec]:
    """'1024x768:28,512x512:20' -> [(1024, 768, 28), (512, 512, 20)]."""
    specs = []
    for item in text.split(","):
        size, steps = item.split(":")
        specs.append((*parse_size(size), int(steps)))
    return specs


class Bench:
    def __init__(self, transformer, accelerator: Accelerator, mode: str, budget: int, device, dtype) -> None:
        self.transformer, self.accelerator, self.mode = transformer, accelerator, mode
        self.budget, self.device, self.dtype = budget, device, dtype
        self.cost = CostModel.load(default_profile_path(device.type))

    def engine(self, policy: str) -> DenoiseEngine:
        return DenoiseEngine(self.transformer, self.budget, modules=self.accelerator.modules,
                             policy=make_policy(policy, self.cost, self.budget))

    async def run(self, engine: DenoiseEngine, spec: Spec, seed: int, delay: float) -> float:
        """Submit one request after `delay` seconds; its latency in seconds."""
        width, height, steps = spec
        state = random_state(self.transformer, width, height, steps, 1, seed, self.device, self.dtype)
        state.cache = self.accelerator.step_cache(self.mode)
        await asyncio.sleep(delay)
        began = time.perf_counter()
        await engine.submit(state, mode=self.mode)
        return time.perf_counter() - began

    async def unloaded(self, specs: list[Spec]) -> dict[Spec, float]:
        engine = self.engine("cobatch")
        for spec in specs:  # warm-up: first forwards of a shape pay for kernel selection
            await self.run(engine, spec, 0, 0.0)
        latencies = {spec: await self.run(engine, spec, 1, 0.0) for spec in specs}
        await engine.aclose()
        return latencies

    async def burst(self, specs: list[Spec], count: int) -> float:
        """Capacity in requests per second: `count` requests submitted at once, co-batching."""
        engine = self.engine("cobatch")
        began = time.perf_counter()
        await asyncio.gather(*(self.run(engine, specs[i % len(specs)], i, 0.0) for i in range(count)))
        elapsed = time.perf_counter() - began
        await engine.aclose()
        return count / elapsed

    async def poisson(self, policy: str, specs: list[Spec], rate: float, count: int, seed: int) -> dict:
        rng = random.Random(seed)
        arrivals, at = [], 0.0
        for i in range(count):
            at += rng.expovariate(rate)
            arrivals.append((rng.choice(specs), i, at))
        engine = self.engine(policy)
        began = time.perf_counter()
        latencies = await asyncio.gather(*(self.run(engine, spec, i, t) for spec, i, t in arrivals))
        elapsed = time.perf_counter() - began
        await engine.aclose()
        forwards = sum(engine.batch_sizes.values())
        samples = sum(k * v for k, v in engine.batch_sizes.items())
        return {
            "specs": [spec for spec, _, _ in arrivals],
            "latencies": latencies,
            "throughput": count / elapsed,
            "samples_per_forward": samples / forwards,
        }


async def measure(args: argparse.Namespace) -> tuple[list[list[object]], dict]:
    device, dtype = device_and_dtype(args)
    transformer = bench_transformer(args, device, dtype)
    accelerator = Accelerator(transformer, ["none", args.mode])
    mode, note = accelerator.resolve(args.mode)
    bench = Bench(transformer, accelerator, mode, args.max_batch_tokens, device, dtype)
    specs = parse_mix(args.mix)
    unloaded = await bench.unloaded(specs)
    capacity = await bench.burst(specs, args.requests)
    rows, data = [], {"capacity_rps": capacity, "unloaded_s": {str(k): v for k, v in unloaded.items()},
                      "mode": mode, "note": note, "runs": []}
    for load in parse_list(args.loads, float):
        for policy in parse_list(args.policies):
            run = await bench.poisson(policy, specs, load * capacity, args.requests, seed=int(load * 1000))
            slowdowns = [lat / unloaded[spec] for spec, lat in zip(run["specs"], run["latencies"])]
            rows.append([
                policy, f"{load:.0%}", f"{load * capacity:.2f}", f"{run['throughput']:.2f}",
                f"{statistics.median(run['latencies']):.2f}", f"{percentile(run['latencies'], 99):.2f}",
                f"{statistics.median(slowdowns):.2f}", f"{percentile(slowdowns, 99):.2f}",
                f"{run['samples_per_forward']:.2f}",
            ])
            data["runs"].append({"policy": policy, "load": load, **run, "slowdowns": slowdowns})
    return rows, data


def main(argv: list[str] | None = None) -> None:
    parser = model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--mix", default="1024x768:28,1024x1024:28,768x1024:20,512x512:28",
                        help="WIDTHxHEIGHT:STEPS,... drawn uniformly")
    parser.add_argument("--loads", default="0.5,0.8,1.2", help="fractions of the measured capacity")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--requests", type=int, default=40, help="requests per run (and in the capacity burst)")
    parser.add_argument("--mode", default="none", help="acceleration mode of every request")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    rows, data = asyncio.run(measure(args))
    header = ["policy", "load", "offered req/s", "achieved req/s", "p50 latency s", "p99 latency s",
              "p50 slowdown", "p99 slowdown", "samples per forward"]
    notes = [
        f"Mix {args.mix} (uniform), {args.requests} requests per run, mode `{data['mode']}`, "
        f"token budget {args.max_batch_tokens}; capacity {data['capacity_rps']:.2f} req/s "
        f"(burst of {args.requests}, co-batching).",
        "Slowdown: latency / the same request's latency on an idle engine. With this few requests per run "
        "p99 is close to the maximum.",
    ]
    if data["note"]:
        notes.append(data["note"])
    device, _ = device_and_dtype(args)
    write_result(args, argv, "load_test", "Poisson load per scheduling policy", device, header,
                 rows, notes, data)


if __name__ == "__main__":
    main()
