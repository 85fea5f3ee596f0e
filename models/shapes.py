"""The exact shapes of the real components (FLUX.1-dev transformer and VAE, T5-XXL, CLIP-L, the
SD safety checker's CLIP ViT-L/14), as their published configs give them.

Built on the meta device they cost no memory: the memory plan (models/memory_plan.py) counts their
parameters, and the benchmarks materialise them with random weights of the real shapes.
"""

from __future__ import annotations

from typing import Callable

from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from torch import nn
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
# CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14's vision tower and a 768-d projection.
SAFETY_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, image_size=224, projection_dim=768)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "transformer": lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
    "vae": lambda: AutoencoderKL(**FLUX_VAE),
    "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)),
    "text_encoder_2": lambda: T5EncoderModel(T5Config(**T5_XXL, feed_forward_proj="gated-gelu")),
    "safety_checker": lambda: StableDiffusionSafetyChecker(
        CLIPConfig(text_config=CLIP_L, vision_config=SAFETY_VISION, projection_dim=768)
    ),
}
