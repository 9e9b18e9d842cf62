"""dlassign: convexity, MNIST and SVHN studies in JAX/Flax.

Importing the package does no work: no devices are touched and no data is read.
"""

__version__ = "0.1.0"
