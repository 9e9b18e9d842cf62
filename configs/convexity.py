"""Questions 1 and 2: convexity of logistic regression and deep linear networks, CE vs MSE.

  python -m experiments.convexity --config=configs/convexity.py --workdir=runs/convexity

Defaults: scikit-learn's embedded digits, classes 3 (label 0) and 8 (label 1), 64 pixel
features; everything in float64 with exact Hessians. Other data:
  --config.data.name=mnist --config.data.data_dir=PATH/TO/MNIST   (two MNIST classes)
  --config.data.name=synthetic                                   (Gaussian blobs)
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"          # digits | mnist | synthetic
    c.data.data_dir = ""
    c.data.classes = (3, 8)         # (label 0, label 1)
    c.data.max_examples = 0         # 0: all examples of the two classes (MNIST: ~12,000)
    c.data.seed = 0
    c.data.synthetic_examples = 400
    c.data.synthetic_dim = 10
    c.data.synthetic_separation = 2.0

    c.logistic = ml_collections.ConfigDict()
    c.logistic.seed = 0
    c.logistic.lr = 1.0             # full-batch gradient descent
    c.logistic.reference_steps = 5000  # GD steps from zero that fix the CE minimiser's direction
    c.logistic.random_scales = (0.1, 1.0, 10.0, 100.0)  # norm of random parameter points
    c.logistic.points_per_scale = 10
    c.logistic.saturated_scales = (30.0, 100.0, 1000.0)  # +-c times the unit CE direction
    c.logistic.train_steps = 2000
    c.logistic.train_seeds = 3
    c.logistic.init_scale = 1.0     # norm of the random starting points
    c.logistic.saturated_init = 30.0  # a start confidently wrong on every example
    c.logistic.snapshot_every = 200  # trajectory points whose Hessians are measured
    c.logistic.target_probability = 0.9  # target loss: every example at p = 0.9 on its class
    c.logistic.target_accuracy = 0.95
    c.logistic.slice_extent = 40.0
    c.logistic.slice_points = 401
    c.logistic.eig_tolerance = 1e-10  # round-off bound, relative to the largest |eigenvalue|

    c.deep_linear = ml_collections.ConfigDict()
    c.deep_linear.seed = 0
    c.deep_linear.hidden_layers = (1, 2, 3)
    c.deep_linear.width = 4
    c.deep_linear.lr = 0.5
    c.deep_linear.train_steps = 3000
    c.deep_linear.init_scale = 1.0  # times Flax's default (LeCun normal) initialisation
    c.deep_linear.snapshot_every = 300
    c.deep_linear.random_scales = (0.5, 1.0, 2.0)
    c.deep_linear.points_per_scale = 5
    c.deep_linear.origin_probe = 0.1  # step t along +-(trained point) from the origin
    c.deep_linear.eig_tolerance = 1e-10
    return c
