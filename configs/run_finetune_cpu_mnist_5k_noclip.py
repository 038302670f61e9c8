r"""Full finetuning on the CPU on MNIST-5k without gradient clipping:
configs/run_finetune_cpu_mnist_5k.py with grad_clip_norm None, everything else the same.

Run (CPU, 42 min on 2 cores beside the clipped run (README); reuses the features and
selections of a finished mnist_5k run made by this version):
  mkdir -p runs/finetune_cpu_mnist_5k_noclip
  cp -r runs/mnist_5k/features runs/mnist_5k/selections runs/finetune_cpu_mnist_5k_noclip/
  bilaf run --config configs/run_finetune_cpu_mnist_5k_noclip.py \
      --workdir runs/finetune_cpu_mnist_5k_noclip
Expected: README, "A second dataset: MNIST-5k" (measured there, 3 seeds).

Why: with the authors' clipping at norm 2.0 these 500 steps end far below the linear probe on
frozen features; configs/run_finetune_cpu_noclip.py reruns the Fashion-MNIST comparison
without it, and this the MNIST-5k one.
"""

from pathlib import Path

from bilaf_jax.io import call_get_config


def get_config():
    clipped = call_get_config(Path(__file__).with_name("run_finetune_cpu_mnist_5k.py"))
    return clipped._replace(
        name="finetune_cpu_mnist_5k_noclip",
        finetune=dict(clipped.finetune, grad_clip_norm=None),
        notes="Full finetuning of EfficientNet-Lite0 at 48 px, 500 steps of 32, on the CPU, "
              "without gradient clipping; selection as the mnist_5k config (K = 16), B = 10% "
              "only.")
