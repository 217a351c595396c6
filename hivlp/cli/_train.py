"""Shared parser and runner of `hivlp pretrain` and `hivlp finetune` (one engine, two recipes)."""

from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser, recipe: str) -> None:
    p.add_argument("--config", default=f"configs/{recipe}.yaml", help="recipe YAML (default: %(default)s)")
    p.add_argument("--out", default=f"outputs/{recipe}", help="checkpoint folder (default: %(default)s)")
    p.add_argument("--dataset", action="append", metavar="JSON",
                   help="Karpathy-format dataset JSON (repeat to mix corpora); overrides data.datasets")
    p.add_argument("--image-root", help="image root for the dataset(s); default: each JSON's folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read images whose path leads outside the image root (data.allow_outside_root)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh: discard the run saved in --out (its resume state; its checkpoint is "
                        "replaced by this run's). Without it, re-running the same command resumes or does "
                        "nothing if finished, and a different config is refused")


def run_training(args: argparse.Namespace, recipe: str, init: str | None) -> int:
    from hivlp.retrieval.evaluate import format_table
    from hivlp.train.trainer import run_recipe

    overrides = [*args.overrides, *(["data.allow_outside_root=true"] if args.allow_outside_root else [])]
    result = run_recipe(args.config, args.out, recipe, datasets=args.dataset, image_root=args.image_root,
                        overrides=overrides, init=init, resume=not args.no_resume)
    if result.history:
        best = next((h for h in result.history if h["epoch"] == result.best_epoch), result.history[-1])
        print(f"\n{recipe}: best val AR {result.best_metric:.2f} at epoch {result.best_epoch} "
              f"({result.seconds / 60:.1f} min); checkpoint at {result.out_dir}")
        print(format_table(best["metrics"]))
    if result.run_id:
        print(f"MLflow run: {result.run_id}")
    return 0
