"""The denoising engine driven directly (asyncio, no Ray): whatever shares a forward, and whenever a
request arrives or leaves, every request's result equals what it gets alone (fp32, CPU)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from models.denoise import DenoiseState, start_state
from models.engine import DenoiseEngine
from models.pipeline import SRPOPipeline
from models.request import GenerationRequest
from scheduling.cost_model import CostModel, default_profile_path
from scheduling.policy import POLICIES, Policy, make_policy
from tests.conftest import CPU

SIZES = [(128, 128), (192, 128), (128, 192)]  # (width, height)


class Recorder:
    """A transformer stand-in that logs (module name, samples, resolution) of each forward."""

    def __init__(self, transformer, name: str, log: list[tuple[str, int, int]]) -> None:
        self.transformer, self.name, self.log = transformer, name, log
        self.config = transformer.config

    def __call__(self, **inputs):
        self.log.append((self.name, inputs["hidden_states"].shape[0], inputs["hidden_states"].shape[1]))
        return self.transformer(**inputs)


@dataclass
class Arrival:
    index: int
    at: int  # forwards done before the request arrives
    request: GenerationRequest
    state: DenoiseState
    mode: str = "none"
    cancel_at: int | None = None  # the request cancels itself after this many of its steps
    steps_seen: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> SRPOPipeline:
    return SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)


def engine_state(pipe: SRPOPipeline, request: GenerationRequest) -> DenoiseState:
    embedding = pipe.text.encode([request.prompt])[0]
    image_start = None
    if request.image is not None:
        image_start = pipe.vae.encode_with_noise(
            request.image, request.height, request.width, request.seed, request.num_images
        )
    return start_state(request, pipe.scheduler_config, embedding.prompt_embeds, embedding.pooled, CPU,
                       torch.float32, image_start)


def random_requests(pipe: SRPOPipeline, count: int, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    arrivals = []
    for i in range(count):
        width, height = rng.choice(SIZES)
        image, strength = None, 1.0
        if rng.random() < 0.35:
            pixels = np.random.RandomState(i).randint(0, 256, (height, width, 3), dtype=np.uint8)
            image, strength = Image.fromarray(pixels), rng.choice([0.4, 0.7, 1.0])
        request = GenerationRequest(
            prompt=f"request {i}", width=width, height=height, num_inference_steps=rng.randint(3, 7),
            guidance_scale=rng.choice([1.0, 3.5, 7.0]), seed=rng.randint(0, 2**31), num_images=rng.randint(1, 3),
            image=image, strength=strength,
        )
        arrivals.append(Arrival(i, rng.randint(0, 14), request, engine_state(pipe, request),
                                mode=rng.choice(["none", "alt"])))
    return arrivals


async def drive(engine: DenoiseEngine, arrivals: list[Arrival], log: list) -> dict[int, asyncio.Future]:
    """Submit each request once `at` forwards are done (right after that forward, from a progress
    hook, so it can join the very next one), or at once when the engine is idle."""
    pending = sorted(arrivals, key=lambda a: (a.at, a.index))
    futures: dict[int, asyncio.Future] = {}

    def forwards() -> int:
        return sum(engine.batch_sizes.values())

    def on_step(arrival: Arrival, done: int, total: int) -> None:
        name, _, tokens = log[-1]  # the forward that just advanced this request
        assert (name, tokens) == (arrival.mode, arrival.state.latents.shape[1]), "a forward mixed groups"
        arrival.steps_seen.append(done)
        if done == arrival.cancel_at:
            before = engine.active
            futures[arrival.index].cancel()
            assert engine.active == before - 1
        admit()

    def admit(force: bool = False) -> None:
        while pending and (force or pending[0].at <= forwards()):
            a = pending.pop(0)
            futures[a.index] = engine.submit(a.state, lambda d, t, a=a: on_step(a, d, t), mode=a.mode)
            force = False

    admit()
    while pending or any(not f.done() for f in futures.values()):
        waiting = [f for f in futures.values() if not f.done()]
        if not waiting:
            admit(force=True)
            continue
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    return futures


def alone(pipe: SRPOPipeline, request: GenerationRequest):
    return pipe.generate(request, enable_safety_checker=False)


def assert_same_as_alone(pipe: SRPOPipeline, arrival: Arrival, latents: torch.Tensor) -> None:
    reference = alone(pipe, arrival.request)
    torch.testing.assert_close(latents, reference.latents, rtol=0, atol=1e-5)
    images = pipe.vae.decode(latents, arrival.request.height, arrival.request.width)
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(images, reference.images))
    assert diff <= 1


def make_policy_for(name: str, budget: int) -> Policy:
    return make_policy(name, CostModel.load(default_profile_path("cpu")), budget)


def make_engine(pipe: SRPOPipeline, log: list, policy: str) -> DenoiseEngine:
    budget = 4 * (64 + 512)  # four 128x128 samples: forces the budget rule to split groups
    return DenoiseEngine(Recorder(pipe.transformer, "none", log), budget,
                         modules={"alt": Recorder(pipe.transformer, "alt", log)}, policy=make_policy_for(policy, budget))


@pytest.mark.parametrize("policy", POLICIES)
def test_random_arrivals_mixed_requests_and_a_cancel_match_running_alone(pipe, policy):
    log: list = []
    engine = make_engine(pipe, log, policy)
    arrivals = random_requests(pipe, 12, seed=5)
    victim = next(a for a in arrivals if a.state.schedule.num_steps >= 4)
    victim.cancel_at = 2
    futures = asyncio.run(drive(engine, arrivals, log))

    assert futures[victim.index].cancelled()
    assert victim.steps_seen == [1, 2] and victim.state.step == 2  # no forward after the cancel took it
    assert engine.active == 0
    for arrival in arrivals:
        if arrival is not victim:
            assert arrival.steps_seen == list(range(1, arrival.state.schedule.num_steps + 1))
            assert_same_as_alone(pipe, arrival, futures[arrival.index].result())
    expected = sum(a.state.step * a.state.num_samples for a in arrivals)
    assert sum(k * v for k, v in engine.batch_sizes.items()) == expected == sum(n for _, n, _ in log)
    if policy != "fcfs":
        assert max(engine.batch_sizes) > 1  # requests did share forwards
    assert all(n * (tokens + 512) <= engine.max_batch_tokens for _, n, tokens in log)  # every request fits


def _request(seed: int, steps: int, width: int = 128, height: int = 128) -> GenerationRequest:
    return GenerationRequest(prompt="a join", width=width, height=height, num_inference_steps=steps,
                             guidance_scale=3.5, seed=seed)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_request_joins_at_the_next_step_or_waits_for_the_batch(pipe, policy):
    first = engine_state(pipe, _request(1, 6))
    second = engine_state(pipe, _request(2, 3))
    seen_first_at_join: list[int] = []

    async def scenario():
        engine = DenoiseEngine(pipe.transformer, 16384, policy=make_policy_for(policy, 16384))
        futures = []

        def on_first(done: int, total: int) -> None:
            if done == 2:
                futures.append(engine.submit(second, on_second))

        def on_second(done: int, total: int) -> None:
            if done == 1:
                seen_first_at_join.append(first.step)

        futures.append(engine.submit(first, on_first))
        await asyncio.wait_for(futures[0], 120)  # its second step submitted the other request
        return [await asyncio.wait_for(f, 120) for f in futures]

    latents = asyncio.run(scenario())
    # Co-batching: the second request's first step shares the first's third forward. Request-level
    # and one-at-a-time: it waits until the first request is done. Cost-aware: the second has less
    # left (3 steps against 4), so it runs at the next forward, with or without the first.
    expected = {"cobatch": [3], "request": [6], "fcfs": [6], "cost": [2, 3]}[policy]
    assert len(seen_first_at_join) == 1 and seen_first_at_join[0] in expected
    for request, result in zip([_request(1, 6), _request(2, 3)], latents):
        torch.testing.assert_close(result, alone(pipe, request).latents, rtol=0, atol=1e-5)


def test_oldest_request_always_runs_so_other_sizes_do_not_starve(pipe):
    """A (128x128) then B (192x128) then C (128x128): C may join A, but B runs as soon as A is
    done, before C's remaining steps, because B is then the oldest."""
    a, b, c = (engine_state(pipe, r) for r in [_request(1, 3), _request(2, 2, width=192), _request(3, 6)])
    order: list[str] = []

    async def scenario():
        engine = DenoiseEngine(pipe.transformer, 16384)
        futures = [engine.submit(s, lambda d, t, n=n: order.append(n)) for n, s in zip("abc", (a, b, c))]
        await asyncio.gather(*futures)

    asyncio.run(scenario())
    assert order == ["a", "c", "a", "c", "a", "c", "b", "b", "c", "c", "c"]
