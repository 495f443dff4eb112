"""`macformer compare`: read an experiment's runs back through MLflow and compare them (table + plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.config import ConfigError
from launcher.tracking import mask_credentials, probe_tracking_server


def _history(client, run_id: str, metric: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))]


def collect(experiment: str, tracking_uri: str) -> list[dict[str, Any]]:
    """One row per training run of the experiment (sweep parents, which hold no model, are skipped).
    A server that does not answer or a SQLite store that does not exist fails in one line, before
    MLflow's client would retry for minutes or create an empty store."""
    import mlflow

    if tracking_uri.startswith(("http://", "https://")):
        probe_tracking_server(tracking_uri)
    elif tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no MLflow store at {tracking_uri.removeprefix('sqlite:///')}: run `macformer train` "
                          "first, or pass the store of your runs with --tracking-uri")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ConfigError(f"no experiment {experiment!r} at {mask_credentials(tracking_uri)} (experiments: {names}); "
                          "check --experiment and --tracking-uri")
    rows = []
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]):
        params = run.data.params
        if "attention" not in params:
            continue
        run_id = run.info.run_id
        accuracy, perplexity = _history(client, run_id, "eval_accuracy"), _history(client, run_id, "eval_perplexity")
        speed, error = _history(client, run_id, "tokens_per_s"), _history(client, run_id, "attention_approx_error")
        fresh_error = _history(client, run_id, "attention_fresh_draw_error")
        memory = _history(client, run_id, "peak_memory_mb")
        temperature, entropy = _history(client, run_id, "attention_temperature"), _history(client, run_id,
                                                                                           "attention_entropy")
        rows.append({
            "run": run.info.run_name, "status": run.info.status, "attention": params["attention"],
            "variant": params.get("variant", params["attention"]),
            "parent_run_id": run.data.tags.get("mlflow.parentRunId"), "seq_len": int(params.get("seq_len", 0)),
            "kernel": params.get("kernel", ""), "num_features": int(params.get("num_features", 0)),
            "ppsbn": params.get("ppsbn", ""), "steps": len(_history(client, run_id, "train_loss")),
            "best_accuracy": max(accuracy) if accuracy else None,
            "best_perplexity": min(perplexity) if perplexity else None,
            # The first step includes warm-up (allocation, first all-reduce): leave it out of the mean.
            "tokens_per_s": sum(speed[1:]) / len(speed[1:]) if len(speed) > 1 else (speed[0] if speed else None),
            "approx_error": error[-1] if error else None,
            "fresh_draw_error": fresh_error[-1] if fresh_error else None,
            # Attention health at the last evaluation: a flat attention shows as entropy near 1.
            "temperature": temperature[-1] if temperature else None,
            "entropy": entropy[-1] if entropy else None,
            "peak_memory_mb": max(memory) if memory else None,
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = ["run", "variant", "num_features", "ppsbn", "steps", "best_accuracy", "best_perplexity",
               "tokens_per_s", "peak_memory_mb", "approx_error", "fresh_draw_error", "temperature", "entropy", "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], directory: Path, experiment: str = "") -> list[Path]:
    """Quality vs throughput and quality vs D per attention variant, as titled PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "best_accuracy" if any(r["best_accuracy"] is not None for r in rows) else "best_perplexity"
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row[metric] is not None:
            groups.setdefault(row["variant"], []).append(row)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, x_key, x_label in (("quality_vs_throughput.png", "tokens_per_s", "tokens/s"),
                                 ("quality_vs_features.png", "num_features", "D (random features)")):
        figure, axes = plt.subplots(figsize=(6, 4))
        for label, members in sorted(groups.items()):
            members = sorted((r for r in members if r[x_key] is not None), key=lambda r: r[x_key])
            axes.plot([r[x_key] for r in members], [r[metric] for r in members], marker="o", label=label)
        if x_key == "num_features":
            axes.set_xscale("log", base=2)
        axes.set_xlabel(x_label)
        axes.set_ylabel(metric.replace("_", " "))
        axes.set_title(f"{experiment + ': ' if experiment else ''}{metric.replace('_', ' ')} vs {x_label}, "
                       "one line per attention variant", fontsize=9)
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(directory / name, dpi=120)
        plt.close(figure)
        paths.append(directory / name)
    return paths
