"""The Gauss-Newton split H = G + R and the class outliers of MNIST networks, under three losses.

  python -m experiments.curvature --config=configs/curvature.py --workdir=runs/curvature \
      --config.data.data_dir=PATH/TO/MNIST

An MLP and a small CNN train by Adam on a stratified 10,000-image subset of MNIST's training
split under cross-entropy, MSE on softmax probabilities (`loss=mse`) and the square loss on the
logits (Cohen et al.: 0.5 ||z - onehot(y)||^2), each loss from the same initial weights. At the
steps of `measure_at` the Hessian H, the Gauss-Newton matrix G and R = H - G of the loss on a
fixed stratified sample of those images (1,000 for the MLP, 500 for the CNN) are measured (one
Lanczos run each: top and smallest eigenpairs with residuals, SLQ density), with the class-mean
Gram matrix of G.
`:digits` runs the same on the embedded digits in seconds (no download).
"""

import ml_collections

STUDIES = {
    "mnist": dict(num_train=10000, curvature_examples=1000,
                  mlp=dict(model=dict(name="mlp", hidden_sizes=(128, 128), activation="relu"),
                           num_steps=1500, measure_at=(0, 150, 1500), lanczos_order=100,
                           top_k=30),
                  # a CNN's products cost far more than the MLP's on CPU: half the sample
                  cnn=dict(model=dict(name="cnn", conv_features=(4, 8), dense_width=32,
                                      activation="relu"),
                           num_steps=600, measure_at=(0, 150, 600), lanczos_order=40, top_k=15,
                           curvature_examples=500)),
    "digits": dict(num_train=0, curvature_examples=500,
                   mlp=dict(model=dict(name="mlp", hidden_sizes=(32,), activation="relu"),
                            num_steps=300, measure_at=(0, 50, 300), lanczos_order=40, top_k=15),
                   cnn=dict(model=dict(name="cnn", conv_features=(4, 8), dense_width=16,
                                       activation="relu", padding="same"),
                            num_steps=300, measure_at=(0, 50, 300), lanczos_order=30,
                            top_k=15)),
}


def get_config(dataset: str = "mnist") -> ml_collections.ConfigDict:
    if dataset not in STUDIES:
        raise ValueError(f"configs/curvature.py:{dataset}: expected one of {sorted(STUDIES)}")
    study = STUDIES[dataset]
    c = ml_collections.ConfigDict()
    c.seed = 0                     # the subsets, the initial weights, the Lanczos start

    c.data = ml_collections.ConfigDict()
    c.data.name = dataset
    c.data.data_dir = ""           # MNIST's raw files; empty: TFDS (digits: embedded)
    c.data.tfds_data_dir = ""
    c.data.num_train = study["num_train"]  # stratified training subset; 0: the whole split
    c.data.curvature_examples = study["curvature_examples"]  # the fixed sample H, G, R are of

    c.losses = ("cross_entropy", "mse", "square")
    c.networks = ml_collections.ConfigDict({k: study[k] for k in ("mlp", "cnn")})
    c.learning_rate = 1e-3         # Adam
    c.batch_size = 128
    c.tol = 1e-3                   # converged: ||Mv - lambda v|| / |lambda| below this
    c.only = ""                    # one network of `networks` to run alone (e.g. one per process)
    return c
