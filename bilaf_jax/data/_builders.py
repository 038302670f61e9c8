"""What this package's own TFDS builders share (Fashion-MNIST, MNIST-5k)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


def grey_28x28_info(builder: tfds.core.GeneratorBasedBuilder, label, homepage: str):
    """DatasetInfo of (image uint8 [28, 28, 1], label) examples kept in generation order.

    label: a `tfds.features.ClassLabel`.
    """
    return builder.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {"image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8), "label": label}
        ),
        supervised_keys=("image", "label"),
        # Keep the generated order: pool row ids must mean the same image everywhere.
        disable_shuffling=True,
        homepage=homepage,
    )
