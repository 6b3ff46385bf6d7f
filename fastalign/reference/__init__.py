"""Naive eager implementations: the test oracles and the "eager PyTorch" benchmark baselines.

They favour obviousness over memory. Pass float64 inputs to get a float64 reference.
"""
