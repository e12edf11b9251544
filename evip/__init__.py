"""EViP: the staged training engine (S1.1 concept, S1.2 semantic, S1.3 alignment, S2 instruction tuning).

- :mod:`evip.job`: the job config, one dataclass per concern; :mod:`evip.config` reads YAML into it (errors name the
  key, file and line; dotted overrides; the resolved config is saved with every run).
- :mod:`evip.stages`: the four stages as data (trainable parameter groups, initialisation, defaults).
- :mod:`evip.build`: the model and tokenizer a stage starts from (a plain LLM through ``from_llm``, or the previous
  stage's export).
- :mod:`evip.data`: sources, preprocessing, packing, the resumable sharded loader, skip accounting, ``data check``.
- :mod:`evip.loss`: weighted cross entropy normalised over ranks and accumulation steps.
- :mod:`evip.metrics`: FLOPs and MFU, the step line, TensorBoard / wandb sinks, the progress bar.
- :mod:`evip.checkpoint`: DCP checkpoints, atomic, pruned, resumable on another number of ranks.
- :mod:`evip.train`: one stage (``evip train``); :mod:`evip.recipe`: the chain (``evip run``); :mod:`evip.cli`.
"""
