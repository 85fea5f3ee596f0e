"""(b) End-to-end latency through the HTTP API per acceleration mode, with diffusers' FluxPipeline
(eager, same weights, same process run) as the baseline.

    .venv/bin/python -m benchmarks.end_to_end                                # GPU, random FLUX.1-dev weights
    .venv/bin/python -m benchmarks.end_to_end --model-dir /models/flux-dev --transformer-file srpo_bf16.safetensors
    .venv/bin/python -m benchmarks.end_to_end --tiny --size 256x256 --steps 2 # CPU smoke run

Without a model folder, a FLUX.1-dev-shaped folder of random weights (~34 GB) is written to
--work-dir first (reused by later runs). The baseline is timed first and freed, then the Serve
app (deployments.app, all stages on this one GPU) answers sequential requests per mode
(or, with --url, a server that is already running the same weights). Both
sides encode every prompt (distinct prompts, so the prompt cache never hits), decode with the
VAE and encode a JPEG; the safety checker is off on both sides (FluxPipeline has none).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import httpx
import torch
from diffusers import FluxPipeline

from benchmarks.common import device_and_dtype, model_args, parse_list, parse_size, tiny_model_dir, write_result
from benchmarks.random_model import write_random_folder
from models.acceleration import WARMUP_BATCH_SIZES, WARMUP_SIZES
from models.loading import load_transformer
from server.images import encode_image
from settings import get_settings
from tests.harness import running_serve, tiny_env

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
TARGETS_S = {"none": 2.4, "regular": 1.4, "high": 0.8}  # issue 5, H100, 1024x768, 28 steps
# One GPU for the whole graph, shared as serve_config.1gpu.yaml shares it (the memory plan's shares).
ONE_GPU_OPTIONS = {
    "Denoiser": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0.6}},
    "TextEncoder": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0.2}},
    "Decoder": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0.2}},
}


def baseline_seconds(folder: Path, args, device: torch.device, dtype: torch.dtype) -> list[float]:
    width, height = parse_size(args.size)
    extra = {}
    if args.transformer_file:
        extra["transformer"] = load_transformer(folder, device, dtype, args.transformer_file)
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(args.warmup + args.requests):  # warm-up runs are not counted
        began = time.perf_counter()
        image = pipe(f"{PROMPT} #{i}", height=height, width=width, num_inference_steps=args.steps,
                     guidance_scale=4.5, generator=torch.Generator("cpu").manual_seed(i), output_type="np").images[0]
        encode_image((image * 255).round().astype("uint8"), "jpeg")
        times.append(time.perf_counter() - began)
    del pipe, extra
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times[args.warmup:]


def http_seconds(base: str, args, mode: str) -> list[float]:
    width, height = parse_size(args.size)
    times = []
    with httpx.Client(timeout=600) as client:
        for i in range(args.warmup + args.requests):
            body = {"prompt": f"{PROMPT} [{mode}] #{i}", "image_size": {"width": width, "height": height},
                    "num_inference_steps": args.steps, "seed": i, "acceleration": mode,
                    "enable_safety_checker": False, "output_format": "jpeg"}
            began = time.perf_counter()
            response = client.post(f"{base}/fal-ai/flux/srpo", json=body)
            response.raise_for_status()
            times.append(time.perf_counter() - began)
    return times[args.warmup:]


def serve_settings(args, folder: Path, storage: Path, device: torch.device) -> tuple[dict[str, str], dict]:
    """Replica environment and app args that serve `folder` with every stage on this machine."""
    env = tiny_env(get_settings().tiny_dir, storage)
    if not args.tiny:
        env |= {"SRPO_MODEL_DIR": str(folder),
                "SRPO_SAFETY_DIR": str(args.safety_dir or get_settings().tiny_dir / "safety_checker")}
        if args.transformer_file:
            env["SRPO_TRANSFORMER_FILE"] = str(args.transformer_file)
    warm_up = {"denoise_warmup_sizes": [parse_size(s) for s in parse_list(args.warmup_sizes)],
               "denoise_warmup_batch_sizes": parse_list(args.warmup_batches, int),
               "denoise_acceleration_modes": parse_list(args.modes)}
    if device.type != "cuda":
        return env, warm_up
    return env | {"SRPO_DEVICE": "cuda", "SRPO_DTYPE": "bfloat16"}, {"deployment_options": ONE_GPU_OPTIONS, **warm_up}


def main(argv: list[str] | None = None) -> None:
    parser = model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--modes", default="none,regular,high")
    parser.add_argument("--size", default="1024x768", help="width x height")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=5, help="timed requests per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests before them")
    parser.add_argument("--warmup-sizes", default=",".join(f"{w}x{h}" for w, h in WARMUP_SIZES),
                        help="sizes the Denoiser's compiled modes warm up at before ready")
    parser.add_argument("--warmup-batches", default=",".join(map(str, WARMUP_BATCH_SIZES)))
    parser.add_argument("--safety-dir", type=Path, help="default: the tiny preset's checker (it is switched off)")
    parser.add_argument("--url", help="time a server already running there (same weights!) instead of starting one")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/srpo-random-flux-dev"),
                        help="where the random-weights folder is written")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    folder = tiny_model_dir() if args.tiny else args.model_dir
    if folder is None:
        folder = write_random_folder(args.work_dir, tiny_model_dir(), device, dtype)

    baseline = baseline_seconds(folder, args, device, dtype)
    modes = parse_list(args.modes)
    with tempfile.TemporaryDirectory() as storage:
        env, app_args = serve_settings(args, folder, Path(storage), device)
        with nullcontext(args.url) if args.url else running_serve(env, app_args) as base:
            measured = {mode: http_seconds(base, args, mode) for mode in modes}

    base_median = statistics.median(baseline)
    rows = [["diffusers FluxPipeline, in-process", "-", f"{base_median:.3f}", f"{min(baseline):.3f}", "-", "1.00x"]]
    for mode in modes:
        median = statistics.median(measured[mode])
        target = f"<= {TARGETS_S[mode]} s" if device.type == "cuda" else "n/a (CPU)"
        rows.append(["HTTP `POST /fal-ai/flux/srpo`", mode, f"{median:.3f}", f"{min(measured[mode]):.3f}", target,
                     f"{base_median / median:.2f}x"])
    overhead = statistics.median(measured.get("none", [base_median])) / base_median - 1
    width, height = parse_size(args.size)
    notes = [
        f"{width}x{height}, {args.steps} steps, 1 image, JPEG, safety checker off; {args.requests} sequential "
        f"requests per row after {args.warmup} warm-up ones; seconds: client-side wall time.",
        f"Serving overhead of `none` over FluxPipeline: {overhead:+.1%} (target <= 3% on a GPU).",
    ]
    if device.type != "cuda":
        notes.append("On CPU `regular` and `high` fall back to `none` (the request's logs say so), so their rows "
                     "time `none` again.")
    write_result(args, argv, "end_to_end", "End-to-end latency through the HTTP API", device,
                 ["path", "acceleration", "median s", "best s", "target (H100)", "speed-up vs FluxPipeline"], rows,
                 notes, {"baseline_s": baseline, "http_s": measured})


if __name__ == "__main__":
    main()
