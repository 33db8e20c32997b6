"""The end of an induction run: the circuit measured causally, with figures and ``interp.json``.

- pattern scores of every head on the held-out set (the top layer>=1 induction head and the
  top layer-0 previous-token head are "the circuit");
- zero and mean ablation of every head: the repeated-half loss with that head removed, and
  with every layer>=1 head whose induction score exceeds 0.5 removed together;
- activation patching (noising: the clean run with one head's output, or pattern, from a
  corrupted run) for two corruptions, the first copy shuffled and the repeat shuffled;
- direct logit attribution of the correct token on the repeat, per head;
- the phase change: the step where the top induction score rises and the step where the
  repeated-half loss falls, from the run's evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxattn import data, interp
from flaxattn.train._induction import (
    _capture,
    corrupt_batch,
    half_losses,
    repeat_loss,
)
from flaxattn.train._loop import METRICS_FILE

INTERP_FILE = "interp.json"
_KEYS = ("inputs", "targets", "first", "repeat")


def _head(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _crossing(steps: np.ndarray, values: np.ndarray, rising: bool) -> int | None:
    """First step at which ``values`` pass halfway from their first to their last value."""
    if len(values) < 2:
        return None
    half = 0.5 * (values[0] + values[-1])
    passed = values > half if rising else values < half
    return int(steps[np.argmax(passed)]) if passed.any() else None


def phase_change(records: list[dict], layer: int, head: int,
                 prev: tuple[int, int]) -> dict[str, Any]:
    """Eval curves and the halfway steps of the top induction score and the repeat loss."""
    evals = [r for r in records if r.get("split") == "eval" and "induction" in r]
    steps = np.array([r["step"] for r in evals])
    induction = np.array([r["induction"][layer][head] for r in evals], float)
    previous = np.array([r["previous_token"][prev[0]][prev[1]] for r in evals], float)
    repeat = np.array([r["repeat_loss"] for r in evals], float)
    first = np.array([r["first_loss"] for r in evals], float)
    return {
        "steps": steps.tolist(), "induction": induction.tolist(), "previous": previous.tolist(),
        "repeat_loss": repeat.tolist(), "first_loss": first.tolist(),
        "score_step": _crossing(steps, induction, rising=True),
        "loss_step": _crossing(steps, repeat, rising=False),
        "previous_step": _crossing(steps, previous, rising=True),
    }


def induction_report(task, run, workdir: Path) -> dict[str, Any]:
    """Measure the circuit of the trained model; write ``interp.json`` and figures."""
    c = task.config
    model = run.model()
    b = {k: task.eval_set[k] for k in _KEYS}
    full = task.eval_set
    losses = {k: float(v) for k, v in run(half_losses, b).items()}
    clean, first = losses["repeat_loss"], losses["first_loss"]
    scores = task.scores(jax.device_get(run(_capture, b["inputs"])), b["inputs"])
    L, N = scores["induction"].shape
    paths = task.layer_paths()

    ind = scores["induction"][1:]
    top_l, top_n = np.unravel_index(np.nanargmax(ind), ind.shape)
    top = (int(top_l) + 1, int(top_n))
    prev = (0, int(np.nanargmax(scores["previous_token"][0])))

    reference = task.batch(c.eval_examples, data.make_rng(c.seed, "reference"))
    ablation = {
        "zero": interp.ablate_heads(model, repeat_loss, b, kind="zero", layers=paths),
        "mean": interp.ablate_heads(model, repeat_loss, b, kind="mean", layers=paths,
                                    reference={k: reference[k] for k in _KEYS}),
    }
    group = sorted({top} | {(l_, n) for l_ in range(1, L) for n in range(N)
                            if scores["induction"][l_, n] > 0.5})
    group_heads: dict[str, list[int]] = {}
    for l_, n in group:
        group_heads.setdefault(paths[l_], []).append(n)
    together = {kind: interp.ablate_together(model, repeat_loss, b, group_heads, kind=kind,
                                             reference={k: reference[k] for k in _KEYS})
                for kind in ("zero", "mean")}
    others = [(l_, n) for l_ in range(L) for n in range(N) if (l_, n) != top]
    random_head = others[int(data.make_rng(c.seed, "random head").integers(len(others)))]
    non_circuit = [h for h in others if h != prev]

    def change(table, head):
        return float(table[head] - clean)

    abl = {}
    for kind, table in ablation.items():
        rel = [abs(change(table, h)) / clean for h in non_circuit]
        abl[kind] = {
            "table": table.tolist(),
            "top_induction": float(table[top]),
            "top_induction_over_first": float(table[top] / first),
            "previous_token_head": float(table[prev]),
            "random_head": float(table[random_head]),
            "random_head_change": change(table, random_head) / clean,
            "random_head_change_of_first": change(table, random_head) / first,
            "random_head_change_of_gap": change(table, random_head) / (first - clean),
            "induction_heads_together": together[kind],
            "induction_heads_together_over_first": together[kind] / first,
            "non_circuit_median_change": float(np.median(rel)) if rel else None,
            "non_circuit_max_change": float(np.max(rel)) if rel else None,
        }

    patching = {}
    for which in ("first", "repeat"):
        corrupted = corrupt_batch(full, which, data.make_rng(c.seed, "corrupt", which))
        corrupted = {k: corrupted[k] for k in _KEYS}
        for what in ("output", "pattern"):
            if which == "repeat" and what == "pattern":
                continue
            table = interp.patching_table(model, repeat_loss, b, corrupted, direction="noise",
                                          what=what, layers=paths)
            patching[f"{which}_shuffled/{what}"] = {
                "recovered": table["recovered"].tolist(),
                "clean": table["clean"], "corrupted": table["corrupted"],
                "previous_token_head": float(table["recovered"][prev]),
                "top_induction": float(table["recovered"][top]),
            }

    attribution = interp.attribution_fn(model)(b["inputs"], b["targets"])
    heads = np.asarray(attribution["heads"])  # [B, T, L, N]
    dla = {part: heads[full[part]].mean(axis=0) for part in ("first", "repeat")}  # [L, N]

    records = [json.loads(line) for line in
               (workdir / METRICS_FILE).read_text(encoding="utf-8").splitlines() if line]
    phase = phase_change(records, *top, prev)

    report = {
        "first_loss": first, "repeat_loss": clean, "repeat_over_first": clean / first,
        "repeat_accuracy": losses["repeat_accuracy"],
        "top_induction_head": _head(*top), "top_induction_score": float(scores["induction"][top]),
        "previous_token_head": _head(*prev),
        "previous_token_score": float(scores["previous_token"][prev]),
        "random_other_head": _head(*random_head),
        "induction_heads": [_head(*h) for h in group],
        "ablation": abl,
        "patching": patching,
        "logit_attribution": {k: v.tolist() for k, v in dla.items()},
        "scores": {k: v.tolist() for k, v in scores.items()},
        "phase_change": phase,
        "layers": paths,
    }
    (workdir / INTERP_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if c.figures:
        draw_induction_figures(report, workdir / "figures")
    headline = {k: v for k, v in report.items()
                if k not in ("ablation", "patching", "logit_attribution", "scores",
                             "phase_change", "layers")}
    headline.update(
        zero_ablation_top=abl["zero"]["top_induction"],
        mean_ablation_top=abl["mean"]["top_induction"],
        zero_ablation_induction_heads=abl["zero"]["induction_heads_together"],
        mean_ablation_induction_heads=abl["mean"]["induction_heads_together"],
        zero_ablation_random=abl["zero"]["random_head"],
        mean_ablation_random=abl["mean"]["random_head"],
        zero_ablation_random_change=abl["zero"]["random_head_change"],
        mean_ablation_random_change=abl["mean"]["random_head_change"],
        patch_first_shuffled_previous=patching["first_shuffled/output"]["previous_token_head"],
        patch_repeat_shuffled_previous=patching["repeat_shuffled/output"]["previous_token_head"],
        phase_score_step=phase["score_step"], phase_loss_step=phase["loss_step"],
    )
    return {"induction_report": headline}


def draw_induction_figures(report: dict[str, Any], out: Path) -> list[Path]:
    """The report's figures under ``out``: scores, ablation, patching, attribution, phase."""
    from flaxattn import viz

    names = [p.replace("/self_attention", "") for p in report["layers"]]
    written = []
    s = report["scores"]
    path = out / "interp_scores.png"
    viz.plot_head_tables(
        {"induction": s["induction"], "previous token": s["previous_token"], "sink": s["sink"],
         "positional": s["positional"]}, names, vmin=0.0, vmax=1.0,
        title="pattern scores per head (held-out set)", path=path)
    written.append(path)
    clean, first = report["repeat_loss"], report["first_loss"]
    path = out / "interp_ablation.png"
    viz.plot_head_tables(
        {"zero ablation": report["ablation"]["zero"]["table"],
         "mean ablation": report["ablation"]["mean"]["table"]}, names, cmap="magma_r",
        vmin=0.0, label="repeated-half loss (nats)",
        title=f"repeated-half loss with one head ablated (none: {clean:.3f}; "
              f"first half: {first:.3f})", path=path)
    written.append(path)
    path = out / "interp_patching.png"
    viz.plot_patching(
        {"first copy shuffled -> output": report["patching"]["first_shuffled/output"]["recovered"],
         "first copy shuffled -> pattern":
             report["patching"]["first_shuffled/pattern"]["recovered"],
         "repeat shuffled -> output": report["patching"]["repeat_shuffled/output"]["recovered"]},
        names, title="clean run with one head from a corrupted run: fraction of the clean "
                     "repeated-half loss kept (1 = clean, 0 = corrupted)", path=path)
    written.append(path)
    path = out / "interp_logit_attribution.png"
    span = max(float(np.nanmax(np.abs(report["logit_attribution"][k]))) for k in
               ("repeat", "first"))
    viz.plot_head_tables(
        {"on the repeat": report["logit_attribution"]["repeat"],
         "on the first copy": report["logit_attribution"]["first"]}, names, cmap="RdBu_r",
        center=0.0, vmin=-span, vmax=span, label="direct logit of the next token",
        title="direct logit attribution of the correct next token (final norm frozen)",
        path=path)
    written.append(path)
    p = report["phase_change"]
    path = out / "interp_phase_change.png"
    viz.plot_scores_over_steps(
        p["steps"],
        {f"{report['top_induction_head']} induction": p["induction"],
         f"{report['previous_token_head']} previous-token": p["previous"]},
        {"first copy": p["first_loss"], "repeat": p["repeat_loss"]},
        mark_step=p["score_step"],
        title=f"phase change: induction score halfway at step {p['score_step']}, repeated-half "
              f"loss halfway at step {p['loss_step']}", path=path)
    written.append(path)
    return written
