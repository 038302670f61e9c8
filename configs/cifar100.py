r"""CIFAR-100, the paper's full-finetune recipe (BiLAF Table 1; DeiT-S/16 with DINO weights).

Run (GPU; DINO weights from the user; CIFAR-100 prepared by TFDS):
  bilaf select ... --budget 1000 --out sel.json                # B = 2% of the 50,000 pool
  bilaf finetune --config cifar100 --dataset cifar100 --selection sel.json \
      --weights dino_deitsmall16_pretrain.pth --workdir runs/c100_bilaf_2pct
Expected (paper, top-1 %, mean of 3): BiLAF 31.8 / 43.5 / 62.8 / 73.7 at B = 1 / 2 / 5 / 10 %
(Random 14.9 / 24.3 / 50.8 / 69.3). Not reproduced here: no CIFAR or DINO weights offline.

Recipe as configs/cifar10.py (Nesterov SGD 0.9, lr 3e-3 for a global batch of 512, wd 1e-4,
cosine stepped per epoch, 5 warm-up epochs, label smoothing 0.1, drop-path 0.1, gradient
clipping at 2.0, RandomResizedCrop 224 (bicubic) + flip, the authors' repeated-augmentation
sampler, 1000 epochs).
"""

import importlib.util
from pathlib import Path


def get_config() -> dict:
    spec = importlib.util.spec_from_file_location("_c10", Path(__file__).with_name("cifar10.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    return dict(base.get_config(), dataset="cifar100", num_classes=100)
