"""Train a small attention model, evaluate it, export its attention and plot it.

    python experiments/train.py --task reverse --workdir runs/reverse
    python experiments/train.py --task dates --workdir runs/dates-rnn --set model=rnn
    python experiments/train.py --task sentiment --workdir runs/sent --set model=transformer
    python experiments/train.py --task charlm --workdir runs/lm --text my_corpus.txt
    python experiments/train.py --task reverse --workdir runs/reverse --resume --steps 2000

Tasks: copy, reverse, sort (encoder-decoder Transformer); dates (model=rnn: Bahdanau seq2seq,
model=transformer); sentiment (model=rnn: attention RNN, model=transformer); charlm
(decoder-only Transformer on --text, default: Python standard-library sources);
nadaraya_watson (attention pooling, learn_bandwidth=true|false).

Everything goes under --workdir: metrics.jsonl, checkpoints/, attention.npz, figures/*.png,
results.json (and samples.txt for charlm). --set key=value changes any field of the task's
config (see --show-config). The same command runs on CPU, GPU or TPU; with several local
devices the batch is split over a 'data' mesh axis, and --mesh data=D,seq=S also splits the
sequence axis (a data x sequence mesh) and runs self-attention as ring attention. Ctrl-C saves
a checkpoint; --resume continues from the latest one with no step lost.
"""

from __future__ import annotations

import dataclasses
import json

from _cli import (
    CliError,
    check_readable_file,
    check_writable_dir,
    make_parser,
    parse_overrides,
    run_cli,
)

HEADLINE = (
    "exact_match", "accuracy", "alignment", "attention_mass_on_sentiment", "uniform_baseline",
    "bits_per_char", "mse", "mse_nonparametric",
)  # fmt: skip


def build_config(args):
    """The task's default config with the command line's changes, validated."""
    from flaxattn.train import default_config, validate_config

    config = default_config(args.task)
    changes = parse_overrides(args.set, type(config))
    if "task" in changes:
        raise CliError("the task is chosen with --task, not --set task=...")
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.mesh is not None:
        changes["mesh"] = args.mesh
    if args.text is not None:
        if not hasattr(config, "text"):
            raise CliError(f"--text applies to --task charlm, not {args.task}")
        changes["text"] = str(check_readable_file(args.text))
    config = dataclasses.replace(config, **changes)
    validate_config(config)
    return config


def main(argv: list[str] | None = None) -> int:
    from flaxattn.train import TASK_NAMES, train_and_evaluate

    parser = make_parser(__doc__)
    parser.add_argument("--task", required=True, choices=TASK_NAMES, help="what to train")
    parser.add_argument("--workdir", required=True, help="directory for everything the run writes")
    parser.add_argument("--steps", type=int, help="total optimizer steps (default: the task's)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--text", help="charlm: a UTF-8 text file (default: stdlib sources)")
    parser.add_argument(
        "--mesh", metavar="data=D[,seq=S]",
        help="device mesh: D-way data x S-way sequence parallel (default: data over all devices)",
    )  # fmt: skip
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config fields, e.g. --set d_model=128 model=transformer",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--show-config", action="store_true", help="print the config and exit")
    args = parser.parse_args(argv)

    config = build_config(args)
    if args.show_config:
        print(json.dumps(dataclasses.asdict(config), indent=2))
        return 0
    workdir = check_writable_dir(args.workdir)
    results = train_and_evaluate(config, workdir, resume=args.resume, progress=not args.no_progress)
    shown = {k: results[k] for k in HEADLINE if k in results}
    print(f"{config.task}: step {results['step']}, {results['wall_seconds']:.0f} s, "
          + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))  # fmt: skip
    print(f"wrote {workdir}/metrics.jsonl, checkpoints/, attention.npz, figures/")
    return 0


if __name__ == "__main__":
    run_cli(main)
