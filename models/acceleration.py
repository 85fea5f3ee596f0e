"""fal's `acceleration` field: what each mode runs, and the modules built for it (plain PyTorch, no Ray).

- `none`: the transformer as loaded, eager. Exact: the numbers diffusers' FluxPipeline gives.
- `regular`: the same weights with every transformer block compiled (regional torch.compile, one
  graph reused by all 57 blocks), plus the per-request step cache at a conservative threshold.
- `high`: a copy of the blocks with fp8 matmuls (torchao, dynamic per-row scales for activations
  and weights) on their Linear layers, compiled, plus the step cache at an aggressive threshold.
  Embedders, the blocks' modulation (AdaLN) layers and the final norm/projection stay bf16; the
  modulation layers are shared with the bf16 blocks rather than copied.

Compiled and fp8 modules need a CUDA GPU (fp8 also torchao and compute capability 8.9+). A mode
that cannot run here falls back to the next cheaper one (high -> regular -> none) and the request
is told so. Every module shares the loaded transformer's embedders and final layers; a mode's
module differs from the others, so the engine never mixes modes in one forward.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from models.denoise import denoise_step, start_state
from models.lora_layers import NO_ADAPTER, LoraBank
from models.request import GenerationRequest
from models.step_cache import StepCache

logger = logging.getLogger(__name__)

MODES = ("none", "regular", "high")
WARMUP_SLOT = 1  # a LoRA slot no request holds during warm-up (zeros): compiles the graph with adapters
FALLBACK = {"high": "regular", "regular": "none"}
DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "srpo-serve" / "inductor"
CACHE_ARTIFACTS = "compile-artifacts.bin"  # torch.compiler's portable cache, beside inductor's own
# Blocks compile with dynamic batch and sequence length from the first call (dynamic=True) and see
# contiguous inputs only (models/step_cache.py), so each block class compiles twice: batch 1
# (dynamo specialises sizes 0 and 1) and any other batch. The limit is a safety net, not a budget.
RECOMPILE_LIMIT = 8
COMPILE_OPTIONS = {"fullgraph": True, "dynamic": True}
# One size and both batch classes compile every graph; tests/test_compile_budget.py checks that
# every other size and batch then runs without a recompile.
WARMUP_SIZES = ((1024, 768),)
WARMUP_BATCH_SIZES = (1, 2)


@dataclass(frozen=True)
class ModePlan:
    compile: bool
    fp8: bool
    cache_threshold: float | None  # step cache threshold; None = no step cache


PLANS = {
    "none": ModePlan(compile=False, fp8=False, cache_threshold=None),
    # Provisional thresholds (random weights cannot tune them): 0.08 is the FLUX default of
    # ParaAttention's First Block Cache (~2x fewer full steps per diffusers' guide); high doubles it.
    "regular": ModePlan(compile=True, fp8=False, cache_threshold=0.08),
    "high": ModePlan(compile=True, fp8=True, cache_threshold=0.16),
}


def unavailable_reason(plan: ModePlan, device: torch.device, compile_on_cpu: bool = False) -> str | None:
    """Why a mode cannot run on `device`; None when it can. `compile_on_cpu` lets compiled modes
    without fp8 run on a CPU (inductor's C++ backend: slow to compile, for tests)."""
    if not (plan.compile or plan.fp8):
        return None
    if device.type == "cpu" and compile_on_cpu and not plan.fp8:
        return None
    if device.type != "cuda":
        return "needs a CUDA GPU with torchao" if plan.fp8 else "needs a CUDA GPU"
    if plan.fp8:
        if importlib.util.find_spec("torchao") is None:
            return "needs torchao, which is not installed"
        if torch.cuda.get_device_capability(device) < (8, 9):
            return "needs fp8 matmuls (compute capability 8.9+)"
    return None


def _is_fp8_linear(module: nn.Module, fqn: str) -> bool:
    # Inside a block, the AdaLN modulation lives under norm*; it sets every scale and gate, so it stays bf16.
    return isinstance(module, nn.Linear) and not fqn.split(".")[0].startswith("norm")


def _copy_sharing_modulation(block: nn.Module) -> nn.Module:
    """A deep copy of a block whose norm* children (the modulation) are the original's, not copies."""
    shared = {id(m): m for name, m in block.named_children() if name.startswith("norm")}
    return copy.deepcopy(block, shared)  # deepcopy returns memo entries as they are


def fp8_config():
    """torchao's config for `high`: fp8 weights and activations, one scale per row of each.

    `set_inductor_config=False`: by default torchao switches inductor's coordinate-descent tuning
    on for every later compile in the process (`regular`'s too), multiplying cold-start compile
    time; inductor's settings are this module's choice (prepare_compile), not a side effect.
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def _fp8_blocks(blocks: nn.ModuleList) -> nn.ModuleList:
    from torchao.quantization import quantize_

    config = fp8_config()
    copies = []
    for block in blocks:  # one block at a time: peak memory grows by one bf16 block, not the whole stack
        clone = _copy_sharing_modulation(block)
        quantize_(clone, config, filter_fn=_is_fp8_linear)
        copies.append(clone)
    return nn.ModuleList(copies)


def _compiled(blocks: nn.ModuleList, options: dict[str, Any]) -> nn.ModuleList:
    # torch.compile wraps each block without changing it, so the eager module stays exact for `none`.
    return nn.ModuleList(torch.compile(block, **options) for block in blocks)


def with_blocks(
    transformer: FluxTransformer2DModel, double: nn.ModuleList, single: nn.ModuleList
) -> FluxTransformer2DModel:
    """A shallow twin of `transformer` running other block lists; everything else is shared."""
    twin = copy.copy(transformer)
    twin._modules = dict(transformer._modules)  # copy.copy would share the module dict itself
    twin._modules["transformer_blocks"] = double
    twin._modules["single_transformer_blocks"] = single
    return twin


def build_module(
    transformer: FluxTransformer2DModel, plan: ModePlan, compile_options: dict[str, Any] | None = None
) -> FluxTransformer2DModel:
    """The module a mode runs (the transformer itself for plain modes)."""
    if not (plan.compile or plan.fp8):
        return transformer
    double, single = transformer.transformer_blocks, transformer.single_transformer_blocks
    if plan.fp8:
        double, single = _fp8_blocks(double), _fp8_blocks(single)
    if plan.compile:
        options = {**COMPILE_OPTIONS, **(compile_options or {})}
        double, single = _compiled(double, options), _compiled(single, options)
    return with_blocks(transformer, double, single)


def prepare_compile(cache_dir: Path | None = None) -> Path:
    """Process-wide compile settings: inductor's on-disk cache (FX graphs, AOT autograd, Triton
    kernels) in a persistent folder, and a recompile limit that fits the warmed-up shapes.

    An explicit TORCHINDUCTOR_CACHE_DIR wins. With the folder on a volume, a restarted replica
    loads compiled kernels instead of compiling again (minutes become seconds).
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir or DEFAULT_COMPILE_CACHE))
    # Deliberate inductor settings (not left to what an imported library sets): no coordinate-descent
    # tuning, which costs minutes per graph at start for a few percent of step time.
    torch._inductor.config.coordinate_descent_tuning = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    if (artifacts := folder / CACHE_ARTIFACTS).is_file():
        torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    return folder


def save_compile_artifacts(folder: Path) -> None:
    """Write what this process compiled as torch.compiler's cache artifacts (loaded by prepare_compile)."""
    if (saved := torch.compiler.save_cache_artifacts()) is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CACHE_ARTIFACTS + ".partial")
        tmp.write_bytes(saved[0])
        tmp.replace(folder / CACHE_ARTIFACTS)


class Accelerator:
    """The modules of the acceleration modes on one transformer, built once per replica."""

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        modes: Iterable[str] = MODES,
        compile_options: dict[str, Any] | None = None,
        compile_cache_dir: Path | None = None,
        compile_on_cpu: bool = False,
    ) -> None:
        self.device = transformer.device
        self.compile_cache: Path | None = None
        enabled = set(modes) | {"none"}
        if unknown := enabled - set(MODES):
            raise ValueError(f"unknown acceleration modes {sorted(unknown)}; known: {MODES}")
        self.modules: dict[str, FluxTransformer2DModel] = {}
        self.unavailable: dict[str, str] = {}
        for mode in MODES:
            plan = PLANS[mode]
            reason = (unavailable_reason(plan, self.device, compile_on_cpu) if mode in enabled
                      else "disabled in this deployment")
            if reason is not None:
                self.unavailable[mode] = reason
                continue
            if plan.compile:
                self.compile_cache = prepare_compile(compile_cache_dir)
            self.modules[mode] = build_module(transformer, plan, compile_options)
        for mode, reason in self.unavailable.items():
            logger.info("acceleration %r unavailable on %s: %s", mode, self.device.type, reason)

    def resolve(self, mode: str) -> tuple[str, str | None]:
        """(the mode that runs for a request asking `mode`, a note for its logs when they differ)."""
        if mode not in PLANS:
            raise ValueError(f"unknown acceleration mode {mode!r}; known: {MODES}")
        ran = mode
        while ran not in self.modules:
            ran = FALLBACK[ran]
        if ran == mode:
            return mode, None
        return ran, (
            f"acceleration '{mode}' is not available on {self.device.type} ({self.unavailable[mode]}); ran '{ran}'"
        )

    def step_cache(self, mode: str) -> StepCache | None:
        """A fresh per-request step cache for a mode that runs (None when the mode has none)."""
        threshold = PLANS[mode].cache_threshold
        return None if threshold is None else StepCache(threshold)

    def warm_up(
        self,
        scheduler_config: dict,
        dtype: torch.dtype,
        sizes: Sequence[tuple[int, int]] = WARMUP_SIZES,
        batch_sizes: Sequence[int] = WARMUP_BATCH_SIZES,
        modes: Sequence[str] | None = None,
        loras: LoraBank | None = None,
    ) -> None:
        """One forward per mode; every (size, batch size) for modes that compile, through the path
        that serves (with the mode's step cache), so that no request waits for a compile. With
        `loras`, compiled modes also warm up the graph with adapters (an empty slot: adds zero)."""
        for mode, module in self.modules.items():
            if modes is not None and mode not in modes:
                continue
            config = module.config
            shapes = [(s, b) for s in sizes for b in batch_sizes] if PLANS[mode].compile else [(s, 1) for s in sizes[:1]]
            for (width, height), batch in shapes:
                request = GenerationRequest(
                    prompt="", width=width, height=height, num_inference_steps=1, guidance_scale=4.5, seed=0,
                    num_images=batch,
                )
                prompt = torch.zeros(1, 512, config.joint_attention_dim)
                pooled = torch.zeros(1, config.pooled_projection_dim)
                adapters = (NO_ADAPTER, WARMUP_SLOT) if loras is not None and PLANS[mode].compile else (NO_ADAPTER,)
                for adapter in adapters:
                    state = start_state(request, scheduler_config, prompt, pooled, self.device, dtype)
                    state.cache = self.step_cache(mode)
                    state.adapter = adapter
                    denoise_step(module, [state], loras)
        if self.compile_cache is not None:
            save_compile_artifacts(self.compile_cache)
