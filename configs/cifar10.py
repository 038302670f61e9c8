r"""CIFAR-10, the paper's full-finetune recipe (BiLAF Table 1; DeiT-S/16 with DINO weights).

Run (GPU; DINO weights dino_deitsmall16_pretrain.pth from the user; CIFAR prepared by TFDS):
  bilaf select ... --budget 500 --out sel.json                 # B = 1% of the 50,000 pool
  bilaf finetune --config cifar10 --dataset cifar10 --selection sel.json \
      --weights dino_deitsmall16_pretrain.pth --workdir runs/c10_bilaf_1pct
Expected (paper, top-1 %, mean of 3): BiLAF 81.0 / 89.2 / 92.5 at B = 0.5 / 1 / 2 %
(Random 77.3 / 82.2 / 88.9). Not reproduced here: no CIFAR or DINO weights offline.

Recipe: SGD momentum 0.9, lr 3e-3, weight decay 1e-4, cosine schedule with 5 warm-up epochs,
label smoothing 0.1, drop-path 0.1, RandomResizedCrop 224 (bicubic, as DeiT) + flip, 1000
epochs, run as the authors' finetuning script (BiLAF's deit/main.py, samplers.py and README
command, 2 GPUs x 256) runs it:
- Nesterov momentum (timm's "sgd") and gradient clipping at global norm 2.0.
- Their lr is scaled by batch x GPUs / 512: 3e-3 is the rate of their global batch of 512,
  so batch_size is 512 here (on any number of devices dividing each batch).
- Their repeated-augmentation sampler (sampler "deit", 3 copies of each image, each with its
  own crop): an epoch is max(1, n // 256) * 256 samples, so at B <= 511 one step of 256
  samples (about 86 images) per epoch, 1001 steps in all; its last batch is smaller. It deals
  its list over their 2 GPUs (sampler_replicas 2), padded with its head where 2 does not
  divide the 3 B copies: at an odd B below 86 an epoch holds one copy more.
- Their per-epoch schedule (schedule "deit"): timm's cosine from a warm-up at 1e-6 to a floor
  of 1e-5, stepped after each epoch, over epochs 0 to 1000 as their loop.
- The head starts normal with std 0.02 (timm's ViT).
- Training crops are taken from the 32 px images as stored (crop_from "stored"), each crop
  resampled to 224 bicubic, as their RandomResizedCrop does.
- Test images as DeiT evaluates them: the shorter side resized to 256, the centre 224 kept
  (eval_crop_fraction 0.875).
- An evaluation after epochs 0, 50, ..., 1000 (eval_every_epochs): summary.json's
  best_accuracy is the best of them, the number their script reports (final_accuracy is the
  last).
Not as theirs: they train under fp16 autocast, this in float32; Pillow rounds its bicubic
crops to uint8, these stay float; their permutations and crops come from torch's generator,
these from JAX's; and on ImageNet (configs/imagenet.py) the crops come from images resized to
224 x 224 first (images of many sizes cannot be held as stored), theirs from each image at
its own size and aspect ratio.
"""


def get_config() -> dict:
    return dict(
        mode="full",
        dataset="cifar10",
        pool_size=None,
        backbone="vit_s16",
        image_size=224,
        epochs=1000,
        batch_size=512,  # their 2 GPUs x 256, the batch their lr of 3e-3 is scaled for
        optimizer="sgd",
        learning_rate=3e-3,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-4,
        warmup_epochs=5,
        schedule="deit",  # timm's cosine, stepped per epoch as their loop steps it
        warmup_lr=1e-6,
        min_lr=1e-5,
        sampler="deit",  # their repeated-augmentation sampler's epochs
        repeated_augmentation=3,
        sampler_replicas=2,
        head_init="normal",
        label_smoothing=0.1,
        drop_path=0.1,
        crop_scale_min=0.08,
        crop_interpolation="bicubic",  # DeiT's training crops
        crop_from="stored",  # of CIFAR's 32 px images, as their transform
        grad_clip_norm=2.0,
        eval_crop_fraction=0.875,
        eval_every_epochs=50,  # their --eval_interval 50: best_accuracy is their report
        log_every=50,
        checkpoint_every=1000,
        num_classes=10,
    )
