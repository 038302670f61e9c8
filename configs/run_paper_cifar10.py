r"""`bilaf run --config paper_cifar10`: the paper's CIFAR-10 setting (DINO ViT-S/16).

Run (GPU; CIFAR-10 prepared by TFDS, which needs TensorFlow and network once;
DINO weights dino_deitsmall16_pretrain.pth from the user):
  bilaf run --config paper_cifar10 --weights dino_deitsmall16_pretrain.pth --workdir runs/c10
Expected (paper Table 1, full finetune, top-1 %, mean of 3): BiLAF 81.0 / 89.2 / 92.5,
ActiveFT 85.0 / 88.2 / 90.1, Random 77.3 / 82.2 / 88.9 at B = 0.5 / 1 / 2%.
Pool = all 50,000 train images, K = 50, 3 seeds; the finetune recipe of configs/cifar10.py
(1000 epochs). Not reproduced here (no CIFAR or DINO weights offline).
Mirrors bilaf_jax.run_configs.paper_cifar10.
"""

from bilaf_jax import run_configs


def get_config():
    return run_configs.paper_cifar10()
