"""The tiny offline preset: a complete FLUX.1-dev-layout folder with tiny random weights.

It exists so the whole system (loading, sampling, serving, tests) runs on any CPU without
weights or network. Its images are noise. Everything is seeded, so the folder is the same on
every machine; tokenizers are built from in-code vocabularies, never downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

logger = logging.getLogger(__name__)

TINY_VERSION = 1  # bump when the generated folder changes, so stale caches are rebuilt
_MARKER = "srpo_tiny_preset.json"
TEXT_DIM = 32

# FLUX.1-dev's scheduler config, unchanged: the sigma schedule is the real one.
FLUX_DEV_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def _clip_tokenizer() -> CLIPTokenizer:
    # Byte-level BPE vocabulary with no merges: every character is a token, as a word-final
    # variant too. Real CLIP has ~49k merged tokens; the mechanics are the same.
    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    # Unigram vocabulary of single characters (with and without the word-start marker).
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for code in list(range(ord("a"), ord("z") + 1)) + list(range(ord("0"), ord("9") + 1)):
        pieces += [("▁" + chr(code), -3.0), (chr(code), -4.0)]
    for c in ".,!?'\"-:;()":
        pieces.append((c, -5.0))
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)


def build_tiny_pipeline(seed: int = 0) -> FluxPipeline:
    """A FluxPipeline of tiny random components in fp32 (deterministic for a given seed)."""
    torch.manual_seed(seed)
    clip_tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=1,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    # Four blocks keep FLUX's 8x spatial factor; the mid-block attention is dropped because at
    # 1024x768 it would be a 12k-token attention that dominates the tiny model's CPU time.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=2,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    for module in (clip, t5, transformer, vae):
        module.eval()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def write_tiny_model(target: Path, seed: int = 0) -> Path:
    """Write the tiny model folder (diffusers layout) and the tiny safety checker beside it."""
    from safety.tiny import write_tiny_safety_checker

    target = Path(target)
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(target / "model", safe_serialization=True)
    write_tiny_safety_checker(target / "safety_checker", seed=seed)
    (target / _MARKER).write_text(json.dumps({"version": TINY_VERSION, "seed": seed}))
    return target


def ensure_tiny_model(target: Path) -> tuple[Path, Path]:
    """The tiny preset's (model folder, safety folder), generating them on first use."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several replicas may start at once
        marker = target / _MARKER
        if not (marker.exists() and json.loads(marker.read_text()).get("version") == TINY_VERSION):
            logger.info("generating the tiny preset in %s", target)
            shutil.rmtree(target, ignore_errors=True)
            write_tiny_model(target)
    return target / "model", target / "safety_checker"
