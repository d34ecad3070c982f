"""The learning curve of a project: labels used vs the metric on the evaluation slice, per version."""

from __future__ import annotations

import io

from .registry import ModelRegistry, RegistryError


def learning_curve(registry: ModelRegistry, project_key: str) -> dict:
    """Points in version order: the cold start (measured by the first job, 0 labels), then each
    fine-tuned version with the labels it trained on and its score on the slice."""
    points = []
    cold_start_measured = False
    current = registry.current(project_key)
    for info in registry.versions(project_key):
        meta = info.meta
        if meta.get("kind") != "fine-tune":
            continue
        metrics = meta.get("metrics") or {}
        recipe = meta.get("recipe")
        if not cold_start_measured and (metrics.get("current") or {}).get("score") is not None:
            parent = meta.get("parent")
            try:
                parent_meta = registry.meta(project_key, parent) if parent else {}
            except (RegistryError, OSError, ValueError):  # removed or unreadable: its point is left out
                parent_meta = {}
            if parent_meta.get("kind") in ("cold-start", "config-change"):
                points.append(
                    {
                        "version": parent,
                        "labels": 0,
                        "score": metrics["current"]["score"],
                        "recipe": "zero-shot",
                        "promoted": True,
                        "eval_size": _eval_size(meta),
                    }
                )
            cold_start_measured = True
        score = (metrics.get(recipe) or {}).get("score")
        points.append(
            {
                "version": info.name,
                "labels": sum(d.get("train", 0) for d in (meta.get("data") or {}).values()),
                "score": score,
                "current_score": (metrics.get("current") or {}).get("score"),
                "recipe": recipe,
                "promoted": bool((meta.get("decision") or {}).get("promoted")),
                "eval_size": _eval_size(meta),
                "created_at": meta.get("created_at"),
            }
        )
    metric = "accuracy (single choice), micro-F1 (multiple) or entity F1 (Labels), averaged over controls, on the evaluation slice"
    return {"project": project_key, "current": current, "metric": metric, "points": points}


def _eval_size(meta: dict) -> int:
    """The slice the version was judged on: the smallest among the controls that have slice labels
    (``finetune.slice_size``, the job's own rule)."""
    from .finetune import slice_size

    return slice_size(d.get("eval", 0) for d in (meta.get("data") or {}).values())


def learning_curve_png(curve: dict) -> bytes:
    """The curve as a PNG: promoted versions as filled dots, rejected ones as crosses."""
    buffer = io.BytesIO()
    learning_curve_figure(curve).savefig(buffer, format="png")
    return buffer.getvalue()


def learning_curve_figure(curve: dict):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    points = [p for p in curve["points"] if p["score"] is not None]
    promoted = [p for p in points if p["promoted"]]
    rejected = [p for p in points if not p["promoted"]]
    if promoted:
        axes.plot([p["labels"] for p in promoted], [p["score"] for p in promoted], "o-", color="tab:blue", label="promoted")
    if rejected:
        axes.plot([p["labels"] for p in rejected], [p["score"] for p in rejected], "x", color="tab:red", markersize=9, label="rejected")
    for p in points:
        axes.annotate(p["version"].rsplit("-", 1)[-1], (p["labels"], p["score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("labels trained on")
    axes.set_ylabel("score on the evaluation slice")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(f"learning curve of project {curve['project']}")
    axes.grid(alpha=0.3)
    if points:
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "no trained version yet", ha="center", va="center", transform=axes.transAxes)
    return figure
