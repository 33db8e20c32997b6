"""Train a small attention model, evaluate it, export its attention and plot it.

    python experiments/train.py --task reverse --workdir runs/reverse
    python experiments/train.py --task dates --workdir runs/dates-rnn --set model=rnn
    python experiments/train.py --task sentiment --workdir runs/sent --set model=transformer
    python experiments/train.py --task charlm --workdir runs/lm --text my_corpus.txt
    python experiments/train.py --task reverse --workdir runs/reverse --resume --steps 2000
    python experiments/train.py --task charlm --workdir /shared/lm --mesh data=8,seq=4 --distributed

Tasks: copy, reverse, sort (encoder-decoder Transformer); dates (model=rnn: Bahdanau seq2seq,
model=transformer); sentiment (model=rnn: attention RNN, model=transformer); charlm
(decoder-only Transformer on --text, default: Python standard-library sources);
nadaraya_watson (attention pooling, learn_bandwidth=true|false); induction (a 2-layer
attention-only decoder on repeated random segments; interp.json and figures/interp_*.png report
its induction circuit by ablation, patching and logit attribution).

Everything goes under --workdir: metrics.jsonl, checkpoints/, attention.npz, figures/*.png,
figures/view.html (the interactive explorer of attention.npz: open it in a browser),
results.json (and samples.txt for charlm). --set key=value changes any field of the task's
config (see --show-config). The same command runs on CPU, GPU or TPU; with several local
devices the batch is split over a 'data' mesh axis, and --mesh data=D,seq=S also splits the
sequence axis (a data x sequence mesh) and runs self-attention as ring attention. Ctrl-C saves
a checkpoint; --resume continues from the latest one with no step lost.

Multi-host: run the same command on every host with --distributed, which calls
jax.distributed.initialize() first (on a TPU pod, SLURM or Open MPI it finds the other
processes itself; elsewhere give --coordinator, --num-processes and --process-id). The mesh
then spans every host's devices (--mesh sizes are global), the batch size is global too, and
only process 0 writes metrics, exports and results; --workdir must be a shared directory.
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


def start_distributed(args) -> None:
    """``jax.distributed.initialize`` with the flags given (the rest auto-detected), or nothing
    without --distributed. Must run before anything touches a JAX backend."""
    manual = {
        "coordinator_address": args.coordinator,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    flags = {"coordinator_address": "--coordinator", "num_processes": "--num-processes",
             "process_id": "--process-id"}  # fmt: skip
    if not args.distributed:
        given = [flags[k] for k, v in manual.items() if v is not None]
        if given:
            raise CliError(f"{', '.join(given)} only apply with --distributed")
        return
    if args.coordinator is not None:
        host, sep, port = args.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CliError(f"--coordinator {args.coordinator!r}: expected HOST:PORT")
    if args.num_processes is not None and args.num_processes < 1:
        raise CliError(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.process_id is not None:
        n = args.num_processes
        if args.process_id < 0 or (n is not None and args.process_id >= n):
            bound = "at least 0" if n is None else f"0 to {n - 1} (--num-processes {n})"
            raise CliError(f"--process-id must be {bound}, got {args.process_id}")
    import jax

    try:
        jax.distributed.initialize(**{k: v for k, v in manual.items() if v is not None})
    except (ValueError, TypeError, RuntimeError) as err:
        raise CliError(
            f"--distributed: jax.distributed.initialize failed: {err} (outside a TPU pod, "
            "SLURM or Open MPI job, give --coordinator, --num-processes and --process-id)"
        ) from None


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
    import jax  # importing touches no backend: start_distributed can still run first

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
    parser.add_argument(
        "--distributed", action="store_true",
        help="multi-host: call jax.distributed.initialize() first (run on every host)",
    )  # fmt: skip
    parser.add_argument(
        "--coordinator", metavar="HOST:PORT",
        help="with --distributed: process 0's address (default: auto-detect)",
    )  # fmt: skip
    parser.add_argument(
        "--num-processes", type=int, metavar="N",
        help="with --distributed: how many processes (default: auto-detect)",
    )  # fmt: skip
    parser.add_argument(
        "--process-id", type=int, metavar="I",
        help="with --distributed: this process, 0 to N-1 (default: auto-detect)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--show-config", action="store_true", help="print the config and exit")
    args = parser.parse_args(argv)

    config = build_config(args)
    if args.show_config:
        print(json.dumps(dataclasses.asdict(config), indent=2))
        return 0
    start_distributed(args)
    workdir = check_writable_dir(args.workdir)
    results = train_and_evaluate(config, workdir, resume=args.resume, progress=not args.no_progress)
    if jax.process_index() != 0:  # process 0 reports for all
        return 0
    shown = {k: results[k] for k in HEADLINE if k in results}
    print(f"{config.task}: step {results['step']}, {results['wall_seconds']:.0f} s, "
          + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))  # fmt: skip
    print(f"wrote {workdir}/metrics.jsonl, checkpoints/, attention.npz, figures/")
    if (workdir / "figures" / "view.html").is_file():
        print(f"explore the attention: open file://{(workdir / 'figures' / 'view.html').resolve()}")
    return 0


if __name__ == "__main__":
    run_cli(main)
