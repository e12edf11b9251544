"""EViP: the staged training engine (S1.1 concept, S1.2 semantic, S1.3 alignment, S2 instruction tuning).

Landed so far (the first slice of issue 4):
- :mod:`evip.config`: YAML into typed dataclasses; unknown keys, wrong types and missing keys are errors naming
  the key, file and line; dotted command-line overrides; the resolved config saved with a run.
- :mod:`evip.stages`: the four stages as data (trainable parameter groups, initialisation, defaults) and
  :func:`evip.stages.set_trainable`.
The data pipeline, the FSDP2 trainer, checkpoints and metrics follow.
"""
