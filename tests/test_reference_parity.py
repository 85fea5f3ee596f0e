"""Our pipeline against diffusers' FluxPipeline / FluxImg2ImgPipeline on the same tiny folder (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline
from PIL import Image

from api.schemas import DEFAULT_MAX_PIXELS, ImageToImageInput, TextToImageInput
from models.pipeline import SRPOPipeline
from server.service import to_generation_request
from tests.conftest import CPU

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    return SRPOPipeline(tiny_model_dir, None, CPU, torch.float32)


@pytest.fixture(scope="module")
def reference_t2i(tiny_model_dir):
    pipe = FluxPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_i2i(tiny_model_dir):
    pipe = FluxImg2ImgPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _max_pixel_diff(reference: list[Image.Image], ours: list[np.ndarray]) -> int:
    assert len(reference) == len(ours)
    return max(int(np.abs(np.asarray(r).astype(int) - o.astype(int)).max()) for r, o in zip(reference, ours))


@pytest.mark.parametrize(
    "image_size, steps, num_images, seed, guidance",
    [
        ("landscape_4_3", 3, 1, 0, 3.5),
        ("portrait_16_9", 2, 1, 42, 3.5),
        ("square", 4, 3, 7, 3.5),
        ({"width": 330, "height": 200}, 5, 3, 2**40 + 5, 3.5),  # custom, rounded down to 320x192
        ({"width": 160, "height": 480}, 1, 1, 9, 3.5),
        # What other tests compare against our own pipeline: the engine's sizes and guidance values
        # (test_engine_interleaving), the OpenAI tests' size, the fault-tolerance tests' size and their
        # 50 steps (at 1024x768 there; the size is landscape_4_3's above) at the default guidance.
        ({"width": 128, "height": 192}, 4, 2, 13, 1.0),
        ({"width": 192, "height": 128}, 3, 1, 14, 7.0),
        ({"width": 256, "height": 192}, 3, 2, 11, 3.5),
        ({"width": 256, "height": 256}, 12, 1, 100, 4.5),
        ({"width": 64, "height": 48}, 50, 1, 101, 4.5),
    ],
)
def test_text_to_image_matches_flux_pipeline(ours, reference_t2i, image_size, steps, num_images, seed, guidance):
    body = TextToImageInput(prompt=PROMPT, image_size=image_size, num_inference_steps=steps,
                            num_images=num_images, guidance_scale=guidance, seed=seed)
    request = to_generation_request(body, seed)
    result = ours.generate(request, enable_safety_checker=False)
    kwargs = dict(height=request.height, width=request.width, num_inference_steps=steps, guidance_scale=guidance,
                  num_images_per_prompt=num_images)
    ref_latents = reference_t2i(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                                **kwargs).images
    ref_images = reference_t2i(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    assert result.images[0].shape == (request.height, request.width, 3)
    torch.testing.assert_close(result.latents, ref_latents, rtol=0, atol=1e-5)
    assert _max_pixel_diff(ref_images, result.images) <= 1


@pytest.mark.parametrize(
    "strength, steps, num_images, seed, source_size, max_pixels, size",
    [
        (0.3, 10, 1, 0, (336, 200), DEFAULT_MAX_PIXELS, (336, 192)),  # rounded down
        (0.95, 12, 3, 5, (336, 200), DEFAULT_MAX_PIXELS, (336, 192)),
        (1.0, 10, 1, 11, (336, 200), DEFAULT_MAX_PIXELS, (336, 192)),
        (0.5, 13, 1, 3, (336, 200), DEFAULT_MAX_PIXELS, (336, 192)),
        (0.5, 10, 1, 2, (128, 96), DEFAULT_MAX_PIXELS, (128, 96)),  # the OpenAI edit test's
        # A source above the pixel cap (every phone photo against the default) is scaled down to fit.
        (0.6, 10, 1, 4, (400, 300), 160 * 120, (160, 112)),
    ],
)
def test_image_to_image_matches_flux_img2img_pipeline(ours, reference_i2i, strength, steps, num_images, seed,
                                                      source_size, max_pixels, size):
    rng = np.random.RandomState(seed)
    source = Image.fromarray((rng.rand(source_size[1], source_size[0], 3) * 255).astype(np.uint8))
    body = ImageToImageInput(prompt=PROMPT, image_url="data:,", strength=strength, num_inference_steps=steps,
                             num_images=num_images, guidance_scale=4.5, seed=seed)
    request = to_generation_request(body, seed, source, max_pixels)
    assert (request.width, request.height) == size
    result = ours.generate(request, enable_safety_checker=False)
    kwargs = dict(image=source, height=request.height, width=request.width, strength=strength,
                  num_inference_steps=steps, guidance_scale=4.5, num_images_per_prompt=num_images)
    ref_latents = reference_i2i(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                                **kwargs).images
    ref_images = reference_i2i(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    torch.testing.assert_close(result.latents, ref_latents, rtol=0, atol=1e-5)
    assert _max_pixel_diff(ref_images, result.images) <= 1


def test_same_seed_same_pixels_other_seed_differs(ours):
    body = TextToImageInput(prompt=PROMPT, image_size="square", num_inference_steps=2, seed=1)
    a = ours.generate(to_generation_request(body, 1), enable_safety_checker=False).images[0]
    b = ours.generate(to_generation_request(body, 1), enable_safety_checker=False).images[0]
    c = ours.generate(to_generation_request(body, 2), enable_safety_checker=False).images[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
