"""Figures from an attention export (see flaxattn.export for the .npz schema).

    python experiments/plot.py EXPORT.npz --out DIR
        [--kind heatmap|grid|rollout|stats|text|curves|all] [--example 0] [--layer PATH]
        [--head 0|mean] [--format png|pdf|svg] [--metrics metrics.jsonl]

--kind all (the default) makes every figure that applies to the export; curves need a metrics
file, by default the metrics.jsonl next to the export if there is one.
"""

from __future__ import annotations

from pathlib import Path

import _cli


def main(argv: list[str] | None = None) -> int:
    parser = _cli.make_parser(__doc__)
    parser.add_argument("export", help="attention export (.npz) written by train.py/export.py")
    parser.add_argument("--out", required=True, help="directory for the figures (created)")
    parser.add_argument(
        "--kind",
        default="all",
        choices=("heatmap", "grid", "rollout", "stats", "text", "curves", "all"),
    )
    parser.add_argument("--example", type=int, default=0, help="example index in the batch")
    parser.add_argument("--layer", default=None, help="layer path (default: last cross layer)")
    parser.add_argument("--head", default="0", help="head index, or 'mean' (heatmap)")
    parser.add_argument("--format", default="png", choices=("png", "pdf", "svg"))
    parser.add_argument("--metrics", default=None, help="metrics.jsonl for --kind curves")
    args = parser.parse_args(argv)

    head = args.head
    if head != "mean":
        try:
            head = int(head)
        except ValueError:
            raise _cli.CliError(f"--head must be an integer or 'mean', got {head!r}") from None
    export_path = _cli.check_readable_file(args.export)
    metrics = args.metrics
    if metrics is not None:
        metrics = _cli.check_readable_file(metrics)
    elif args.kind in ("curves", "all") and (export_path.parent / "metrics.jsonl").is_file():
        metrics = export_path.parent / "metrics.jsonl"
    if args.kind == "curves" and metrics is None:
        raise _cli.CliError("--kind curves needs --metrics metrics.jsonl")
    out = _cli.check_writable_dir(args.out)

    import matplotlib

    matplotlib.use("Agg")  # a command-line program: never open windows
    from flaxattn import viz
    from flaxattn.export import load_attention

    export = load_attention(export_path)
    if args.kind == "curves":
        fig = viz.plot_training_curves(metrics, title=f"training — {export.meta.get('task')}")
        written, skipped = [viz.save_figure(fig, Path(out) / f"curves.{args.format}")], []
    else:
        kinds = viz.PLOT_KINDS if args.kind == "all" else (args.kind,)
        written, skipped = viz.plot_export(
            export,
            out,
            kinds=kinds,
            example=args.example,
            layer=args.layer,
            head=head,
            fmt=args.format,
            metrics=metrics,
            strict=args.kind != "all",
        )
    for path in written:
        print(path)
    for note in skipped:
        print(f"skipped {note}")
    return 0


if __name__ == "__main__":
    _cli.run_cli(main)
