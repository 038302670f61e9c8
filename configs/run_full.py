r"""`bilaf run --config full`: GPU. The whole Fashion-MNIST train set (60,000) as the pool at 224 px.

Run (one GPU; check the plan first):
  bilaf run --config full --dry-run --workdir runs/full
  bilaf run --config full --workdir runs/full
Budgets 1 / 2 / 5% (600 / 1,200 / 3,000), K = 120, seeds 0-2, methods as the default;
evaluations: linear probe, k-NN, and full finetuning of EfficientNet-Lite0 with
train.train_and_evaluate (SGD momentum 0.9, lr 3e-3, cosine with 5 warm-up epochs, label
smoothing 0.1, 100 epochs, batch 32; each run checkpointed and resumable).
Not run on this project's CPU machine; expected results unknown.
Mirrors bilaf_jax.run_configs.full.
"""

from bilaf_jax import run_configs


def get_config():
    return run_configs.full()
