"""EViP: the staged training engine (S1.1 concept, S1.2 semantic, S1.3 alignment, S2 instruction tuning).

Landed so far (the first slice of issue 4):
- :mod:`evip.config`: YAML into typed dataclasses; unknown keys, wrong types and missing keys are errors naming
  the key, file and line; dotted command-line overrides; the resolved config saved with a run.
- :mod:`evip.stages`: the four stages as data (trainable parameter groups, initialisation, defaults) and
  :func:`evip.stages.set_trainable`.
- :mod:`evip.checkpoint`: DCP checkpoints (model, optimizer, scheduler, per-rank RNG, run state) written
  atomically, pruned to the last K, found after a crash, resumable on another number of ranks.
The data pipeline, the FSDP2 trainer and metrics follow.
"""
