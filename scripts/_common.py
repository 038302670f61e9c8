"""Helpers shared by the benchmark and parity scripts (synthetic pools, host info, the
authors' stage-2 file loaded from a user-given path)."""

from __future__ import annotations

import importlib.util
import platform
import sys
import time
import types

import numpy as np


def fail(prog: str, message) -> int:
    """Say `message` on one line of stderr as `prog: error: ...`; the exit code for bad input."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    return 2


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


class PhaseTimer:
    """Wraps the boundary stage's steps (`_assign_jit`, `_plan`, `_run_buckets`, which compiles
    and runs the class programs, and `_assemble_jit`) with blocking timers (for --profile)."""

    PHASES = {"_assign_jit": "assign", "_plan": "plan", "_run_buckets": "bucket",
              "_assemble_jit": "assemble"}

    def __init__(self, module):
        import jax

        self.module, self.jax, self.totals, self.saved = module, jax, {}, {}
        for attr, phase in self.PHASES.items():
            fn = getattr(module, attr)
            self.saved[attr] = fn
            setattr(module, attr, self._wrap(fn, phase))

    def _wrap(self, fn, phase):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = self.jax.block_until_ready(fn(*args, **kwargs))
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - t0
            return out

        return timed

    def reset(self):
        self.totals = {}

    def restore(self):
        for attr, fn in self.saved.items():
            setattr(self.module, attr, fn)


class CompileClock:
    """Seconds XLA spent compiling (its backend-compile events) since the last `take()`: a run
    timed as steady state that compiled something is not steady (on a GPU, ActiveFT's scatter-add
    is not deterministic, so a rerun's cores, and with them the boundary stage's shapes, can
    differ)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax.monitoring

        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration_secs, **_):
        if event == self.EVENT:
            self.total += duration_secs

    def take(self) -> float:
        secs, self.total = self.total, 0.0
        return round(secs, 3)
