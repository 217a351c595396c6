"""`hivlp finetune`: start from a pre-trained checkpoint; hard negatives, lower LR, deeper unfreezing."""

from __future__ import annotations

from hivlp.cli._train import add_train_arguments, run_training


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pre-trained checkpoint on the target dataset",
                       description=__doc__)
    add_train_arguments(p, "finetune")
    p.add_argument("--init", default="outputs/pretrain", help="pre-trained checkpoint (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    return run_training(args, "finetune", init=args.init)
