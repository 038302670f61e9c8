r"""`bilaf run --config paper_cifar100`: the paper's CIFAR-100 setting (DINO ViT-S/16).

Run (GPU; CIFAR-100 prepared by TFDS, which needs TensorFlow and network once;
DINO weights dino_deitsmall16_pretrain.pth from the user):
  bilaf run --config paper_cifar100 --weights dino_deitsmall16_pretrain.pth --workdir runs/c100
Expected (paper Table 1, full finetune, top-1 %, mean of 3): BiLAF 31.8 / 43.5 / 62.8 / 73.7,
ActiveFT 26.1 / 40.7 / 54.6 / 71.0, Random 14.9 / 24.3 / 50.8 / 69.3 at B = 1 / 2 / 5 / 10%.
Pool = all 50,000 train images, K = 250, 3 seeds; the finetune recipe of configs/cifar100.py
(1000 epochs). Not reproduced here (no CIFAR or DINO weights offline).
Mirrors bilaf_jax.run_configs.paper_cifar100.
"""

from bilaf_jax import run_configs


def get_config():
    return run_configs.paper_cifar100()
