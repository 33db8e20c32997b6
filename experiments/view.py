"""The interactive attention explorer of an export: one self-contained HTML page (see
flaxattn.export for the .npz schema and flaxattn.viz.explorer_html for the page).

    python experiments/view.py EXPORT.npz --out view.html
        [--view model|head|matrix|stats|text|image] [--example 0] [--layer PATH]
        [--head 0|mean] [--layers GLOB ...] [--bits 8|16]

Open the page in a browser (e.g. `xdg-open view.html`, or File > Open): it needs no network
and no server. The URL fragment (#view=matrix&example=2&layer=...&head=3) keeps the view, so a
link to the file with a fragment opens that view.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import _cli


def _check_writable_file(path: str) -> Path:
    """``path``'s directory exists (or is created) and takes a new file; ``path`` is no
    directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise _cli.CliError(f"--out {str(p)!r} is a directory; give a file name such as view.html")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise _cli.CliError(f"cannot write {str(p)!r}: {err.strerror or err}") from None
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _cli.make_parser(__doc__)
    parser.add_argument("export", help="attention export (.npz) written by train.py/export.py")
    parser.add_argument("--out", required=True, help="the HTML file to write (e.g. view.html)")
    parser.add_argument("--view", default="model",
                        choices=("model", "head", "matrix", "stats", "text", "image"),
                        help="the view the page opens with")  # fmt: skip
    parser.add_argument("--example", type=int, default=0, help="example shown first")
    parser.add_argument("--layer", default=None,
                        help="layer path shown first (default: the last cross layer, else the "
                             "last layer)")  # fmt: skip
    parser.add_argument("--head", default="0", help="head number shown first, or 'mean'")
    parser.add_argument("--layers", nargs="+", default=None, metavar="GLOB",
                        help="include only the layers matching these patterns")  # fmt: skip
    parser.add_argument("--bits", type=int, default=None, choices=(8, 16),
                        help="bits per stored weight (default: 16 up to 2**21 weights, "
                             "else 8)")  # fmt: skip
    args = parser.parse_args(argv)

    head = args.head
    if head != "mean":
        try:
            head = int(head)
        except ValueError:
            raise _cli.CliError(f"--head must be a head number or 'mean', got {head!r}") from None
    export_path = _cli.check_readable_file(args.export)
    out = _check_writable_file(args.out)

    from flaxattn.export import load_attention
    from flaxattn.viz import save_explorer

    export = load_attention(export_path)
    path = save_explorer(
        export, out, view=args.view, example=args.example, layer=args.layer, head=head,
        layers=args.layers, bits=args.bits,
    )  # fmt: skip
    size = path.stat().st_size
    print(f"{path} ({size / 1e6:.2f} MB): open it in a browser, e.g. file://{path.resolve()}")
    return 0


if __name__ == "__main__":
    _cli.run_cli(main)
