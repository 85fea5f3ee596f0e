"""`srpo`: try a model folder in-process (no Ray), convert SRPO's checkpoint, build the tiny preset."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from api.schemas import PRESET_SIZES, ImageToImageInput, TextToImageInput, readable_errors
from deployments.launch import QUIET_LIBRARIES
from server.images import ImageLoadError, data_uri, decode_image, encode_image
from settings import get_settings

DEFAULT_FORMAT = TextToImageInput.model_fields["output_format"].default  # the server's default too


class UsageError(Exception):
    """A mistake in the command line: one line on stderr and exit code 2, never a traceback."""


def _size(text: str) -> str | dict[str, int]:
    if text in PRESET_SIZES:
        return text
    width, x, height = text.partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise UsageError(f"--size {text!r}: expected one of {', '.join(PRESET_SIZES)} or WIDTHxHEIGHT (e.g. 1024x768)")
    return {"width": int(width), "height": int(height)}


def _input(
    args: argparse.Namespace, fields: dict[str, Any]
) -> tuple[TextToImageInput | ImageToImageInput, bytes | None]:
    """The request body, and the source image's bytes for image-to-image."""
    image_bytes = None
    try:
        if args.image:
            try:
                image_bytes = Path(args.image).read_bytes()
            except OSError as exc:
                raise UsageError(f"--image {args.image}: {exc.strerror or exc}") from exc
            fields |= {"image_url": data_uri(image_bytes, "application/octet-stream"), "strength": args.strength}
            return ImageToImageInput(**fields), image_bytes
        return TextToImageInput(**fields, image_size=_size(args.size)), None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in readable_errors(exc.errors()))
        raise UsageError(f"invalid input: {problems}") from exc


class _ProgressBar:
    """A denoising progress bar on stderr (tqdm comes with transformers), shown from the first step on,
    once the step count is known (image-to-image runs fewer steps than asked)."""

    def __init__(self) -> None:
        self.bar = None

    def on_step(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc="denoising", unit="step", total=total, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _generate(args: argparse.Namespace) -> int:
    from models.loading import resolve_model_paths
    from models.pipeline import SRPOPipeline
    from server.service import to_generation_request

    settings = get_settings()
    fields = {
        "prompt": args.prompt,
        "seed": args.seed,
        "num_images": args.num_images,
        "guidance_scale": args.guidance_scale,
        "output_format": args.format,
    }
    if args.steps is not None:
        fields["num_inference_steps"] = args.steps
    body, image_bytes = _input(args, fields)
    try:
        source = decode_image(image_bytes, settings.image_max_source_pixels) if image_bytes is not None else None
    except ImageLoadError as exc:
        raise UsageError(f"--image {args.image}: {exc}") from exc
    seed = body.resolved_seed()
    paths = resolve_model_paths(settings.model_dir, settings.safety_dir, settings.transformer_file, settings.tiny_dir)
    pipe = SRPOPipeline(
        paths.model_dir,
        paths.safety_dir,
        settings.resolved_device(),
        settings.resolved_dtype(),
        paths.transformer_file,
    )
    progress = _ProgressBar()
    try:
        result = pipe.generate(to_generation_request(body, seed, source, settings.max_pixels),
                               body.enable_safety_checker, progress.on_step)
    finally:
        progress.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, pixels in enumerate(result.images):
        path = out / f"srpo-{seed}-{i}.{args.format}"
        path.write_bytes(encode_image(pixels, body.output_format))
        written.append(str(path))
    print(json.dumps({"files": written, "seed": seed, "has_nsfw_concepts": result.has_nsfw_concepts,
                      "inference_seconds": round(result.inference_seconds, 3)}))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from models.transformer_file import convert_transformer_file

    convert_transformer_file(Path(args.source), Path(args.target), getattr(torch, args.dtype))
    print(args.target)
    return 0


def _check_weights(args: argparse.Namespace) -> int:
    from models.loading import check_model_folder
    from safety.checker import check_safety_folder

    settings = get_settings()
    if settings.model_dir is None or settings.safety_dir is None:
        raise UsageError("set SRPO_MODEL_DIR and SRPO_SAFETY_DIR (and SRPO_TRANSFORMER_FILE) to the folders to check")
    problems = []
    for check in (lambda: check_model_folder(settings.model_dir, transformer_file=settings.transformer_file),
                  lambda: check_safety_folder(settings.safety_dir)):
        try:
            check()
        except FileNotFoundError as exc:
            problems.append(str(exc))
    if problems:
        raise UsageError("; ".join(problems))
    print(json.dumps({"model_dir": str(settings.model_dir), "transformer_file": str(settings.transformer_file),
                      "safety_dir": str(settings.safety_dir), "complete": True}))
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from models.tiny import ensure_tiny_model

    model_dir, safety_dir = ensure_tiny_model(Path(args.target) if args.target else get_settings().tiny_dir)
    print(json.dumps({"model_dir": str(model_dir), "safety_dir": str(safety_dir)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="srpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images in-process from SRPO_MODEL_DIR (or the tiny preset)")
    gen.add_argument("prompt")
    presets = ", ".join(f"{name} ({w}x{h})" for name, (w, h) in PRESET_SIZES.items())
    gen.add_argument("--size", default="landscape_4_3",
                     help=f"a preset: {presets}; or WIDTHxHEIGHT (default: landscape_4_3)")
    gen.add_argument("--steps", type=int, default=None, help="default 28 (40 for image-to-image)")
    gen.add_argument("--guidance-scale", type=float, default=4.5)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--format", choices=("jpeg", "png"), default=DEFAULT_FORMAT,
                     help=f"output file format (default: {DEFAULT_FORMAT}, as the server's)")
    gen.add_argument("--image", help="source image file: image-to-image")
    gen.add_argument("--strength", type=float, default=0.95)
    gen.add_argument("--out", default="outputs")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert-transformer", help="cast SRPO's fp32 transformer file (default to bf16)")
    conv.add_argument("source")
    conv.add_argument("target")
    conv.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    conv.set_defaults(func=_convert)

    check = sub.add_parser("check-weights", help="check that SRPO_MODEL_DIR, SRPO_TRANSFORMER_FILE and "
                           "SRPO_SAFETY_DIR hold every file serving needs, without loading them")
    check.set_defaults(func=_check_weights)

    tiny = sub.add_parser("make-tiny", help="write the tiny offline preset (default: SRPO_TINY_DIR)")
    tiny.add_argument("target", nargs="?")
    tiny.set_defaults(func=_make_tiny)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"srpo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
