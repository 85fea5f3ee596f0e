"""(a) Transformer step latency per acceleration mode and batch size, against the bf16 compute floor.

    .venv/bin/python -m benchmarks.step_latency                       # GPU, random FLUX.1-dev weights
    .venv/bin/python -m benchmarks.step_latency --tiny --size 256x256 # CPU smoke run

Each compiled mode is warmed up first as the Denoiser warms it (`--warmup-sizes`, `--warmup-batches`;
the warm-up's time and graph count are reported), and modes not started within `--budget-s` are
reported as not reached, so a short GPU window always ends with a result file.

"full step": one denoising step (transformer forward + Euler update) with every block run; in the
cached modes through the cache-aware forward (threshold 0), so its bookkeeping is included.
"reused step": the same step when every sample reuses its step cache (first block, embedders and
final layers only), the cost of a skipped step in the cached modes. A mode's effective step time
is full * (1 - r) + reused * r for a reuse rate r (see quality.py for r).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch._dynamo.utils import counters

from benchmarks.common import (
    PEAK_BF16_TFLOPS, bench_transformer, device_and_dtype, format_flops, median_seconds, model_args, parse_list,
    parse_size, random_state, step_flops, write_result,
)
from models.acceleration import PLANS, WARMUP_BATCH_SIZES, WARMUP_SIZES, Accelerator
from models.tiny import FLUX_DEV_SCHEDULER
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
    parser.add_argument("--warmup-sizes", default=",".join(f"{w}x{h}" for w, h in WARMUP_SIZES),
                        help="sizes the compiled modes warm up at, e.g. 1024x768,512x512")
    parser.add_argument("--warmup-batches", default=",".join(map(str, WARMUP_BATCH_SIZES)))
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no mode after this many seconds")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    began = time.monotonic()
    device, dtype = device_and_dtype(args)
    width, height = parse_size(args.size)
    transformer = bench_transformer(args, device, dtype)
    modes = parse_list(args.modes)
    accelerator = Accelerator(transformer, modes)
    warmup_sizes = [parse_size(s) for s in parse_list(args.warmup_sizes)]
    rows, data, warm_ups = [], [], []
    for mode in modes:
        if mode in accelerator.unavailable:
            rows.append([mode, "-", f"unavailable on {device.type}: {accelerator.unavailable[mode]}", "", "", "", ""])
            continue
        if time.monotonic() - began > args.budget_s:
            rows.append([mode, "-", f"not reached within --budget-s {args.budget_s:.0f}", "", "", "", ""])
            continue
        module = accelerator.modules[mode]
        if PLANS[mode].compile:
            graphs, warm_began = counters["stats"]["unique_graphs"], time.monotonic()
            accelerator.warm_up(FLUX_DEV_SCHEDULER, dtype, warmup_sizes, parse_list(args.warmup_batches, int),
                                modes=[mode])
            warm_ups.append({"mode": mode, "seconds": time.monotonic() - warm_began,
                             "graphs": counters["stats"]["unique_graphs"] - graphs})
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
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            data.append({"mode": mode, "peak_allocated_gib_so_far": peak})
    blocks = transformer.config.num_layers + transformer.config.num_single_layers
    header = ["mode", "batch", "full step ms", "ms per image", "reused step ms", "bf16 floor ms", "floor / full"]
    notes = [
        f"{width}x{height}; {format_flops(step_flops(dict(transformer.config), width, height))} per image-step "
        f"(matmuls + attention); floor = FLOPs / {args.peak_tflops:.0f} TFLOP/s dense bf16.",
        f"The model has {blocks} blocks; a reused step runs the first one, the embedders and the final layers. "
        "The step cache does not change the full-step time; it replaces a share of full steps by reused steps.",
    ]
    notes += [f"warm-up of `{w['mode']}`: {w['graphs']} graphs in {w['seconds']:.1f} s "
              f"(sizes {args.warmup_sizes}, batches {args.warmup_batches})" for w in warm_ups]
    write_result(args, argv, "step_latency", "Transformer step latency", device, header, rows, notes,
                 {"rows": data, "size": [width, height], "warm_ups": warm_ups})


if __name__ == "__main__":
    main()
