"""(a) Transformer step latency per acceleration mode and batch size, against the bf16 compute floor.

    .venv/bin/python -m benchmarks.step_latency                       # GPU, random FLUX.1-dev weights
    .venv/bin/python -m benchmarks.step_latency --tiny --size 256x256 # CPU smoke run

"full step": one denoising step (transformer forward + Euler update) with every block run; in the
cached modes through the cache-aware forward (threshold 0), so its bookkeeping is included.
"reused step": the same step when every sample reuses its step cache (first block, embedders and
final layers only), the cost of a skipped step in the cached modes. A mode's effective step time
is full * (1 - r) + reused * r for a reuse rate r (see quality.py for r).
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.common import (
    PEAK_BF16_TFLOPS, bench_transformer, device_and_dtype, format_flops, median_seconds, model_args, parse_list,
    parse_size, random_state, step_flops, write_result,
)
from models.acceleration import PLANS, Accelerator
from models.denoise import DenoiseState, denoise_step
from models.step_cache import StepCache


def one_step(module, state: DenoiseState) -> None:
    state.step = 0  # stay on the first step of the schedule: every repeat times the same work
    denoise_step(module, [state])


def main(argv: list[str] | None = None) -> None:
    parser = model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--modes", default="none,regular,high")
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--size", default="1024x768", help="width x height")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    width, height = parse_size(args.size)
    transformer = bench_transformer(args, device, dtype)
    modes = parse_list(args.modes)
    accelerator = Accelerator(transformer, modes)
    rows, data = [], []
    for mode in modes:
        if mode in accelerator.unavailable:
            rows.append([mode, "-", f"unavailable on {device.type}: {accelerator.unavailable[mode]}", "", "", "", ""])
            continue
        module = accelerator.modules[mode]
        for batch in parse_list(args.batch_sizes, int):
            state = random_state(transformer, width, height, 28, batch, 0, device, dtype)
            if PLANS[mode].cache_threshold is not None:
                state.cache = StepCache(threshold=0.0)
            full = median_seconds(lambda: one_step(module, state), device, args.repeats, warmup=2)
            state.cache = StepCache(threshold=float("inf"))
            one_step(module, state)  # fills the cache; from now on every sample reuses it
            reused = median_seconds(lambda: one_step(module, state), device, args.repeats)
            flops = step_flops(dict(transformer.config), width, height, batch)
            floor = flops / (args.peak_tflops * 1e12)
            on_gpu = device.type == "cuda"
            rows.append([
                mode, batch, f"{full * 1e3:.1f}", f"{full * 1e3 / batch:.1f}", f"{reused * 1e3:.1f}",
                f"{floor * 1e3:.1f}" if on_gpu else "n/a (CPU)", f"{floor / full:.0%}" if on_gpu else "n/a",
            ])
            data.append({"mode": mode, "batch": batch, "full_s": full, "reused_s": reused, "flops": flops,
                         "cache_threshold": PLANS[mode].cache_threshold})
    blocks = transformer.config.num_layers + transformer.config.num_single_layers
    header = ["mode", "batch", "full step ms", "ms per image", "reused step ms", "bf16 floor ms", "floor / full"]
    notes = [
        f"{width}x{height}; {format_flops(step_flops(dict(transformer.config), width, height))} per image-step "
        f"(matmuls + attention); floor = FLOPs / {args.peak_tflops:.0f} TFLOP/s dense bf16.",
        f"The model has {blocks} blocks; a reused step runs the first one, the embedders and the final layers. "
        "The step cache does not change the full-step time; it replaces a share of full steps by reused steps.",
    ]
    write_result(args, argv, "step_latency", "Transformer step latency", device, header, rows, notes,
                 {"rows": data, "size": [width, height]})


if __name__ == "__main__":
    main()
