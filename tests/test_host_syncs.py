"""Host syncs per denoising step: at most one per transformer forward (the cache-aware forward's
batch size of the remaining blocks), none in `none`'s forward.

The model runs on the meta device, which stands in for a GPU here: an op that needs the device's
values on the host (`item`, `nonzero`, boolean-mask indexing, `tolist`) and every copy between the
host (CPU) and the device go through the dispatcher, where `SyncCounter` counts them. Data-dependent
results are made up (every sample runs every block), which is all shapes need.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from models.denoise import denoise_step, start_state
from models.loading import load_scheduler_config
from models.request import GenerationRequest
from models.step_cache import StepCache

aten = torch.ops.aten
META = torch.device("meta")
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _devices(args) -> set[str]:
    found = set()
    for a in args:
        if isinstance(a, torch.Tensor):
            found.add(a.device.type)
        elif isinstance(a, (list, tuple)):
            found |= _devices(a)
    return found


class SyncCounter(TorchDispatchMode):
    """Counts, by kind, the ops that would make a GPU's host wait or copy host data to the device."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet in INDEXING and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self.counts[f"boolean mask ({packet.__name__})"] += 1
        elif packet in HOST_READS and _devices(args) == {"meta"}:
            self.counts[packet.__name__] += 1
            if packet is aten.nonzero:  # as if every element were set
                n = args[0].numel()
                return torch.arange(n, device=META).view(n, 1)
            return 0
        elif packet in (aten._to_copy, aten.copy_):
            target = kwargs.get("device") or (args[0].device if packet is aten.copy_ else None)
            sources = _devices(args[1:] if packet is aten.copy_ else args[:1])
            if target is not None and {target.type} | sources == {"cpu", "meta"}:
                self.counts["host-device copy"] += 1
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def meta_transformer(tiny_model_dir):
    with META:
        return FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(tiny_model_dir / "transformer"))


def state(tiny_model_dir, transformer, seed: int, num_images: int, cached: bool):
    config = transformer.config
    request = GenerationRequest(prompt="", width=128, height=96, num_inference_steps=4, guidance_scale=3.5,
                                seed=seed, num_images=num_images)
    s = start_state(request, load_scheduler_config(tiny_model_dir), torch.zeros(1, 512, config.joint_attention_dim),
                    torch.zeros(1, config.pooled_projection_dim), META, torch.float32)
    s.cache = StepCache(0.1) if cached else None
    return s


@pytest.mark.parametrize("cached", [False, True], ids=["none", "step cache"])
def test_at_most_one_host_sync_per_forward(tiny_model_dir, meta_transformer, cached):
    states = [state(tiny_model_dir, meta_transformer, seed, n, cached) for seed, n in ((0, 1), (1, 2))]
    per_step = []
    for _ in range(3):  # the first step (no cache yet) and later ones
        with SyncCounter() as counter:
            denoise_step(meta_transformer, states)
        per_step.append(dict(counter.counts))
    allowed = [{"nonzero": 1}] * 3 if cached else [{}] * 3
    assert per_step == allowed


def test_forward_times_come_from_device_events_once_the_device_passed_them(monkeypatch):
    """On CUDA the engine's forward times are event times read without waiting: a forward the
    device has not finished is not reported yet, and host time never enters."""
    from models import device as device_module

    class FakeEvent:  # a CUDA event whose device clock and progress the test sets
        def __init__(self, enable_timing: bool = False) -> None:
            self.at_ms, self.passed = None, False

        def record(self) -> None:
            self.at_ms = clock_ms

        def query(self) -> bool:
            return self.passed

        def elapsed_time(self, end: "FakeEvent") -> float:
            return end.at_ms - self.at_ms

    monkeypatch.setattr(device_module.torch.cuda, "Event", FakeEvent)
    timer = device_module.ForwardTimer()
    clock_ms = 0.0
    began = timer.start(torch.device("cuda"))
    clock_ms = 250.0
    timer.stop(began, (3072, 2))
    end = timer._pending[0][2]
    assert timer.finished() == []  # queued, not yet run
    end.passed = began.passed = True
    assert timer.finished() == [((3072, 2), 0.25)]
