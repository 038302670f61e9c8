"""Helpers shared by the benchmark and parity scripts (synthetic pools, host info, the
authors' stage-2 file loaded from a user-given path)."""

from __future__ import annotations

import importlib.util
import platform
import sys
import types

import numpy as np


def mixture(n, d, clusters, seed, chunk=65536):
    """Gaussian mixture [n, d] float32: centres ~ N(0, 4 I), unit noise; chunked generation."""
    rng = np.random.default_rng(seed)
    centres = (2.0 * rng.standard_normal((clusters, d))).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        lab = rng.integers(0, clusters, e - s)
        out[s:e] = centres[lab] + rng.standard_normal((e - s, d), dtype=np.float32)
    return out


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_authors(path):
    # Their module imports torch at top level but the selection functions never use it.
    if "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.modules["torch"] = types.ModuleType("torch")
    spec = importlib.util.spec_from_file_location("authors_density_cluster", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
