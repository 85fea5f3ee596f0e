"""Write a cost profile for the Denoiser's scheduler (scheduling/cost_model.py).

    .venv/bin/python -m benchmarks.cost_profile --tiny --threads 1 --parallel 2 --modes none \\
        --profile-out scheduling/profiles/cpu-tiny.json                                       # 2 replicas, 2 cores
    .venv/bin/python -m benchmarks.cost_profile --profile-out scheduling/profiles/h100.json  # GPU, random weights
    .venv/bin/python -m benchmarks.cost_profile --h100-default                                  # no device needed

A measured profile times one full denoising step per acceleration mode, fal's preset sizes and
batch 1-4. `--h100-default` writes the shipped H100 profile from the step times measured on an
H100 80GB (random FLUX.1-dev weights, 1024x768, bf16; DEVELOPERS.md and issue 16): the measured
points are kept as they are and every other point is read off an affine fit of step time against
forward work (a fixed per-forward cost plus a cost per unit of work), marked "fit".
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import torch

from api.schemas import PRESET_SIZES
from benchmarks.common import (
    bench_transformer,
    device_and_dtype,
    device_label,
    median_seconds,
    model_args,
    parse_list,
    random_state,
)
from models.acceleration import Accelerator
from models.denoise import denoise_step
from scheduling.cost_model import PROFILES, Profile, ProfilePoint, work

FLUX_DIM = 24 * 128  # heads x head dim of FLUX.1-dev
# (image tokens, batch) -> step ms, measured on one H100 80GB at 1024x768 (3072 image tokens), bf16
H100_MEASURED = {
    "none": {(3072, 1): 143.0, (3072, 2): 282.0, (3072, 4): 554.0},
    "regular": {(3072, 1): 106.0, (3072, 4): 397.0},
    "high": {(3072, 1): 89.0},
}
H100_OVERHEAD_MS = 25.0 + 67.0  # T5-XXL encode + VAE decode, measured on the same H100


def attention_tokens(dim: int) -> float:
    """Per block: matmuls 24 D^2 per token, attention 4 D per token pair (benchmarks.common.step_flops)."""
    return 6.0 * dim


def preset_tokens() -> list[int]:
    return sorted({(w // 16) * (h // 16) for w, h in PRESET_SIZES.values()})


def h100_default() -> Profile:
    a = attention_tokens(FLUX_DIM)
    none_fit = affine(H100_MEASURED["none"], a)
    modes = {}
    for mode, measured in H100_MEASURED.items():
        if len(measured) >= 2:
            intercept, slope = affine(measured, a)
        else:  # one point: the shape of 'none''s fit, scaled to it
            ((tokens, batch), ms), = measured.items()
            scale = ms / (none_fit[0] + none_fit[1] * work(tokens, batch, a))
            intercept, slope = none_fit[0] * scale, none_fit[1] * scale
        points = []
        for tokens in preset_tokens():
            for batch in (1, 2, 3, 4):
                if (tokens, batch) in measured:
                    points.append(ProfilePoint(image_tokens=tokens, batch=batch, step_ms=measured[tokens, batch]))
                else:
                    ms = round(intercept + slope * work(tokens, batch, a), 1)
                    points.append(ProfilePoint(image_tokens=tokens, batch=batch, step_ms=ms, source="fit"))
        modes[mode] = points
    return Profile(
        device="NVIDIA H100 80GB HBM3 (bf16, random FLUX.1-dev weights)", date="2026-11-25",
        command=".venv/bin/python -m benchmarks.cost_profile --h100-default",
        attention_tokens=a, request_overhead_ms=H100_OVERHEAD_MS, modes=modes,
        notes="Only the points marked 'measured' were measured (1024x768); the rest are an affine fit "
              "of those (fixed cost + cost per unit of work). Small images probably cost more than the "
              "fit says (an H100 is not full at 1-2k tokens): replace with a measured profile.",
    )


def affine(measured: dict[tuple[int, int], float], a: float) -> tuple[float, float]:
    """Least-squares (intercept, slope) of step ms against forward work."""
    xs = [work(tokens, batch, a) for tokens, batch in measured]
    ys = list(measured.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def measure_points(args: argparse.Namespace) -> dict[str, list[ProfilePoint]]:
    """Step time per mode, preset size and batch size on this process's device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    transformer = bench_transformer(args, device, dtype)
    modes = parse_list(args.modes)
    accelerator = Accelerator(transformer, modes)
    sizes = {(w // 16) * (h // 16): (w, h) for w, h in PRESET_SIZES.values()}
    profile_modes = {}
    for mode in (m for m in modes if m in accelerator.modules):
        points = []
        for tokens, (width, height) in sorted(sizes.items()):
            for batch in parse_list(args.batch_sizes, int):
                state = random_state(transformer, width, height, 28, batch, 0, device, dtype)

                def step(state=state, module=accelerator.modules[mode]) -> None:
                    state.step = 0  # every repeat times the first step's work
                    denoise_step(module, [state])

                ms = median_seconds(step, device, args.repeats, warmup=2) * 1000
                points.append(ProfilePoint(image_tokens=tokens, batch=batch, step_ms=round(ms, 2)))
                print(f"{mode} {width}x{height} batch {batch}: {ms:.1f} ms", flush=True)
        profile_modes[mode] = points
    return profile_modes


def measure(args: argparse.Namespace, argv: list[str]) -> Profile:
    """One measuring process, or `--parallel N` at once (N replicas sharing a CPU slow each other
    down: the profile should say what each of them sees); their mean per point."""
    if args.parallel > 1:
        with ProcessPoolExecutor(args.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(measure_points, [args] * args.parallel))
        modes = {mode: [p.model_copy(update={"step_ms": round(statistics.fmean(r[mode][i].step_ms for r in runs), 2)})
                        for i, p in enumerate(points)] for mode, points in runs[0].items()}
    else:
        modes = measure_points(args)
    device, dtype = device_and_dtype(args)
    transformer = bench_transformer(args, device, dtype)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    threads = f", {args.threads or torch.get_num_threads()} thread(s) x {args.parallel} process(es)"
    return Profile(
        device=device_label(device) + (threads if device.type == "cpu" else ""),
        date=date.today().isoformat(), command=" ".join([".venv/bin/python -m benchmarks.cost_profile", *argv]),
        attention_tokens=attention_tokens(dim), request_overhead_ms=args.overhead_ms, modes=modes,
    )


def main(argv: list[str] | None = None) -> None:
    parser = model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--h100-default", action="store_true", help="write the shipped H100 profile")
    parser.add_argument("--modes", default="none,regular,high")
    parser.add_argument("--batch-sizes", default="1,2,3,4")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch CPU threads (one per Denoiser replica on a small CPU)")
    parser.add_argument("--parallel", type=int, default=1, help="measure in N processes at once (N replicas on one CPU)")
    parser.add_argument("--overhead-ms", type=float, default=0.0, help="per-request cost outside the Denoiser")
    parser.add_argument("--profile-out", type=Path, help="default: scheduling/profiles/h100.json with --h100-default")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not args.h100_default and args.profile_out is None:
        parser.error("a measured profile needs --profile-out")
    profile = h100_default() if args.h100_default else measure(args, argv)
    out = args.profile_out or PROFILES / "h100.json"
    out.write_text(profile.model_dump_json(indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
