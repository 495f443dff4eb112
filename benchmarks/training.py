"""Training throughput and quality: real runs of the trainer (Ray Train + DeepSpeed, 2 workers).

throughput: tokens/s and peak memory per worker of one small causal LM with softmax vs RMFA (exp at
every sequence length, every kernel at the longest), on the stdlib corpus prepared at each length.
Ratios are against softmax at the same length, from the same sweep.

quality: runs sweep configs (default: configs/sweeps/quality_lm.yaml and quality_listops.yaml:
softmax, RMFA per kernel, RFA, FAVOR+, with and without ppSBN, at equal steps) and reports the newest
finished run of each variant: its best validation perplexity or accuracy beside standard softmax's
(without ppSBN; with it where that is all the experiment has).

    python -m benchmarks.training throughput --seq-lens 1024 2048 4096 8192
    python -m benchmarks.training quality
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import check_positive, format_table, pyplot, save_figure, write_results
from launcher.compare import collect
from launcher.config import TrainConfig
from launcher.sweep import Sweep, run_sweep
from launcher.tracking import default_tracking_uri
from macformer.kernels import KERNELS
from pipelines.prepare import PrepareConfig, prepare

QUALITY_SWEEPS = ["configs/sweeps/quality_lm.yaml", "configs/sweeps/quality_listops.yaml"]


def prepare_corpora(args: argparse.Namespace) -> dict[int, Path]:
    """The stdlib corpus tokenized at every sequence length with one tokenizer (prepared once)."""
    paths: dict[int, Path] = {}
    tokenizer = None
    for seq_len in sorted(args.seq_lens, reverse=True):
        output = args.data_dir / f"stdlib-{seq_len}"
        prepare(PrepareConfig(inputs=("stdlib",), output=str(output), seq_len=seq_len, stdlib_limit=args.stdlib_limit,
                              vocab_size=None if tokenizer else args.vocab_size, tokenizer=tokenizer))
        tokenizer = tokenizer or str(output / "tokenizer.model")
        paths[seq_len] = output
    return paths


def throughput_trials(args: argparse.Namespace, corpora: dict[int, Path], name: str) -> list[TrainConfig]:
    longest = max(args.seq_lens)
    trials = []
    for seq_len in args.seq_lens:
        variants = [{"attention": "softmax"}, {"attention": "rmfa", "kernel": "exp"}]
        if seq_len == longest:
            variants += [{"attention": "rmfa", "kernel": k} for k in args.kernels if k != "exp"]
        for variant in variants:
            model = {"d_model": args.d_model, "num_layers": args.layers, "num_heads": args.heads,
                     "d_ff": 4 * args.d_model, "num_features": args.num_features, **variant}
            trials.append(TrainConfig(
                data=str(corpora[seq_len]), task="causal_lm", model=model, num_workers=args.workers,
                micro_batch_size=1, max_steps=args.steps, warmup_steps=0, precision="bf16", zero_stage=2,
                eval_every=args.steps, eval_batches=1, checkpoint_every=args.steps,
                storage_path=str(args.output / "runs"), tracking_uri=args.tracking_uri, experiment=args.experiment,
                run_name=f"{name}-{len(trials)}",
            ))
    return trials


def sweep_rows(experiment: str, tracking_uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    return [r for r in collect(experiment, tracking_uri) if r["parent_run_id"] == parent_run_id]


def latest_finished_runs(experiment: str, tracking_uri: str) -> list[dict[str, Any]]:
    """The newest finished run of each attention variant (with and without ppSBN) in the experiment:
    a variant re-run after a failure replaces nothing but its own failed attempt."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in collect(experiment, tracking_uri):  # oldest first
        if row["status"] == "FINISHED":
            latest[(row["variant"], row["ppsbn"])] = row
    return list(latest.values())


def throughput(args: argparse.Namespace) -> tuple[list[dict], dict[str, float], list[Path]]:
    corpora = prepare_corpora(args)
    name = f"throughput-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = run_sweep(Sweep(name, throughput_trials(args, corpora, name)))
    rows = sweep_rows(args.experiment, args.tracking_uri, parent)
    baseline = {r["seq_len"]: r for r in rows if r["variant"] == "softmax"}
    for row in rows:
        base = baseline.get(row["seq_len"])
        row["speedup_vs_softmax"] = (row["tokens_per_s"] / base["tokens_per_s"]
                                     if base and base["tokens_per_s"] and row["tokens_per_s"] else None)
        row["memory_ratio_vs_softmax"] = (base["peak_memory_mb"] / row["peak_memory_mb"]
                                          if base and row["peak_memory_mb"] else None)
    longest = max(args.seq_lens)
    summary = {f"{r['variant']}_speedup_{r['seq_len']}": r["speedup_vs_softmax"] for r in rows
               if r["variant"] != "softmax" and r["speedup_vs_softmax"] is not None}
    summary["longest_seq_len"] = longest
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        points = sorted((r["seq_len"], r["tokens_per_s"], r["peak_memory_mb"]) for r in rows if r["variant"] == variant)
        axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
        axes[1].plot([p[0] for p in points], [p[2] for p in points], marker="o", label=variant)
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="tokens/s (all workers)")
    axes[1].set(xscale="log", xlabel="sequence length", ylabel="peak memory per worker (MB)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return rows, summary, [save_figure(figure, args.output / "training_throughput.png")]


def quality(args: argparse.Namespace) -> tuple[list[dict], dict[str, float], list[Path]]:
    rows: list[dict] = []
    for grid in args.sweeps:
        sweep = Sweep.load(grid, args.overrides)
        first = sweep.trials[0].with_absolute_paths()
        if not args.no_train:
            run_sweep(sweep)
        found = latest_finished_runs(first.experiment, first.tracking_uri)
        metric = "best_accuracy" if first.task == "classification" else "best_perplexity"
        softmax = {r["ppsbn"]: r[metric] for r in found if r["variant"] == "softmax"}
        base = softmax.get("False", softmax.get("True"))  # standard softmax attention when it was measured
        for row in found:
            row.update(sweep=sweep.name, metric=metric, value=row[metric],
                       relative_to_softmax=row[metric] / base if base and row[metric] is not None else None)
        rows += found
    summary = {f"{r['sweep']}_{r['variant']}_{'' if r['ppsbn'] == 'True' else 'no_'}ppsbn": r["value"]
               for r in rows if r["value"] is not None}
    plt = pyplot()
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    most_bars = max((sum(r["sweep"] == name for r in rows) for name in sweeps), default=1)
    figure, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), max(4.5, 0.2 * most_bars)), squeeze=False)
    for ax, name in zip(axes[0], sweeps, strict=True):
        members = [r for r in rows if r["sweep"] == name and r["value"] is not None]
        labels = [f"{r['variant']} ({'' if r['ppsbn'] == 'True' else 'no '}ppSBN)" for r in members]
        ax.barh(labels, [r["value"] for r in members])
        ax.set(title=name, xlabel=members[0]["metric"].replace("_", " ") if members else "")
        ax.tick_params(axis="y", labelsize=7)
    return rows, summary, [save_figure(figure, args.output / "training_quality.png")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macformer bench training", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["throughput", "quality"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--kernels", nargs="+", default=["inverse", "log", "trigh", "sqrt"], choices=sorted(KERNELS),
                        help="throughput: RMFA kernels measured at the longest length (exp runs at every length)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per throughput run (first excluded)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--num-features", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--stdlib-limit", type=int, default=400, help="stdlib files in the throughput corpus")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--sweeps", nargs="+", default=QUALITY_SWEEPS, help="quality: sweep configs to run")
    parser.add_argument("--no-train", action="store_true",
                        help="quality: report the experiments' newest finished runs instead of running the sweeps")
    parser.add_argument("--override", dest="overrides", action="append", default=[],
                        help="quality: key=value applied to every trial (repeatable)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/out/training"))
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default="bench-training-throughput")
    args = parser.parse_args(argv)
    check_positive(parser, seq_lens=args.seq_lens, steps=args.steps, d_model=args.d_model, heads=args.heads,
                   layers=args.layers, num_features=args.num_features, workers=args.workers)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up and left out of tokens/s)")
    args.tracking_uri = args.tracking_uri or default_tracking_uri()
    args.output = args.output.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    rows, summary, figures = throughput(args) if args.part == "throughput" else quality(args)
    columns = (["variant", "seq_len", "tokens_per_s", "peak_memory_mb", "speedup_vs_softmax", "memory_ratio_vs_softmax"]
               if args.part == "throughput" else
               ["sweep", "variant", "ppsbn", "steps", "metric", "value", "relative_to_softmax", "approx_error"])
    print(format_table(rows, columns))
    for key, value in summary.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    write_results(args, f"training_{args.part}", rows, summary, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
