"""What the benchmark scripts share: the model under test, timing, FLOP estimates, result files.

The model is one of: the tiny preset (`--tiny`, CPU smoke runs; its numbers say nothing about a
GPU), a model folder (`--model-dir`, optionally `--transformer-file`), or by default random
weights of FLUX.1-dev's exact shapes built on the meta device and materialised on the device
(speed does not depend on weight values). Each script writes `<out>/<name>.json` and `.md`;
`python -m benchmarks.report` copies them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import diffusers
import torch
from diffusers import FluxTransformer2DModel

from benchmarks.random_model import FLUX_DEV_TRANSFORMER, random_module
from models.denoise import DenoiseState, start_state
from models.loading import load_transformer
from models.request import GenerationRequest
from models.tiny import FLUX_DEV_SCHEDULER, ensure_tiny_model
from settings import get_settings

RESULTS_DIR = Path("benchmarks/results")
PEAK_BF16_TFLOPS = 790.0  # dense bf16 an H100 sustains on large matmuls (the project's planning figure)
from scheduling.cost_model import TEXT_TOKENS


def model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on CPU (smoke runs)")
    parser.add_argument("--model-dir", type=Path, help="a FLUX.1-dev folder; default: random FLUX.1-dev weights")
    parser.add_argument("--transformer-file", type=Path, help="SRPO transformer safetensors for --model-dir")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON and markdown go")
    return parser


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (width, height)."""
    width, height = text.lower().split("x")
    return int(width), int(height)


def parse_list(text: str, kind: type = str) -> list:
    return [kind(x) for x in text.split(",") if x]


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.tiny or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.bfloat16


def tiny_model_dir() -> Path:
    return ensure_tiny_model(get_settings().tiny_dir)[0]


def model_dir(args: argparse.Namespace) -> Path | None:
    """The folder weights come from (None: random FLUX.1-dev weights)."""
    return tiny_model_dir() if args.tiny else args.model_dir


def bench_transformer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> FluxTransformer2DModel:
    folder = model_dir(args)
    if folder is None:
        return random_module(lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER), device, dtype)
    return load_transformer(folder, device, dtype, args.transformer_file)


def random_state(
    transformer: FluxTransformer2DModel, width: int, height: int, steps: int, batch: int, seed: int,
    device: torch.device, dtype: torch.dtype,
) -> DenoiseState:
    """A request's first state with random prompt embeddings (speed runs need no text encoder)."""
    request = GenerationRequest(prompt="", width=width, height=height, num_inference_steps=steps,
                                guidance_scale=3.5, seed=seed, num_images=batch)
    generator = torch.Generator("cpu").manual_seed(seed)
    prompt = torch.randn(512, transformer.config.joint_attention_dim, generator=generator)
    pooled = torch.randn(transformer.config.pooled_projection_dim, generator=generator)
    return start_state(request, FLUX_DEV_SCHEDULER, prompt, pooled, device, dtype)


def weights_label(args: argparse.Namespace) -> str:
    if args.tiny:
        return "tiny preset (random, CPU)"
    return f"{args.model_dir}" if args.model_dir else "random weights, FLUX.1-dev shapes"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def step_flops(config: dict, width: int, height: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one transformer forward (embedders and modulation, <1%, left out).

    Per block and token: q, k, v, out projections (4 D^2) and a 4x MLP (8 D^2) at 2 FLOPs per
    multiply-add; attention adds 4 L^2 D per block (QK^T and AV). FLUX.1-dev at 1024x768 batch 1:
    57 blocks x (24 D^2 L + 4 L^2 D) with D=3072, L=3584 -> ~55 TFLOP.
    """
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (width // 16) * (height // 16) + TEXT_TOKENS
    blocks = config["num_layers"] + config["num_single_layers"]
    return batch * blocks * (24 * dim * dim * tokens + 4 * tokens * tokens * dim)


def format_flops(flops: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.0f} FLOP"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


@dataclass
class Result:
    name: str  # the script's module name, e.g. step_latency
    kind: str  # gpu | cpu-tiny | cpu
    title: str
    device: str
    date: str
    command: str
    software: str
    weights: str
    table: str  # markdown
    notes: list[str]
    data: dict


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(
    args: argparse.Namespace, argv: list[str], name: str, title: str, device: torch.device,
    header: list[str], rows: list[list[object]], notes: list[str], data: dict,
) -> Result:
    kind = "gpu" if device.type == "cuda" else ("cpu-tiny" if args.tiny else "cpu")
    result = Result(
        name=name, kind=kind, title=title, device=device_label(device), date=date.today().isoformat(),
        command=" ".join([".venv/bin/python", "-m", f"benchmarks.{name}", *argv]),
        software=f"torch {torch.__version__}, diffusers {diffusers.__version__}",
        weights=weights_label(args), table=markdown_table(header, rows), notes=notes, data=data,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.{kind}.json").write_text(json.dumps(asdict(result), indent=2))
    (args.out / f"{name}.{kind}.md").write_text(render(result))
    print(render(result))
    return result


def render(result: Result) -> str:
    lines = [
        f"Device: {result.device}; {result.software}; {result.date}. Weights: {result.weights}.",
        f"Command: `{result.command}`",
        "",
        result.table,
    ]
    if result.notes:
        lines += [""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines)
