"""Hessian tools over parameter pytrees: HVPs, exact Hessians, Lanczos, SLQ, power, trace."""

from dlassign.analysis.hessian.operators import (
                                        dataset_hvp,
                                        exact_hessian,
                                        flatten_loss,
                                        hvp,
                                        model_batch_loss,
)
from dlassign.analysis.hessian.spectrum import (
                                        Density,
                                        hutchinson_trace,
                                        lanczos,
                                        power_iteration,
                                        ritz,
                                        slq_density,
)

__all__ = ["Density", "dataset_hvp", "exact_hessian", "flatten_loss", "hutchinson_trace", "hvp",
           "lanczos", "model_batch_loss", "power_iteration", "ritz", "slq_density"]
