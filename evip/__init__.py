"""EViP: the staged training engine (S1.1 concept, S1.2 semantic, S1.3 alignment, S2 instruction tuning).

The engine itself lands with issue 4; this package exists so the distribution's layout (mono, kernels, evip)
is fixed from the start. It holds no training code yet.
"""
