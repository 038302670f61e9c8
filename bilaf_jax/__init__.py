"""bilaf_jax: BiLAF (Bi-Level Active Finetuning, NeurIPS 2024) in JAX.

Stage 1 picks core samples (ActiveFT or a baseline); stage 2 adds boundary samples.
"""

from bilaf_jax import distances
from bilaf_jax.distances import knn, nearest_centre

__version__ = "0.1.0"

__all__ = ["distances", "knn", "nearest_centre", "__version__"]
