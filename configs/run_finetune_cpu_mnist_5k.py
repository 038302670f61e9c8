r"""Full finetuning on the CPU on MNIST-5k: does BiLAF's lead at 10% survive training the backbone?

Run (CPU, 42 min on 2 cores beside the noclip run (README); reuses the features and
selections of a finished mnist_5k run):
  mkdir -p runs/finetune_cpu_mnist_5k
  cp -r runs/mnist_5k/features runs/mnist_5k/selections runs/finetune_cpu_mnist_5k/
  bilaf run --config configs/run_finetune_cpu_mnist_5k.py --workdir runs/finetune_cpu_mnist_5k
Expected: README, "A second dataset: MNIST-5k" (measured there, 3 seeds).

The mnist_5k config's pool, selection features and K = 16, at B = 400 (10%) only: the budget
where the linear probe put both BiLAF modes ahead of random (the one tested here, chosen for
that reason). Random, ActiveFT and both BiLAF modes, seeds 0-2, each selection finetuned end
to end as configs/run_finetune_cpu.py does on Fashion-MNIST: EfficientNet-Lite0 (ImageNet
weights) plus a linear head on 48 px images, SGD with Nesterov momentum 0.9 and gradient
clipping at norm 2.0 (run_configs.CPU_FINETUNE), lr 3e-3, weight decay 1e-4, cosine with
warm-up, label smoothing 0.1, stochastic depth 0.2, random-resized crop and flip, 500 steps of
32 (40 epochs of 400 images). Test accuracy on all 1,000 MNIST-5k test digits.
"""

from bilaf_jax import run_configs


def get_config():
    return run_configs.mnist_5k()._replace(
        name="finetune_cpu_mnist_5k",
        methods=("random", "activeft", "bilaf-paper", "bilaf-official"),
        budget_fractions=(0.10,),
        seeds=(0, 1, 2),
        evals=("full",),
        finetune=dict(run_configs.CPU_FINETUNE),
        notes="Full finetuning of EfficientNet-Lite0 at 48 px, 500 steps of 32, on the CPU; "
              "selection as the mnist_5k config (K = 16), B = 10% only.",
    )
