"""`hivlp pretrain`: the pre-training recipe over one or more Karpathy-format corpora."""

from __future__ import annotations

from hivlp.cli._train import add_train_arguments, run_training


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train the hierarchical dual encoder",
                       description=__doc__)
    add_train_arguments(p, "pretrain")
    p.set_defaults(func=run)


def run(args) -> int:
    return run_training(args, "pretrain", init=None)
