"""`srpo`: try a model folder in-process (no Ray), convert SRPO's checkpoint, build the tiny preset."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from api.schemas import ImageToImageInput, TextToImageInput
from server.images import data_uri, decode_image, encode_image
from settings import get_settings


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
    try:
        if args.image:
            image_bytes = Path(args.image).read_bytes()
            fields |= {"image_url": data_uri(image_bytes, "application/octet-stream"), "strength": args.strength}
            body: TextToImageInput | ImageToImageInput = ImageToImageInput(**fields)
        else:
            size = args.size if "x" not in args.size else dict(zip(("width", "height"), map(int, args.size.split("x"))))
            body = TextToImageInput(**fields, image_size=size)
    except ValidationError as exc:
        print(exc, file=sys.stderr)
        return 2
    source = decode_image(image_bytes, settings.image_max_source_pixels) if args.image else None
    seed = body.resolved_seed()
    paths = resolve_model_paths(settings.model_dir, settings.safety_dir, settings.transformer_file, settings.tiny_dir)
    pipe = SRPOPipeline(
        paths.model_dir,
        paths.safety_dir,
        settings.resolved_device(),
        settings.resolved_dtype(),
        paths.transformer_file,
    )
    result = pipe.generate(to_generation_request(body, seed, source, settings.max_pixels), body.enable_safety_checker)
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


def _make_tiny(args: argparse.Namespace) -> int:
    from models.tiny import ensure_tiny_model

    model_dir, safety_dir = ensure_tiny_model(Path(args.target) if args.target else get_settings().tiny_dir)
    print(json.dumps({"model_dir": str(model_dir), "safety_dir": str(safety_dir)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="srpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images in-process from SRPO_MODEL_DIR (or the tiny preset)")
    gen.add_argument("prompt")
    gen.add_argument("--size", default="landscape_4_3", help="a preset name or WIDTHxHEIGHT")
    gen.add_argument("--steps", type=int, default=None, help="default 28 (40 for image-to-image)")
    gen.add_argument("--guidance-scale", type=float, default=4.5)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--format", choices=("jpeg", "png"), default="png")
    gen.add_argument("--image", help="source image file: image-to-image")
    gen.add_argument("--strength", type=float, default=0.95)
    gen.add_argument("--out", default="outputs")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert-transformer", help="cast SRPO's fp32 transformer file (default to bf16)")
    conv.add_argument("source")
    conv.add_argument("target")
    conv.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    conv.set_defaults(func=_convert)

    tiny = sub.add_parser("make-tiny", help="write the tiny offline preset (default: SRPO_TINY_DIR)")
    tiny.add_argument("target", nargs="?")
    tiny.set_defaults(func=_make_tiny)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
