"""bilaf_jax: BiLAF (Bi-Level Active Finetuning, NeurIPS 2024) in JAX.

From a pretrained backbone's features of an unlabelled pool, choose the samples worth labelling:
core samples for coverage (stage 1, `activeft` or a baseline), then boundary samples near the
pseudo-class boundaries (stage 2, `bilaf`). `select` runs both.

Modules, one per stage:
  distances   chunked pairwise distances, nearest-centre assignment, k-NN (dimension glossary)
  activeft    stage 1: ActiveFT core selection
  baselines   random, k-center (FDS), k-means
  boundary    stage 2: assignment, IDC denoising, boundary score, iterative selection
  pipeline    select(): both stages in one call
  sharding    placing a pool across devices
  sweep       vmapped hyperparameter grids with label-free quality measures
Edges: io (files, atomic writes), data (datasets), backbones (Flax NNX feature extractors),
extract (resumable feature extraction), experiment (`bilaf run`), cli (`bilaf`).

`bilaf_jax.activeft` here is the function, which hides the module of that name as a package
attribute: `from bilaf_jax.activeft import activeft_loss` reaches the module's other names.
"""

from bilaf_jax import distances
from bilaf_jax.activeft import ActiveFTOutput, activeft
from bilaf_jax.baselines import kcenter_select, kmeans_select, random_select
from bilaf_jax.boundary import BilafOutput, bilaf
from bilaf_jax.distances import knn, nearest_centre
from bilaf_jax.pipeline import SelectOutput, default_num_cores, select
from bilaf_jax.sharding import make_mesh, shard_rows

__version__ = "0.1.0"

__all__ = [
    "ActiveFTOutput",
    "BilafOutput",
    "SelectOutput",
    "activeft",
    "bilaf",
    "default_num_cores",
    "distances",
    "kcenter_select",
    "kmeans_select",
    "knn",
    "make_mesh",
    "nearest_centre",
    "random_select",
    "select",
    "shard_rows",
    "__version__",
]
