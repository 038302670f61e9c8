r"""`bilaf run --quick`: the default pipeline on 2,000 pool and 2,000 test images, 2 seeds.

Run (CPU, a few minutes from a fresh workdir):
  bilaf run --quick --workdir runs/quick      # or: bash scripts/run_main.sh --quick
Budgets 20 / 40 / 100, K = 4 cores, 100 ActiveFT steps. A smoke test of the whole pipeline;
its numbers are noisy (2 seeds, tiny budgets).
Mirrors bilaf_jax.run_configs.quick.
"""

from bilaf_jax import run_configs


def get_config():
    return run_configs.quick()
