"""The model-surgery core: factorization, operators, merging, pruning, apply, save/load.

It sits at the bottom of the layer line and imports nothing above torch and timm:
``spaces``, ``evaluators``, ``search`` and ``reports`` build on it, never the reverse.
"""
