r"""Full finetuning on the CPU: does BiLAF's selection pay off when the backbone is trained?

Run (CPU, 50-60 min on 2 cores (README); reuses the features of a finished default run):
  mkdir -p runs/finetune_cpu && cp -r runs/default/features runs/finetune_cpu/
  bilaf run --config configs/run_finetune_cpu.py --workdir runs/finetune_cpu
Expected: README, "Full finetuning on the CPU" (measured there, 3 seeds).

The default config's pool, features for selection and K = 20, with every selection of random,
ActiveFT and both BiLAF modes at B = 100 and 500 (1% and 5%) finetuned end to end:
EfficientNet-Lite0 (ImageNet weights) plus a linear head on the 48 px images, SGD with
Nesterov momentum 0.9 and gradient clipping at norm 2.0 (run_configs.CPU_FINETUNE), lr 3e-3,
weight decay 1e-4, cosine with warm-up, label smoothing 0.1, stochastic depth 0.2,
random-resized-crop and flip, 500 steps of batch 32 at every budget (160 epochs of 100
labelled images, 32 of 500; the paper's recipe runs 1,000 epochs at 224 px, beyond this CPU;
30 epochs left B = 100 at 45-52% after 94 steps, with an earlier recipe). Test accuracy on
all 10,000 Fashion-MNIST test images.
"""

from bilaf_jax import run_configs


def get_config():
    return dict(
        methods=("random", "activeft", "bilaf-paper", "bilaf-official"),
        budget_fractions=(0.01, 0.05),
        seeds=(0, 1, 2),
        evals=("full",),
        finetune=dict(run_configs.CPU_FINETUNE),
        notes="Full finetuning of EfficientNet-Lite0 at 48 px, 500 steps of 32, on the CPU; "
              "selection as the default config (K = 20).",
    )
