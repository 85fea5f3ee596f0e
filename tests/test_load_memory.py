"""Peak host memory of the streaming transformer loader: an fp32 file loads to bf16 without the fp32
model ever being in memory.

The loader runs in a child process; this process samples the child's anonymous resident memory
(`RssAnon` in /proc/PID/status) every millisecond from outside, so the sampling never waits for the
child's interpreter. Anonymous memory is what the process itself holds: the file's memory-mapped
pages (in ru_maxrss and VmHWM too) are page cache, shared and reclaimable, and are left out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from tests.bfl_checkpoint import bfl_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Transformer-like: FLUX's block structure at width 1024 (one double, two single blocks): 76M
# parameters, a 303 MB fp32 file, whose largest tensor (a single block's linear1) is 29 MB.
CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=8,
    joint_attention_dim=1024, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# Peak above the child's memory just before loading, as a share of the fp32 file: the bf16 model is
# 0.5, one fp32 tensor and its bf16 cast add < 0.15; the fp32 model held whole would be >= 1.0 more.
BOUND = 0.75
CHILD = """
import sys
from pathlib import Path
import torch
from diffusers import FluxTransformer2DModel
from models.transformer_file import load_transformer_file
config_dir, weights = map(Path, sys.argv[1:])
with torch.device("meta"):  # imports and first-use set-up before the baseline
    FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(config_dir))
print("ready", flush=True)
sys.stdin.readline()
model = load_transformer_file(config_dir, weights, torch.device("cpu"), torch.bfloat16)
assert all(p.dtype == torch.bfloat16 for p in model.parameters())
print(sum(p.numel() * p.element_size() for p in model.parameters()), flush=True)
sys.stdin.readline()
"""


def _rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


@pytest.fixture(params=["diffusers", "bfl"])
def fp32_file(request, tmp_path):
    """An fp32 file of the transformer-like model in diffusers' or in BFL's layout (split while loading)."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **CONFIG}))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel(**CONFIG).state_dict().items()}
    weights = tmp_path / "transformer.fp32.safetensors"
    state = {k: torch.full(shape, 0.5) for k, shape in shapes.items()}
    if request.param == "bfl":
        state = bfl_checkpoint(state, CONFIG["num_layers"], CONFIG["num_single_layers"])
    save_file(state, weights)
    del state
    yield tmp_path, weights
    weights.unlink()


def test_fp32_file_loads_to_bf16_without_the_fp32_model_in_memory(fp32_file):
    config_dir, weights = fp32_file
    fp32_bytes = weights.stat().st_size
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(config_dir), str(weights)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "ready"
        baseline = peak = _rss_anon(child.pid)
        result: list[str] = []
        done = threading.Event()
        threading.Thread(target=lambda: (result.append(child.stdout.readline()), done.set()), daemon=True).start()
        child.stdin.write("load\n")
        child.stdin.flush()
        deadline = time.monotonic() + 120
        while not done.wait(0.001):  # the sampling period
            assert time.monotonic() < deadline, "the load did not finish in 120 s"
            peak = max(peak, _rss_anon(child.pid))
        after = _rss_anon(child.pid)
        assert result[0].strip(), "the child failed to load (its traceback is above)"
        model_bytes = int(result[0])
    finally:
        child.kill()
        child.wait()
    mib = 2**20
    print(f"fp32 file {fp32_bytes / mib:.0f} MiB, bf16 model {model_bytes / mib:.0f} MiB; anonymous memory above "
          f"the baseline: peak {(peak - baseline) / mib:.0f} MiB ({(peak - baseline) / fp32_bytes:.2f}x the file), "
          f"after loading {(after - baseline) / mib:.0f} MiB")
    assert model_bytes < 0.51 * fp32_bytes
    assert peak - baseline < BOUND * fp32_bytes
