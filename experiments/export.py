"""Export the attention of a trained checkpoint, for held-out examples or your own inputs.

    python experiments/export.py --workdir runs/reverse
    python experiments/export.py --workdir runs/dates --input "21 November 2026" "Nov 3, 1999"
    python experiments/export.py --workdir runs/sent --input "the plot was not very good"
    python experiments/export.py --workdir runs/lm --out big.npz --top-k 8 --layers '*/1/*'

Writes a .npz in the flaxattn.export format (read it with flaxattn.export.load_attention, plot
it with experiments/plot.py): per-layer weights [B, N, T, S], query and key tokens, valid
lengths, each layer's kind (self, cross, encoder) and the task, config and checkpoint step.
--top-k, --layers and --heads keep long inputs small.
"""

from __future__ import annotations

from pathlib import Path

from _cli import CliError, check_writable_dir, make_parser, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", help="output .npz (default: WORKDIR/attention.npz)")
    parser.add_argument(
        "--input", nargs="+", action="extend", metavar="TEXT",
        help="source strings to run the model on (default: held-out examples)",
    )  # fmt: skip
    parser.add_argument("--examples", type=int, help="number of held-out examples")
    parser.add_argument("--top-k", type=int, help="keep the k largest weights of each row")
    parser.add_argument("--layers", nargs="+", metavar="PATTERN", help="layer path globs")
    parser.add_argument("--heads", type=int, nargs="+", metavar="N", help="head indices")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).expanduser()
    if not (workdir / "checkpoints").is_dir():
        raise CliError(f"no checkpoints in {str(workdir)!r}: train with experiments/train.py")
    if args.top_k is not None and args.top_k < 1:
        raise CliError(f"--top-k must be >= 1, got {args.top_k}")
    if args.examples is not None and args.examples < 1:
        raise CliError(f"--examples must be >= 1, got {args.examples}")
    out = Path(args.out).expanduser() if args.out else workdir / "attention.npz"
    check_writable_dir(out.parent)

    from flaxattn.train import export_checkpoint

    path = export_checkpoint(
        workdir, out, step=args.step, inputs=args.input, examples=args.examples,
        top_k=args.top_k, layers=args.layers, heads=args.heads,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
