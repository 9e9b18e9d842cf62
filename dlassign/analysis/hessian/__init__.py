"""Hessian tools over parameter pytrees: the `Curvature` object (H, Gauss-Newton, H - G) of any
loss, HVPs, exact Hessians, Lanczos, SLQ, power iteration, trace."""

from dlassign.analysis.hessian.curvature import Curvature, Trace
from dlassign.analysis.hessian.operators import (
                                        SumCount,
                                        dataset_hvp,
                                        exact_hessian,
                                        flatten_loss,
                                        hvp,
                                        model_batch_loss,
)
from dlassign.analysis.hessian.spectrum import (
                                        Density,
                                        Eigenpairs,
                                        hutchinson_trace,
                                        lanczos,
                                        lanczos_eigenpairs,
                                        power_iteration,
                                        ritz,
                                        slq_density,
)

__all__ = ["Curvature", "Density", "Eigenpairs", "SumCount", "Trace", "dataset_hvp",
           "exact_hessian", "flatten_loss", "hutchinson_trace", "hvp", "lanczos",
           "lanczos_eigenpairs", "model_batch_loss", "power_iteration", "ritz", "slq_density"]
