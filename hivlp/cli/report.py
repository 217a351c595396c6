"""`hivlp report`: a run's val metrics and per-epoch history as small files git and DVC keep history of
(metrics/val.json, plots/history.csv, plots/levels.csv: what `dvc metrics show`, `dvc metrics diff`,
`dvc plots show` and `dvc exp show` read). Reads `hivlp evaluate`'s metrics JSON and the history.json
each training run writes beside its checkpoint."""

from __future__ import annotations

import argparse

DEFAULT_METRICS = "outputs/metrics.json"
DEFAULT_HISTORIES = ["outputs/pretrain/history.json", "outputs/finetune/history.json"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="val R@K per level + per-epoch history as committed DVC metrics and plots files",
        description=__doc__,
    )
    p.add_argument("--metrics", default=DEFAULT_METRICS,
                   help="metrics JSON of `hivlp evaluate` (default: %(default)s)")
    p.add_argument("--history", action="append",
                   help="a run's history.json, in training order; repeat for several runs "
                        f"(default: {' '.join(DEFAULT_HISTORIES)})")
    p.add_argument("--metrics-dir", default="metrics", help="where val.json goes (default: %(default)s)")
    p.add_argument("--plots-dir", default="plots",
                   help="where history.csv and levels.csv go (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hivlp.io import check_output_dir
    from hivlp.report import write_report

    check_output_dir(args.metrics_dir, "--metrics-dir")
    check_output_dir(args.plots_dir, "--plots-dir")
    written = write_report(args.metrics, args.history or DEFAULT_HISTORIES, args.metrics_dir, args.plots_dir)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
