"""Finetuning on a selected subset: linear probe, weighted k-NN, full finetune.

Library entry points (in-memory arrays, no files):
  linear_probe(train_x, train_y, test_x, test_y, ...) -> accuracy   (train.linear)
  knn_eval(train_x, train_y, test_x, test_y, ...) -> accuracy       (train.knn)
Experiment entry point (files, checkpoints, metrics):
  train_and_evaluate(config, workdir)                                (train.train)
"""

from train.knn import knn_eval
from train.linear import linear_probe
from train.train import Config, make_config, train_and_evaluate

__all__ = ["Config", "knn_eval", "linear_probe", "make_config", "train_and_evaluate"]
