"""(d) How far `regular` and `high` move images from `none`: PSNR and max pixel difference.

    .venv/bin/python -m benchmarks.quality                        # GPU, random FLUX.1-dev weights
    .venv/bin/python -m benchmarks.quality --model-dir /models/flux-dev --transformer-file srpo.safetensors
    .venv/bin/python -m benchmarks.quality --tiny --size 256x256 --steps 8

Every variant denoises the same samples (same noise, embeddings, guidance, steps) and the images
are decoded with the same VAE. Besides the modes as served, "step cache only" rows run the eager
bf16 module with a mode's cache threshold, isolating the cache's share of the deviation (and
giving its reuse rate). With random weights the images are noise and the numbers only show how
much each technique perturbs the computation, not how good real images look.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    bench_transformer,
    device_and_dtype,
    model_args,
    model_dir,
    parse_list,
    parse_size,
    tiny_model_dir,
    write_result,
)
from benchmarks.random_model import write_random_folder
from models.acceleration import PLANS, Accelerator
from models.denoise import DenoiseState, denoise_step, start_state
from models.request import GenerationRequest
from models.step_cache import StepCache
from models.text_encoding import PromptEncoder
from models.tiny import FLUX_DEV_SCHEDULER
from models.vae import VaeCodec

PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, telephoto photograph",
    "an isometric city block at night, neon signs",
    "a bowl of ramen on a wooden table, top view",
]


def embeddings(args, transformer, count: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt_embeds, pooled) per sample: real prompts through a folder's encoders, else random."""
    folder = model_dir(args)
    if folder is not None:
        encoded = PromptEncoder(folder, device, transformer.dtype).encode((PROMPTS * count)[:count])
        return [(e.prompt_embeds, e.pooled) for e in encoded]
    generator = torch.Generator("cpu").manual_seed(0)
    config = transformer.config
    return [(torch.randn(512, config.joint_attention_dim, generator=generator),
             torch.randn(config.pooled_projection_dim, generator=generator)) for _ in range(count)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def denoise(module, states: list[DenoiseState], threshold: float | None) -> list[DenoiseState]:
    states = copy.deepcopy(states)
    for s in states:
        s.cache = None if threshold is None else StepCache(threshold)
    while not all(s.done for s in states):
        denoise_step(module, [s for s in states if not s.done])
    return states


def main(argv: list[str] | None = None) -> None:
    parser = model_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--modes", default="regular,high")
    parser.add_argument("--size", default="1024x768", help="width x height")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=3.5)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    width, height = parse_size(args.size)
    dtype_name = str(dtype).removeprefix("torch.")
    transformer = bench_transformer(args, device, dtype)
    modes = parse_list(args.modes)
    accelerator = Accelerator(transformer, ["none", *modes])

    with tempfile.TemporaryDirectory() as tmp:
        folder = model_dir(args) or write_random_folder(Path(tmp), tiny_model_dir(), device, dtype, parts=("vae",))
        vae = VaeCodec(folder, device, dtype)
        states = []
        for i, (prompt, pooled) in enumerate(embeddings(args, transformer, args.samples, device)):
            request = GenerationRequest(prompt="", width=width, height=height, num_inference_steps=args.steps,
                                        guidance_scale=args.guidance, seed=i)
            states.append(start_state(request, FLUX_DEV_SCHEDULER, prompt, pooled, device, dtype))

        def images(done: list[DenoiseState]) -> list[np.ndarray]:
            return [vae.decode(s.latents, height, width)[0] for s in done]

        reference = images(denoise(transformer, states, None))
        variants = [(mode, "as served", accelerator.modules.get(mode), PLANS[mode].cache_threshold) for mode in modes]
        thresholds = sorted({PLANS[m].cache_threshold for m in modes if PLANS[m].cache_threshold is not None})
        variants += [
            (f"step cache only, threshold {t}", f"eager {dtype_name} blocks", transformer, t) for t in thresholds
        ]
        rows, data = [], []
        for label, what, module, threshold in variants:
            if module is None:
                rows.append([label, f"unavailable on {device.type}: {accelerator.unavailable[label]}", "", "", "", ""])
                continue
            done = denoise(module, states, threshold)
            scores = [psnr(a, b) for a, b in zip(images(done), reference)]
            max_diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(images(done), reference))
            reused = sum(s.cache.reused for s in done if s.cache)
            total = sum(s.cache.reused + s.cache.computed for s in done if s.cache) or 1
            rows.append([label, what, f"{reused / total:.0%}", f"{np.mean(scores):.1f}", f"{min(scores):.1f}",
                         max_diff])
            data.append({"variant": label, "reuse_rate": reused / total, "psnr": scores, "max_pixel_diff": max_diff})
    header = ["variant", "runs", "steps reused", "PSNR dB (mean)", "PSNR dB (worst)", "max pixel diff"]
    notes = [
        f"{args.samples} samples at {width}x{height}, {args.steps} steps, guidance {args.guidance}; "
        f"reference: `none` (eager {dtype_name}). PSNR over uint8 RGB; inf = identical.",
    ]
    if model_dir(args) is None or args.tiny:
        notes.append("RANDOM WEIGHTS: images are noise; the numbers show how much each technique perturbs the "
                     "computation, not image quality. Cache reuse rates on random weights do not predict "
                     "those on SRPO's weights.")
    write_result(args, argv, "quality", "Deviation from `none`", device, header, rows, notes, {"rows": data})


if __name__ == "__main__":
    main()
