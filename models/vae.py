"""VAE encode (image-to-image start) and decode (latents to uint8 pixels), as the Flux pipelines do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents
from PIL import Image

from models.loading import load_vae
from models.sampling import VAE_SCALE_FACTOR, initial_noise, unpack

# One VAE decode's activations grow with its pixels (~1.5 KB per output pixel in bf16 at the last
# up block), so a call decodes at most this many pixels; an image above TILE_ABOVE_PIXELS is decoded
# alone in tiles (diffusers' tiled decode, 1024-pixel tiles for FLUX's VAE), which bounds memory
# at the cost of blended tile seams (FluxPipeline does not tile by default).
MAX_DECODE_PIXELS = 4 * 1024 * 1024
TILE_ABOVE_PIXELS = 1024 * 1024


def decode_chunks(num_images: int, height: int, width: int) -> tuple[int, bool]:
    """(images per VAE call, whether to tile) for images of one size."""
    pixels = height * width
    if pixels > TILE_ABOVE_PIXELS:
        return 1, True
    return max(1, min(num_images, MAX_DECODE_PIXELS // pixels)), False


class VaeCodec:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.vae = load_vae(folder, device, dtype)
        self.device, self.dtype = device, dtype
        self.processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR * 2)

    @torch.no_grad()
    def encode_with_noise(
        self, image: Image.Image, height: int, width: int, seed: int, num_images: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image latents (1,16,h,w), noise (num_images,16,h,w)) for image-to-image.

        FluxImg2ImgPipeline draws the VAE posterior sample and then the noise from the one
        seeded generator, in that order; both happen here so the order is kept.
        """
        generator = torch.Generator("cpu").manual_seed(seed)
        pixels = self.processor.preprocess(image, height=height, width=width).to(torch.float32)
        pixels = pixels.to(self.device, self.dtype)
        latents = retrieve_latents(self.vae.encode(pixels), generator=generator)
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        noise = initial_noise(generator, num_images, height, width, self.device, self.dtype)
        return latents, noise

    @torch.no_grad()
    def decode(self, packed_latents: torch.Tensor, height: int, width: int) -> list[np.ndarray]:
        """Packed latents (B, L, 64) to B uint8 HxWx3 arrays."""
        per_call, tiled = decode_chunks(packed_latents.shape[0], height, width)
        self.vae.use_tiling = tiled
        images: list[np.ndarray] = []
        for chunk in packed_latents.split(per_call):
            latents = unpack(chunk.to(self.device, self.dtype), height, width)
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(latents, return_dict=False)[0]
            pil = VaeImageProcessor.numpy_to_pil(self.processor.postprocess(decoded, output_type="np"))
            images += [np.asarray(im) for im in pil]
        return images
