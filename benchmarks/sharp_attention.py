"""Quality at equal steps where attention must be sharp: each attention variant trained in one
process on reduced ListOps and on a byte-level causal LM of the standard library, for several seeds,
with the attention's health (ppSBN temperature, entropy of the exact attention, approximation error)
recorded at every evaluation.

Every variant uses the same model (2 layers, d_model 64, 2 heads, D=128) and the same recipe (AdamW
through `optimizer_groups`, learning rate 2e-3, weight decay 0.01, batch 32); softmax attention
without ppSBN is the baseline. ListOps is generated in memory (depth 5, 16-128 tokens, 4000 train /
512 valid examples). The LM reads the stdlib's sources as bytes (every 20th file held out for
validation). Position recall (causal, scored on the answer only): `--recall-positions` random value
tokens, then a token naming one of the positions, then the value found there; attention held
near-uniform cannot do it, so it measures the sharpness that ListOps at this budget does not need.

    python -m benchmarks.sharp_attention --tasks listops lm --seeds 0 1 --steps 600
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import add_common_arguments, check_positive, format_table, pyplot, save_figure, write_results
from macformer import MacformerConfig, MacformerForCausalLM, MacformerForSequenceClassification
from macformer.host_memory import reuse_freed_host_memory
from pipelines import listops
from pipelines.sources import stdlib_files

VARIANTS: dict[str, dict] = {
    "softmax": {"attention": "softmax"},
    "kernel-exp": {"attention": "kernel"},
    "kernel-exp-bound-0.7": {"attention": "kernel", "ppsbn_max_temperature": 0.7},
    "kernel-inverse": {"attention": "kernel", "kernel": "inverse"},
    "rmfa-exp": {"attention": "rmfa"},
    # The default bound before issue #13's recall measurements (noise within a quarter of f(-t)).
    "rmfa-exp-bound-0.7": {"attention": "rmfa", "ppsbn_max_temperature": 0.6962890625},
    "rmfa-exp-start-0.35": {"attention": "rmfa", "ppsbn_initial_temperature": 0.6962890625 / 2},
    "rmfa-exp-bound-1": {"attention": "rmfa", "ppsbn_max_temperature": 1.0},
    "rmfa-exp-bound-1.4": {"attention": "rmfa", "ppsbn_max_temperature": 1.4},
    "rmfa-exp-bound-2": {"attention": "rmfa", "ppsbn_max_temperature": 2.0},
    "rmfa-exp-redraw-1": {"attention": "rmfa", "feature_redraw_interval": 1},
    "rmfa-exp-redraw-1-bound-1.2": {"attention": "rmfa", "feature_redraw_interval": 1, "ppsbn_max_temperature": 1.2},
    "rmfa-exp-redraw-1-bound-2": {"attention": "rmfa", "feature_redraw_interval": 1, "ppsbn_max_temperature": 2.0},
    "rmfa-exp-D256": {"attention": "rmfa", "num_features": 256},
    "rmfa-exp-D256-bound-2": {"attention": "rmfa", "num_features": 256, "ppsbn_max_temperature": 2.0},
    "rmfa-exp-D512": {"attention": "rmfa", "num_features": 512},
    "rmfa-exp-D512-bound-2": {"attention": "rmfa", "num_features": 512, "ppsbn_max_temperature": 2.0},
    "rmfa-exp-D2048-bound-2": {"attention": "rmfa", "num_features": 2048, "ppsbn_max_temperature": 2.0},
    "rmfa-exp-paper-temperature": {"attention": "rmfa", "ppsbn_initial_temperature": 32**-0.5,
                                   "ppsbn_temperature_lr_scale": 1.0},
    "rmfa-inverse": {"attention": "rmfa", "kernel": "inverse"},
    "rmfa-log": {"attention": "rmfa", "kernel": "log"},
    "rmfa-sqrt": {"attention": "rmfa", "kernel": "sqrt"},
    "rmfa-exp-no-ppsbn": {"attention": "rmfa", "ppsbn": False},
    "favor-ppsbn": {"attention": "favor", "ppsbn": True},
    "favor-ppsbn-D512": {"attention": "favor", "ppsbn": True, "num_features": 512},
    # Control: exact attention held near-uniform (|q . k| <= 0.02, weights within 4% of each other).
    "uniform-attention": {"attention": "kernel", "ppsbn_max_temperature": 0.02, "ppsbn_initial_temperature": 0.01,
                          "ppsbn_learnable_temperature": False},
    # Embeddings at the 0.02 of GPT-2 (the default before issue #13's fix) instead of 1.
    "rmfa-exp-embedding-0.02": {"attention": "rmfa", "embedding_init_std": 0.02},
    "softmax-embedding-0.02": {"attention": "softmax", "embedding_init_std": 0.02},
    # LM: an output layer of its own, so the embeddings start at 1 (tied ones stay at 0.02).
    "softmax-untied": {"attention": "softmax", "tie_embeddings": False},
    "rmfa-exp-untied": {"attention": "rmfa", "tie_embeddings": False},
}
MODEL = {"d_model": 64, "num_layers": 2, "num_heads": 2, "d_ff": 128, "num_features": 128}
LISTOPS_SPEC = listops.ListOpsSpec(max_depth=5, min_length=16, max_length=128)
RECALL_VALUES = 16
ACCURACY_TASKS = ("listops", "recall")


def listops_split(count: int, seed: int) -> dict[str, torch.Tensor]:
    rows = list(listops.generate(count, seed, LISTOPS_SPEC))
    ids = torch.zeros(count, LISTOPS_SPEC.max_length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, (tokens, _) in enumerate(rows):
        encoded = listops.encode(tokens)
        ids[index, : len(encoded)] = torch.tensor(encoded)
        mask[index, : len(encoded)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([label for _, label in rows])}


def lm_split(files: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    data = np.frombuffer(b"".join(Path(f).read_bytes() for f in files), dtype=np.uint8)
    windows = len(data) // (seq_len + 1)
    ids = torch.from_numpy(data[: windows * (seq_len + 1)].astype(np.int64)).view(windows, seq_len + 1)
    return {"input_ids": ids, "labels": ids}


def recall_split(count: int, positions: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows of `positions` values in [0, RECALL_VALUES), the token RECALL_VALUES + i naming position i,
    and the value at i; labels ignore (-100) everything but that last token."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, RECALL_VALUES, (count, positions), generator=generator)
    asked = torch.randint(0, positions, (count,), generator=generator)
    answer = values[torch.arange(count), asked]
    ids = torch.cat([values, (RECALL_VALUES + asked)[:, None], answer[:, None]], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = answer
    return {"input_ids": ids, "labels": labels}


def load_task(task: str, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(train split, validation split, model settings) of a task."""
    if task == "listops":
        settings = {"vocab_size": len(listops.VOCAB), "num_classes": listops.NUM_CLASSES,
                    "max_seq_len": LISTOPS_SPEC.max_length}
        return listops_split(args.listops_train, 1), listops_split(args.listops_valid, 2), settings
    if task == "recall":
        positions = args.recall_positions
        settings = {"vocab_size": RECALL_VALUES + positions, "causal": True, "max_seq_len": positions + 2}
        return (recall_split(args.recall_train, positions, 1), recall_split(args.listops_valid, positions, 2),
                settings)
    files = stdlib_files(args.lm_files)
    train = lm_split([f for i, f in enumerate(files) if i % 20], args.lm_seq_len)
    valid = lm_split(files[::20], args.lm_seq_len)
    valid = {k: v[: args.lm_valid_windows] for k, v in valid.items()}
    return train, valid, {"vocab_size": 256, "causal": True, "max_seq_len": args.lm_seq_len + 1}


@torch.no_grad()
def evaluate(model, task: str, valid: dict, batch_size: int) -> float:
    """Accuracy (ListOps, recall) or perplexity (LM) on the whole validation split."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(valid["input_ids"]), batch_size):
        batch = {k: v[start: start + batch_size] for k, v in valid.items()}
        output = model(**batch)
        size = len(batch["input_ids"])
        if task == "listops":
            total += float((output.logits.argmax(-1) == batch["labels"]).sum())
        elif task == "recall":  # the logits before the last token predict it
            total += float((output.logits[:, -2].argmax(-1) == batch["input_ids"][:, -1]).sum())
        else:
            total += float(output.loss) * size
        count += size
    model.train()
    return total / count if task in ACCURACY_TASKS else math.exp(min(total / count, 50.0))


def train_variant(task: str, variant: str, seed: int, data: tuple[dict, dict, dict], args: argparse.Namespace
                  ) -> dict:
    train, valid, settings = data
    torch.manual_seed(seed)
    config = MacformerConfig(**{**MODEL, **settings, **VARIANTS[variant]}, seed=seed)
    model_class = MacformerForSequenceClassification if task == "listops" else MacformerForCausalLM
    model = model_class(config)
    trunk = model.trunk
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.learning_rate, weight_decay=0.01))
    generator = torch.Generator().manual_seed(seed)
    probe = {k: v[:16] for k, v in valid.items() if k != "labels"}
    curve, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(train["input_ids"]), (args.batch_size,), generator=generator)
        batch = {k: v[rows] for k, v in train.items()}
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            point = {"step": step, "metric": evaluate(model, task, valid, args.batch_size)}
            health = trunk.attention_health(probe["input_ids"], probe.get("attention_mask"))
            point.update({k: v for k, v in health.items() if k.startswith("attention_")})
            point.update({k: v for k, v in health.items() if k.endswith("/temperature")})
            curve.append(point)
    best = max if task in ACCURACY_TASKS else min
    final = curve[-1]
    metric = "accuracy" if task in ACCURACY_TASKS else "perplexity"
    row = {"task": task, "variant": variant, "seed": seed, "metric": metric,
           "best": best(p["metric"] for p in curve), "seconds": time.perf_counter() - started,
           "final_temperature": final.get("attention_temperature"), "final_entropy": final["attention_entropy"],
           "final_approx_error": final["attention_approx_error"],
           "final_fresh_draw_error": final.get("attention_fresh_draw_error"), "curve": curve}
    print(f"{task} {variant} seed {seed}: best {row['metric']} {row['best']:.4g}, temperature "
          f"{row['final_temperature']}, entropy {row['final_entropy']:.3f}, error {row['final_approx_error']:.3g} "
          f"(fresh draw {row['final_fresh_draw_error'] or 0:.3g}) ({row['seconds']:.0f} s)", flush=True)
    return row


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarise(rows: list[dict]) -> tuple[list[dict], dict[str, float]]:
    """Per task and variant: mean and range of the best metric over seeds, against softmax."""
    table, summary = [], {}
    for task in dict.fromkeys(r["task"] for r in rows):
        found = [r for r in rows if r["task"] == task]
        baseline = [r["best"] for r in found if r["variant"] == "softmax"]
        for variant in dict.fromkeys(r["variant"] for r in found):
            bests = [r["best"] for r in found if r["variant"] == variant]
            entry = {"task": task, "variant": variant, "seeds": len(bests), "mean_best": statistics.fmean(bests),
                     "min_best": min(bests), "max_best": max(bests),
                     "temperature": _mean_or_none([r["final_temperature"] for r in found if r["variant"] == variant]),
                     "entropy": statistics.fmean(r["final_entropy"] for r in found if r["variant"] == variant)}
            if baseline:
                base = statistics.fmean(baseline)
                gap = entry["mean_best"] - base if task in ACCURACY_TASKS else entry["mean_best"] / base
                entry["vs_softmax"] = gap
                summary[f"{task}_{variant}_vs_softmax"] = entry["vs_softmax"]
            summary[f"{task}_{variant}_mean_best"] = entry["mean_best"]
            table.append(entry)
    return table, summary


def plot(rows: list[dict], args: argparse.Namespace) -> Path:
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for column, task in enumerate(tasks):
        for row in (r for r in rows if r["task"] == task and r["seed"] == rows[0]["seed"]):
            steps = [p["step"] for p in row["curve"]]
            axes[0][column].plot(steps, [p["metric"] for p in row["curve"]], marker=".", label=row["variant"])
            if "attention_temperature" in row["curve"][0]:
                axes[1][column].plot(steps, [p["attention_temperature"] for p in row["curve"]], marker=".",
                                     label=row["variant"])
        axes[0][column].set(title=task, xlabel="step", ylabel="accuracy" if task in ACCURACY_TASKS else "perplexity")
        if task == "lm":
            axes[0][column].set_yscale("log")
        axes[1][column].set(xlabel="step", ylabel="ppSBN temperature (mean over layers)")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    return save_figure(figure, args.output / "sharp_attention.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macformer bench sharp_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=("listops", "lm", "recall"), default=["listops", "lm"])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--listops-train", type=int, default=4000)
    parser.add_argument("--listops-valid", type=int, default=512, help="validation rows of ListOps and of recall")
    parser.add_argument("--recall-train", type=int, default=20000)
    parser.add_argument("--recall-positions", type=int, default=64)
    parser.add_argument("--lm-seq-len", type=int, default=256)
    parser.add_argument("--lm-files", type=int, default=400, help="stdlib files read (sorted by path)")
    parser.add_argument("--lm-valid-windows", type=int, default=256)
    add_common_arguments(parser, "sharp_attention")
    args = parser.parse_args(argv)
    check_positive(parser, steps=args.steps, eval_every=args.eval_every, batch_size=args.batch_size,
                   listops_train=args.listops_train, listops_valid=args.listops_valid,
                   recall_train=args.recall_train, recall_positions=args.recall_positions, lm_seq_len=args.lm_seq_len,
                   lm_files=args.lm_files, lm_valid_windows=args.lm_valid_windows)
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reuse_freed_host_memory()  # as the macformer command and every training worker do
    rows = []
    for task in args.tasks:
        data = load_task(task, args)
        rows += [train_variant(task, variant, seed, data, args) for variant in args.variants for seed in args.seeds]
    table, summary = summarise(rows)
    print(format_table(table, ["task", "variant", "seeds", "mean_best", "min_best", "max_best", "vs_softmax",
                               "temperature", "entropy"]))
    args.output.mkdir(parents=True, exist_ok=True)
    write_results(args, "sharp_attention", rows, summary, [plot(rows, args)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
