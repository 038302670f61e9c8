r"""`bilaf run --config paper_imagenet`: the paper's ImageNet-1k setting (DINO ViT-S/16).

Run (GPU; ImageNet-2012 prepared by TFDS from the ILSVRC2012 archives in
<tfds dir>/downloads/manual, which needs TensorFlow once; DINO weights from the user):
  bilaf run --config paper_imagenet --weights dino_deitsmall16_pretrain.pth --workdir runs/in1k
Expected (paper Table 1, full finetune, top-1 % on the validation split, mean of 3): BiLAF
50.8 / 56.9 / 66.2, ActiveFT 50.1 / 55.8 / 65.3, Random 45.1 / 52.1 / 64.3 at B = 1 / 2 / 5%
(12,811 / 25,623 / 64,058 of 1,281,167). K = 6,405; ActiveFT 100 steps on batches of 100,000
rows; P_rm = 0.2; the finetune recipe of configs/imagenet.py (host memory: see there).
Not reproduced here (no ImageNet or DINO weights offline).
Mirrors bilaf_jax.run_configs.paper_imagenet.
"""

from bilaf_jax import run_configs


def get_config():
    return run_configs.paper_imagenet()
