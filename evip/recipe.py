"""Chain stages: ``evip run recipe.yaml`` trains each stage of a recipe in order, each from the previous export.

A recipe (:class:`~evip.job.RecipeConfig`) lists stage YAML files; stage k runs in ``<output_dir>/<name>`` (its
entry's ``name``, by default the stage, e.g. ``s1.3``; one stage may run twice under two names) with
``model.init`` set to the export of stage k-1 (the first stage takes the recipe's ``init``, or its own).
A stage whose export already exists is done and is not run again, so re-running a recipe after a crash resumes
it: finished stages are skipped and the interrupted one resumes from its newest checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import load_config, save_config
from .job import JobConfig, RecipeConfig
from .train import TrainResult, close_distributed, train

__all__ = ["main", "run_recipe", "stage_jobs"]


def stage_jobs(
    recipe_path: Path, overrides: Sequence[str] = (), *, output_dir: Optional[Path] = None, init: Optional[Path] = None
) -> tuple[RecipeConfig, list[JobConfig]]:
    """The recipe and its resolved stage configs (each stage's ``output_dir`` and ``model.init`` filled in);
    ``output_dir`` and ``init`` replace the recipe's own."""
    recipe_path = Path(recipe_path)
    recipe = load_config(RecipeConfig, recipe_path)
    if output_dir is not None:
        recipe.output_dir = Path(output_dir)
    if init is not None:
        recipe.init = Path(init)
    jobs: list[JobConfig] = []
    previous: Optional[Path] = None
    for index, entry in enumerate(recipe.stages):
        path = entry.config if entry.config.is_absolute() else recipe_path.parent / entry.config
        first = load_config(JobConfig, path, [*recipe.overrides, *entry.overrides, *overrides])
        name = entry.name or first.stage
        out = Path(recipe.output_dir) / name
        chained = [f"output_dir={out}"]
        if previous is not None:
            chained.append(f"model.init={previous}")
        elif recipe.init is not None:
            chained.append(f"model.init={recipe.init}")
        job = load_config(JobConfig, path, [*recipe.overrides, *entry.overrides, *overrides, *chained])
        if any(Path(j.output_dir).name == name for j in jobs):
            raise ValueError(
                f"{recipe_path}: stages[{index}] runs in {name!r} like an earlier entry; give each run of a stage its "
                "own name (stages[i].name)"
            )
        jobs.append(job)
        previous = out / "export"
    return recipe, jobs


def run_recipe(recipe_path: Path, overrides: Sequence[str] = ()) -> list[Optional[TrainResult]]:
    """Train every stage of the recipe that has no export yet; ``None`` for stages already done."""
    recipe, jobs = stage_jobs(recipe_path, overrides)
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun starts every rank on this: one writer
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(recipe, Path(recipe.output_dir) / "recipe.yaml")
    results: list[Optional[TrainResult]] = []
    for job in jobs:
        if (Path(job.output_dir) / "export" / "config.json").is_file():
            print(f"stage {Path(job.output_dir).name}: done ({job.output_dir}/export exists), skipped", flush=True)
            results.append(None)
            continue
        results.append(train(job))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``evip run recipe.yaml [key=value ...]`` (overrides apply to every stage)."""
    import argparse

    parser = argparse.ArgumentParser(prog="evip run", description="Run the stages of a recipe in order.")
    parser.add_argument("recipe", type=Path, help="recipe YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every stage")
    args = parser.parse_args(argv)
    run_recipe(args.recipe, args.overrides)
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
