"""What the user reads: trials.csv, pareto.csv, pareto.png and report.md, all re-derived from the study."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

import gkpd
from search.files import atomic_text, atomic_write
from search.pareto import pareto_front
from search.progress import duration
from spaces.candidates import family

__all__ = ["trials_frame", "pareto_frame", "best_row", "write_report", "format_table", "fidelity_pairs",
           "concordance", "LATENCY_SHOWN", "PREDICTION_SHOWN"]

# Measured latency of each completed trial (search.latency), the dense teacher's beside it in the same run.
LATENCY_COLUMNS = ("ms_b1", "dense_ms_b1", "speedup_b1", "ms_batch", "dense_ms_batch", "speedup_batch", "batch",
                   "ort_ms_b1", "ort_dense_ms_b1", "ort_speedup_b1", "predicted_ms_b1", "ms_b1_table")
# With --budget-ms: the latency table's prediction, the measured ms_b1 on the table's scale (ms_b1 x the table's dense
# time / the dense time measured beside it) and the prediction's error against it (search.trial._prediction).
PREDICTION_SHOWN = ["predicted_ms_b1", "ms_b1_table", "ms_pred_error"]
LATENCY_SHOWN = ["ms_b1", "speedup_b1", "speedup_batch", "ort_ms_b1", "ort_speedup_b1"]

UNIT_NOTE = ("MFLOPs are millions of multiply-accumulates (MACs), as fvcore counts them; "
             "torch's FlopCounterMode counts 2 FLOPs per MAC (column gflops_torch).")


def trials_frame(study: optuna.Study, *, baseline: dict[str, float]) -> pd.DataFrame:
    """One row per trial: state, seed, accuracies, cost, compression and how long it took."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        mflops, mparams = attrs.get("mflops"), attrs.get("mparams")
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            "seed": attrs.get("seed", "") or (f"continues {attrs['continues']}" if "continues" in attrs else ""),
            "fidelity": attrs.get("fidelity", 1),
            "val_accuracy": t.values[0] if t.values else None,
            "test_accuracy": attrs.get("test_accuracy"),
            "screen_accuracy": attrs.get("screen_accuracy"),
            "mflops": mflops,
            "gflops_torch": 2 * mflops / 1e3 if mflops is not None else None,
            "mparams": mparams,
            "flops_ratio": baseline["mflops"] / mflops if mflops else None,
            "params_ratio": baseline["mparams"] / mparams if mparams else None,
            # In budget: every constraint (the proposal's analytic cost, the predicted ms), and an ms budget as measured.
            "feasible": (all(c <= 0 for c in t.constraints.values()) and "over_budget_measured" not in attrs
                         if t.state == TrialState.COMPLETE else None),
            "layers_decomposed": len(attrs.get("plan", {})),
            "families": families_of(attrs.get("plan", {})),
            "seconds": round(attrs["seconds"], 1) if "seconds" in attrs else None,
            **{key: attrs.get(key) for key in LATENCY_COLUMNS},
            # Against the measurement on the table's scale (search.trial._prediction); older trials: ms_b1.
            "ms_pred_error": (attrs["predicted_ms_b1"] / (attrs.get("ms_b1_table") or attrs["ms_b1"]) - 1
                              if attrs.get("predicted_ms_b1") and attrs.get("ms_b1") else None),
            "note": (attrs.get("stopped") or attrs.get("fail_reason") or attrs.get("over_budget_measured")
                     or _repair_note(attrs)),
        })
    return pd.DataFrame(rows)


def families_of(layers: dict[str, Any]) -> str:
    """How many layers of a stored plan are of each family, e.g. ``"cp:20 kron2:8 svd:2"`` (see spaces.candidates)."""
    try:
        plan = gkpd.plan_from_dict({"format": gkpd.PLAN_FORMAT, "version": gkpd.PLAN_VERSION, "layers": layers})
    except ValueError:
        return "?"
    counts = Counter(family(spec) for spec in plan.values())
    return " ".join(f"{name}:{count}" for name, count in sorted(counts.items()))


def _repair_note(attrs: dict[str, Any]) -> str:
    if attrs.get("over_budget"):
        return "proposal over budget, not evaluated: its repaired plan was queued"
    return f"repaired proposal of trial {attrs['repair_of']}" if "repair_of" in attrs else ""


def pareto_frame(trials: pd.DataFrame, *, objective: str) -> pd.DataFrame:
    """The feasible completed trials on the frontier of validation accuracy versus ``objective`` cost."""
    done = trials[(trials.state == "COMPLETE") & (trials.feasible == True)].reset_index(drop=True)  # noqa: E712
    front = pareto_front(list(zip(done.val_accuracy, done[objective])))
    return done.iloc[front].reset_index(drop=True)


def best_row(pareto: pd.DataFrame) -> pd.Series | None:
    """The frontier point with the best validation accuracy (the test split never chooses)."""
    if pareto.empty:
        return None
    return pareto.sort_values(["val_accuracy", "mflops"], ascending=[False, True]).iloc[0]


def format_table(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """A plain-text table for the terminal and report.md (Markdown pipe syntax)."""
    def cell(value: Any, column: str) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return ""
        if "accuracy" in column:
            return f"{100 * value:.2f}%"
        if column.endswith("_error"):
            return f"{100 * value:+.1f}%"
        if isinstance(value, float):
            return f"{value:.3f}" if column in ("mparams", "gflops_torch") else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(cell(row[c], c) for c in columns) + " |")
    return "\n".join(lines)


def _plot(trials: pd.DataFrame, pareto: pd.DataFrame, path: Path, *, budget: float | None, objective: str,
          teacher: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "MFLOPs (fvcore MACs, millions)" if objective == "mflops" else "Mparams"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = trials[trials.state == "COMPLETE"]
    ax.scatter(done[objective], 100 * done.val_accuracy, s=22, c="0.6", label="trials")
    ax.step(pareto[objective], 100 * pareto.val_accuracy, where="post", c="C0", lw=1.5)
    ax.scatter(pareto[objective], 100 * pareto.val_accuracy, s=36, c="C0", label="Pareto frontier", zorder=3)
    uniform = done[done.seed == "uniform"]
    if not uniform.empty:
        ax.scatter(uniform[objective], 100 * uniform.val_accuracy, marker="s", s=60, facecolors="none",
                   edgecolors="C3", lw=1.5, label="uniform seed (paper-style)", zorder=4)
    if "val_accuracy" in teacher:
        ax.scatter([teacher[objective]], [100 * teacher["val_accuracy"]], marker="*", s=120, c="C2",
                   label="teacher (dense)", zorder=4)
    if budget is not None:
        ax.axvline(budget, ls="--", c="C1", label=f"budget {budget:g}")
    ax.set_xlabel(unit)
    _save_plot(fig, ax, path)


def _save_plot(fig, ax, path: Path) -> None:
    """The plots' common finish: accuracy axis, grid, legend, written atomically as PNG."""
    import matplotlib.pyplot as plt

    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _has_latency(frame: pd.DataFrame) -> bool:
    return "ms_b1" in frame and frame.ms_b1.notna().any()


def _has_prediction(frame: pd.DataFrame) -> bool:
    return "predicted_ms_b1" in frame and frame.predicted_ms_b1.notna().any()


def _plot_latency(trials: pd.DataFrame, pareto: pd.DataFrame, path: Path, *, teacher: dict[str, float],
                  device: str) -> None:
    """Validation accuracy versus measured batch-1 latency: torch on the run's device and onnxruntime (CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = trials[(trials.state == "COMPLETE") & trials.ms_b1.notna()]
    front = pareto[pareto.ms_b1.notna()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for column, dense, color, what in (("ms_b1", "dense_ms_b1", "C0", f"torch, {device}"),
                                       ("ort_ms_b1", "ort_dense_ms_b1", "C1", "onnxruntime CPU, fast form")):
        ax.scatter(done[column], 100 * done.val_accuracy, s=18, c=color, alpha=0.35)
        ax.scatter(front[column], 100 * front.val_accuracy, s=40, c=color, label=f"frontier ({what})", zorder=3)
        if "val_accuracy" in teacher:
            ax.scatter([done[dense].median()], [100 * teacher["val_accuracy"]], marker="*", s=140, c=color,
                       edgecolors="k", label=f"teacher (dense, {what})", zorder=4)
    ax.set_xlabel("latency at batch 1 (ms, median of 5)")
    _save_plot(fig, ax, path)


def _latency_devices(study: optuna.Study) -> str:
    devices = sorted({t.user_attrs["latency_device"] for t in study.get_trials(deepcopy=False)
                      if "latency_device" in t.user_attrs})
    return ", ".join(devices) or "?"


def fidelity_pairs(study: optuna.Study) -> pd.DataFrame:
    """Each completed longer fine-tune next to its short one: trial, continued trial, short and long val."""
    rows = [{"trial": t.user_attrs["continues"], "continued_as": t.number,
             "short_val": t.user_attrs["short_val_accuracy"], "long_val": t.values[0],
             "long_test": t.user_attrs.get("test_accuracy")}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "continues" in t.user_attrs]
    return pd.DataFrame(rows, columns=["trial", "continued_as", "short_val", "long_val", "long_test"])


def concordance(short: Sequence[float], long: Sequence[float]) -> tuple[int, int]:
    """(pairs the short fine-tune ordered as the long one did, pairs with an order): Kendall's tau is
    2 * agree / pairs - 1. Ties in either list order nothing."""
    agree = pairs = 0
    for i in range(len(short)):
        for j in range(i + 1, len(short)):
            a, b = short[i] - short[j], long[i] - long[j]
            if a and b:
                pairs += 1
                agree += (a > 0) == (b > 0)
    return agree, pairs


def _fidelity_section(study: optuna.Study) -> list[str]:
    pairs = fidelity_pairs(study)
    if pairs.empty:
        return []
    agree, total = concordance(list(pairs.short_val), list(pairs.long_val))
    gain = 100 * (pairs.long_val - pairs.short_val)
    verdict = (f"The short fine-tune ordered {agree} of {total} pairs of these trials as the long one did."
               if total else "Too few continued trials to compare their order.")
    return ["## Longer fine-tunes of the leaders", "",
            format_table(pairs.rename(columns={"short_val": "short_val_accuracy", "long_val": "long_val_accuracy",
                                               "long_test": "long_test_accuracy"}),
                         ["trial", "continued_as", "short_val_accuracy", "long_val_accuracy", "long_test_accuracy"]),
            "", f"{verdict} The longer fine-tune moved validation accuracy by {gain.min():+.2f} to "
            f"{gain.max():+.2f} points.", ""]


def _finetune_section(out: Path, teacher: dict[str, float]) -> list[str]:
    """What ``search.py finetune`` did to the model ``best/`` holds now (nothing if best/ came from export)."""
    try:
        done = json.loads((out / "best" / "export.json").read_text())["finetune"]
        before, after = done["before"], done["after"]
    except (OSError, ValueError, KeyError, TypeError):
        return []

    def pct(value: float | None) -> str:
        return f"{100 * value:.2f}%" if value is not None else "?"

    return ["## Final fine-tune (best/)", "",
            f"Trial {done['trial']}, {done['steps']} more distillation steps at lr {done['lr']:g} "
            f"(`python search.py finetune --out {out}`):", "",
            "| | val | test |", "|---|---|---|",
            f"| after the search's fine-tune ({done['steps_before']} steps) | {pct(before['val_accuracy'])} | "
            f"{pct(before['test_accuracy'])} |",
            f"| after the final fine-tune | {pct(after['val_accuracy'])} | {pct(after['test_accuracy'])} |",
            f"| teacher (dense) | {pct(teacher.get('val_accuracy'))} | {pct(teacher.get('test_accuracy'))} |", ""]


def write_report(study: optuna.Study, out: Path, *, objective: str, budget: float | None,
                 teacher: dict[str, float], run: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write trials.csv, pareto.csv, pareto.png and report.md into ``out``; return (trials, pareto)."""
    budget_ms = (run.get("budget") or {}).get("ms")
    out.mkdir(parents=True, exist_ok=True)
    trials = trials_frame(study, baseline=teacher)
    pareto = pareto_frame(trials, objective=objective) if not trials.empty else trials
    atomic_write(out / "trials.csv", lambda tmp: trials.to_csv(tmp, index=False))
    atomic_write(out / "pareto.csv", lambda tmp: pareto.to_csv(tmp, index=False))
    if not trials.empty:
        _plot(trials, pareto, out / "pareto.png", budget=budget, objective=objective, teacher=teacher)
    best = best_row(pareto)
    columns = ["trial", "seed", "fidelity", "val_accuracy", "test_accuracy", "mflops", "gflops_torch", "mparams",
               "flops_ratio", "params_ratio", "families"]
    latency_lines: list[str] = []
    if not trials.empty and _has_latency(trials):
        device = _latency_devices(study)
        columns += LATENCY_SHOWN + (PREDICTION_SHOWN if _has_prediction(trials) else [])
        _plot_latency(trials, pareto, out / "latency.png", teacher=teacher, device=device)
        batches = trials.batch.dropna()
        batch = int(batches.iloc[0]) if not batches.empty else "--batch-size"  # GKPD_LATENCY=0: batch 1 only
        latency_lines = [
            f"Latency measured after each trial, next to the dense teacher in the same process, interleaved, median "
            f"of 5: torch on {device} at batch 1 (`ms_b1`, `speedup_b1` = dense ms / model ms) and at batch "
            f"{batch} (`speedup_batch`); onnxruntime on the CPU at batch 1 of the fast form (`ort_ms_b1`, "
            f"`ort_speedup_b1`; each Kronecker layer factorized or folded into a dense conv, whichever is faster). "
            "latency.png: accuracy versus latency.", ""]
        if _has_prediction(trials):
            held = (f" --budget-ms {budget_ms:g} holds as measured: a trial over it stays in trials.csv (note) "
                    "and off the frontier." if budget_ms is not None else "")
            latency_lines[-1:-1] = [
                f"`predicted_ms_b1`: the per-layer latency table's prediction (each layer's chosen candidate timed "
                f"alone at batch 1 on {device}, plus the rest of the dense model); `ms_pred_error` = predicted / "
                f"measured - 1.{held}"]
    counts = trials.state.value_counts().to_dict() if not trials.empty else {}
    lines = [
        f"# gkpd-search: {run['study_name']}",
        "",
        f"Model `{run['model']}` on `{run['dataset']}`; budget {budget:g} {objective}." if budget is not None else "",
        f"Teacher (dense): val {100 * teacher.get('val_accuracy', float('nan')):.2f}%, "
        f"test {100 * teacher.get('test_accuracy', float('nan')):.2f}%, {teacher['mflops']:.2f} MFLOPs, "
        f"{teacher['mparams']:.3f} Mparams.",
        f"Trials: {', '.join(f'{n} {s.lower()}' for s, n in counts.items()) or 'none yet'}.",
        "",
        UNIT_NOTE,
        "Validation accuracy (held out from the training images) chooses; test accuracy is only reported.",
        "",
        "## Pareto frontier",
        "",
        format_table(pareto, columns) if not pareto.empty else "No completed in-budget trial yet.",
        "",
        *latency_lines,
    ]
    if best is not None:
        lines += ["## Best in-budget plan", "",
                  f"Trial {int(best.trial)}: val {100 * best.val_accuracy:.2f}%, test {100 * best.test_accuracy:.2f}%, "
                  f"{best.mflops:.2f} MFLOPs ({best.flops_ratio:.2f}x fewer), {best.mparams:.3f} Mparams "
                  f"({best.params_ratio:.2f}x fewer). Export: `python search.py export --out {out}`.", ""]
    lines += _fidelity_section(study)
    lines += _finetune_section(out, teacher)
    if "elapsed" in run:
        lines += [f"Wall time of the last run: {duration(run['elapsed'])}.", ""]
    atomic_text(out / "report.md", "\n".join(lines))
    return trials, pareto
