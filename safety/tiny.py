"""A tiny safety checker with random weights whose verdicts are known in advance.

Concept 0 is the embedding of `flagged_example()`, with a threshold that only images very close
to it pass, so tests have one input that is certainly flagged; every other threshold is out of
reach of a cosine similarity, so nothing else is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessorPil

FLAG_THRESHOLD = 0.95  # cosine similarity to concept 0 above which an image is flagged
IMAGE_SIZE = 32


def flagged_example(width: int = 64, height: int = 64) -> np.ndarray:
    """The image the tiny checker flags: a red-and-white checkerboard of 8-pixel squares."""
    yy, xx = np.mgrid[0:height, 0:width]
    board = ((yy // 8 + xx // 8) % 2).astype(bool)
    img = np.empty((height, width, 3), np.uint8)
    img[board] = (255, 0, 0)
    img[~board] = (255, 255, 255)
    return img


def write_tiny_safety_checker(
    folder: Path, seed: int = 0, flagged: np.ndarray | None = None, threshold: float = FLAG_THRESHOLD
) -> Path:
    """Write the checker; `flagged` (default `flagged_example()`) is the image concept 0 is made from."""
    torch.manual_seed(seed + 1)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    with torch.no_grad():
        pixels = processor(images=[flagged_example() if flagged is None else flagged], return_tensors="pt").pixel_values
        embed = model.visual_projection(model.vision_model(pixels)[1])[0]
        model.concept_embeds.copy_(torch.randn_like(model.concept_embeds))
        model.concept_embeds[0] = embed
        model.concept_embeds_weights.fill_(2.0)  # unreachable: cosine similarity <= 1
        model.concept_embeds_weights[0] = threshold
        model.special_care_embeds.copy_(torch.randn_like(model.special_care_embeds))
        model.special_care_embeds_weights.fill_(2.0)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return Path(folder)
