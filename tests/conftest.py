"""Shared test set-up: 8 simulated CPU devices (for sharding tests) and small real data sets."""

import os

# Must happen before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 1,797 real 8x8 digit images as 64-d float32 features, and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
