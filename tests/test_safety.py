from __future__ import annotations

import numpy as np
import torch

from safety.checker import SafetyChecker
from safety.tiny import flagged_example
from tests.conftest import CPU


def test_flagged_image_is_blacked_out_and_others_pass(tiny_safety_dir):
    checker = SafetyChecker(tiny_safety_dir, CPU, torch.float32)
    rng = np.random.RandomState(0)
    flagged = flagged_example(96, 80)
    benign = (rng.rand(80, 96, 3) * 255).astype(np.uint8)
    gray = np.full((64, 48, 3), 128, np.uint8)
    images, flags = checker([benign, flagged, gray])
    assert flags == [False, True, False]
    assert images[1].shape == flagged.shape and not images[1].any()
    assert np.array_equal(images[0], benign) and np.array_equal(images[2], gray)
