"""The compile budget on CPU (inductor, tiny model), measured as tests/test_compile_budget.py does:
graphs compiled and seconds spent by `Accelerator.warm_up` at the revision's own warm-up grid, then
the graphs that serving mixed sizes, batches 1-5 and step-cache subsets still compiles.

Runs against any revision from before the compile-budget change on (an older checkout on
PYTHONPATH), so `regular` is let compile on the CPU by allowing every plan without fp8 rather than
through SRPO_COMPILE_ON_CPU, which older revisions lack. Use an empty inductor cache:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) .venv/bin/python -m benchmarks.compile_budget
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import models.acceleration as acceleration
from models.denoise import denoise_step, start_state
from models.loading import load_scheduler_config, load_transformer
from models.request import GenerationRequest
from models.step_cache import StepCache
from models.tiny import ensure_tiny_model

CPU = torch.device("cpu")
# fal's six presets and odd sizes, as in tests/test_compile_budget.py
SERVED_SIZES = ((1024, 768), (1024, 1024), (512, 512), (768, 1024), (576, 1024), (1024, 576),
                (1008, 592), (336, 1520), (32, 48))


def serve_mixed(module, config: dict) -> None:
    """Two requests per size (one always recomputing, one always reusing its cache), two steps each."""
    for n, (width, height) in enumerate(SERVED_SIZES):
        states = []
        for seed, threshold in ((n, 0.0), (n + 100, 1e9)):
            request = GenerationRequest(prompt="", width=width, height=height, num_inference_steps=3,
                                        guidance_scale=3.5, seed=seed, num_images=min(1 + n % 5, 4))
            state = start_state(request, config, torch.zeros(1, 512, module.config.joint_attention_dim),
                                torch.zeros(1, module.config.pooled_projection_dim), CPU, torch.float32)
            state.cache = StepCache(threshold)
            states.append(state)
        for _ in range(2):
            denoise_step(module, states)


def main() -> None:
    acceleration.unavailable_reason = lambda plan, device, *_: "fp8 needs a GPU" if plan.fp8 else None
    model_dir, _ = ensure_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    config = load_scheduler_config(model_dir)
    accelerator = acceleration.Accelerator(load_transformer(model_dir, CPU, torch.float32), ["none", "regular"])
    began = time.perf_counter()
    accelerator.warm_up(config, torch.float32, acceleration.WARMUP_SIZES, acceleration.WARMUP_BATCH_SIZES)
    warm_up_s, warm_graphs = time.perf_counter() - began, counters["stats"]["unique_graphs"]
    began = time.perf_counter()
    serve_mixed(accelerator.modules["regular"], config)
    print(f"{acceleration.__file__}: warm-up at {len(acceleration.WARMUP_SIZES)} sizes x batches "
          f"{acceleration.WARMUP_BATCH_SIZES}: {warm_graphs} graphs in {warm_up_s:.1f} s; then serving "
          f"{len(SERVED_SIZES)} sizes, batches 1-5, cache subsets: "
          f"{counters['stats']['unique_graphs'] - warm_graphs} more graphs in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
