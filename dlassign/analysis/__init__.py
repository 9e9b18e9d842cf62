"""Analyses of models and runs: Hessian tools, the convexity studies, run comparisons."""
