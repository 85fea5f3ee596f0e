"""What unmerged LoRAs cost in a forward: one FLUX.1-dev-shaped single block (3072 wide, 12288 MLP,
random weights) at 1024x768 (3072 image + 512 text tokens), batch 4, with no LoRA, one LoRA shared
by the four samples, and four different LoRAs, at each rank; beside the extra FLOPs each implies.
Also the time to make one block's adapter resident (`LoraBank.write`; host to device on a GPU).

    .venv/bin/python -m benchmarks.lora_overhead                      # CPU here: slow, ~10 min
    .venv/bin/python -m benchmarks.lora_overhead --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

from benchmarks.common import RESULTS_DIR, format_flops, median_seconds, synchronize, write_result
from benchmarks.random_model import random_module
from models.lora_files import LowRank
from models.lora_layers import NO_ADAPTER, LoraBank
from models.shapes import FLUX_DEV_TRANSFORMER

TEXT_TOKENS = 512


def block_adapter(bank: LoraBank, rank: int, seed: int) -> dict[str, LowRank]:
    """A random rank-`rank` delta for every Linear of the block."""
    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, site in bank.sites.items():
        fan_in, fan_out = site.down.shape[1], site.up.shape[2]
        adapter[name] = LowRank(torch.randn(rank, fan_in, generator=generator) * 0.01,
                                torch.randn(fan_out, rank, generator=generator) * 0.01)
    return adapter


def linear_flops(bank: LoraBank, tokens: int, rank: int | None = None) -> float:
    """Per sample: the block's Linear FLOPs (rank None), or its LoRAs' extra at `rank`."""
    total = 0.0
    for site in bank.sites.values():
        fan_in, fan_out = site.down.shape[1], site.up.shape[2]
        total += 2 * tokens * (fan_in * fan_out if rank is None else rank * (fan_in + fan_out))
    return total


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--image-tokens", type=int, default=3072, help="1024x768 = 3072")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ranks", default="16,64,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.tiny, args.model_dir = False, None
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = FLUX_DEV_TRANSFORMER
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    block = random_module(lambda: FluxSingleTransformerBlock(dim, config["num_attention_heads"],
                                                             config["attention_head_dim"]), device, dtype)
    tokens = args.image_tokens + TEXT_TOKENS
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(args.batch, args.image_tokens, dim, device=device, dtype=dtype, generator=generator)
    context = torch.randn(args.batch, TEXT_TOKENS, dim, device=device, dtype=dtype, generator=generator)
    temb = torch.randn(args.batch, dim, device=device, dtype=dtype, generator=generator)
    rotary = (torch.ones(tokens, config["attention_head_dim"], device=device, dtype=dtype),
              torch.zeros(tokens, config["attention_head_dim"], device=device, dtype=dtype))

    def forward() -> None:
        with torch.no_grad():
            block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)

    rows, data = [], {}
    ranks = [int(r) for r in args.ranks.split(",")]
    bank = LoraBank(block, slots=2, max_rank=1)
    base_flops = linear_flops(bank, tokens)
    bank.detach()
    base_s = median_seconds(forward, device, args.repeats)
    rows.append(["none", "-", f"{base_s * 1000:.0f}", "-", format_flops(base_flops * args.batch) + " (Linears)"])
    data["none"] = base_s
    for rank in ranks:
        bank = LoraBank(block, slots=args.batch + 1, max_rank=rank)  # a bank padded to this rank
        began = None
        for slot in range(1, args.batch + 1):
            adapter = block_adapter(bank, rank, seed=slot)
            synchronize(device)
            began = time.perf_counter()
            bank.write(slot, adapter)
            synchronize(device)
        write_s = time.perf_counter() - began
        extra = linear_flops(bank, tokens, rank) / base_flops
        for label, slots in (("1 shared", [1] * args.batch), (f"{args.batch} different", list(range(1, args.batch + 1)))):
            with bank.active(slots):
                seconds = median_seconds(forward, device, args.repeats)
            rows.append([label, rank, f"{seconds * 1000:.0f}", f"{(seconds / base_s - 1) * 100:+.1f}%",
                         f"+{extra * 100:.1f}%"])
            data[f"{label} r{rank}"] = seconds
        data[f"write r{rank}"] = write_s
        with bank.active([NO_ADAPTER] * args.batch):
            assert bank.index is None
        bank.detach()  # the next rank's bank replaces it
    notes = [
        f"One single block of FLUX.1-dev's 57 (38 single, 19 double), {tokens} tokens per sample, batch {args.batch}.",
        "Extra FLOPs: the low-rank products (2 r (in + out) per token per Linear) over the block's Linear FLOPs; "
        "attention adds FLOPs no LoRA touches, so the whole forward's share is smaller.",
        "Make resident: one block's adapter written into its slot (" + ", ".join(
            f"rank {r}: {data[f'write r{r}'] * 1000:.1f} ms" for r in ranks) + "); x57 for the whole transformer.",
    ]
    write_result(args, argv, "lora_overhead", "LoRA overhead in one block", device,
                 ["LoRAs in the batch", "rank", "ms per forward", "vs none", "extra Linear FLOPs"], rows, notes, data)


if __name__ == "__main__":
    main()
