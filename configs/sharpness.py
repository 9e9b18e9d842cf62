"""Edge of stability (Cohen et al., ICLR 2021): sharpness under full-batch gradient descent.

  python -m experiments.sharpness --config=configs/sharpness.py --workdir=runs/sharpness

runs on the embedded digits' whole training split (no download); on 5,000 MNIST training images:

  python -m experiments.sharpness --config=configs/sharpness.py:mnist \
      --workdir=runs/sharpness_mnist --config.data.data_dir=PATH/TO/MNIST

An MLP with two tanh hidden layers trains by full-batch gradient descent (constant step size eta,
no momentum) under cross-entropy and under MSE (on softmax probabilities, as `loss=mse` trains),
and on MNIST also under Cohen et al.'s square loss on the raw outputs (`loss=square`), three
step sizes each, from the same initial weights; every `eval_every` steps the top Hessian
eigenvalue of the full-batch loss is measured by warm-started power iteration. Writes
results.json (per run: steps to reach 2/eta, the ratio sharpness/(2/eta) afterwards, power
iteration against Lanczos) and sharpness.png into --workdir.
"""

import ml_collections

# Per dataset: step sizes whose 2/eta lies above the sharpness at initialisation (or about at
# it) and within reach of the sharpness's rise in `num_steps` steps (measured: docs/results.md).
# The digits are fit within a few hundred steps, by a narrower network than MNIST's. The square
# loss's sharpness at initialisation on MNIST is about 63 (2/eta above it: eta below 0.032) and
# its rise is slow at such step sizes, so its runs are longer (`num_steps_per_loss`).
STUDIES = {
    "digits": dict(num_examples=0, hidden_sizes=(32, 32), num_steps=600, eval_every=10,
                   step_sizes={"cross_entropy": (0.3, 0.4, 0.5), "mse": (0.6, 0.8, 1.0)}),
    "mnist": dict(num_examples=5000, hidden_sizes=(200, 200), num_steps=1000, eval_every=20,
                  step_sizes={"cross_entropy": (0.24, 0.28, 0.32), "mse": (0.4, 0.5, 0.6),
                              "square": (0.026, 0.028, 0.03)},
                  num_steps_per_loss={"square": 2500}),
}


def get_config(dataset: str = "digits") -> ml_collections.ConfigDict:
    if dataset not in STUDIES:
        raise ValueError(f"configs/sharpness.py:{dataset}: expected one of {sorted(STUDIES)}")
    study = STUDIES[dataset]
    c = ml_collections.ConfigDict()
    c.seed = 0                    # the subset and the initial weights

    c.data = ml_collections.ConfigDict()
    c.data.name = dataset
    c.data.data_dir = ""          # MNIST's raw files; empty: TFDS (digits: embedded)
    c.data.tfds_data_dir = ""
    c.data.num_examples = study["num_examples"]  # stratified subset; 0: the whole train split

    c.model = ml_collections.ConfigDict()
    c.model.hidden_sizes = study["hidden_sizes"]
    c.model.activation = "tanh"

    c.step_sizes = ml_collections.ConfigDict(
        {loss: tuple(etas) for loss, etas in study["step_sizes"].items()})
    c.losses = ""                 # comma-separated keys of step_sizes to run; empty: every one
    c.num_steps = study["num_steps"]  # gradient descent steps per run
    c.num_steps_per_loss = ml_collections.ConfigDict(study.get("num_steps_per_loss", {}))
    c.eval_every = study["eval_every"]  # steps between sharpness measurements
    c.power_iters = 30            # Hessian-vector products per measurement at most
    c.tol = 1e-4                  # converged: ||Hv - lambda v|| / |lambda| below this
    c.lanczos_checks = 3          # measurements per run checked by a cold Lanczos
    c.lanczos_order = 40
    c.reach_tolerance = 0.1       # "reached 2/eta": sharpness >= (1 - 0.1) * 2/eta
    return c
