r"""`bilaf run` default: Fashion-MNIST, pool = first 10,000 train images, 10,000 test images.

Run (CPU: 1.5 to 5 min from an empty workdir on 2 cores, by load; README's timing table):
  bilaf run --workdir runs/default            # or: bash scripts/run_main.sh
Expected: see README.md (results table of an actual run) and runs/default/results.md.

EfficientNet-Lite0 (ImageNet weights) pooled taps of blocks 4, 10, 15 and the head (1,752-d) at
48 px. Methods random, kcenter, kmeans, activeft, bilaf-paper, bilaf-official; budgets 1 / 2 / 5%
(100 / 200 / 500); seeds 0-4; linear probe and weighted k-NN on the cached features.
K = 20 ActiveFT cores for BiLAF: K = B_min / 5, the paper's CIFAR-10 ratio (K = 50 at B = 250),
fixed across budgets (see bilaf_jax/run_configs.py for the reasoning).
This file mirrors bilaf_jax.run_configs.default (the one `--config default` loads);
`bilaf run --config configs/run_default.py` loads this file instead.
"""

from bilaf_jax import run_configs


def get_config():
    return run_configs.default()
