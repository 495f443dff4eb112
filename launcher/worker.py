"""The training function each Ray Train worker runs: a Macformer model in a DeepSpeed engine, this
rank's share of the shards, evaluation, checkpoints reported to Ray Train, MLflow on rank 0."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher import checkpoint
from launcher.batches import TrainBatches, eval_batches
from launcher.config import TrainConfig
from launcher.evaluate import evaluation_metrics, evaluation_totals
from launcher.tracking import NoTracker, Tracker, mask_credentials, run_params
from macformer import MacformerForCausalLM, MacformerForSequenceClassification
from pipelines.reader import ShardReader

EXPORT_DIR = "model"


def deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the JSON template if given, with batch, precision, ZeRO and clipping
    taken from the TrainConfig (one source of truth for what the run logs)."""
    base = json.loads(Path(config.deepspeed_config).read_text()) if config.deepspeed_config else {}
    base.update({
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation,
        "train_batch_size": config.micro_batch_size * config.gradient_accumulation * world_size,
        "gradient_clipping": config.gradient_clipping,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        # torch's AdamW: DeepSpeed's fused Adam needs a compiled op (minutes on CPU) for no gain here.
        "zero_allow_untested_optimizer": True,
    })
    base["zero_optimization"] = {**base.get("zero_optimization", {}), "stage": config.zero_stage}
    return base


def lr_lambda(config: TrainConfig):
    """Multiplier of the peak learning rate at optimizer step s: linear warmup, then the schedule."""
    warmup, total = config.warmup_steps, config.max_steps

    def factor(step: int) -> float:
        if config.schedule == "onecycle":  # up for 30% of the steps, then cosine down to 0
            peak = max(1, int(0.3 * total))
            if step < peak:
                return (step + 1) / peak
            return 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total - peak)))
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float().cpu() if dist.get_backend() == "gloo" else values.detach().float()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def _evaluate(engine, batches: list[dict[str, torch.Tensor]], task: str) -> dict[str, float]:
    """Loss (and accuracy) over every rank's evaluation batches, and the attention's health on the
    first batch (every rank: ZeRO-3 gathers parameters together)."""
    engine.eval()
    with torch.no_grad():
        on_device = [{k: v.to(engine.device) for k, v in batch.items()} for batch in batches]
        totals = evaluation_totals(engine, on_device, task)
        health = engine.module.trunk.attention_health(on_device[0]["input_ids"], on_device[0].get("attention_mask"))
    engine.train()
    dist.all_reduce(totals)
    return {**evaluation_metrics(totals, task), **health}


def _save_checkpoint(engine, batches: TrainBatches, step: int, run_id: str | None, metrics: dict[str, float],
                     rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint.save(Path(directory), engine, batches.state_dict(), checkpoint.TrainerState(step, run_id), rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _export(engine, config: TrainConfig, rank: int, tracker) -> None:
    """Safetensors + config.json of the final weights, loadable without DeepSpeed."""
    import deepspeed

    parameters = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(parameters, enabled=config.zero_stage == 3):
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                model = type(engine.module)(engine.module.config)
                model.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
                model.save_pretrained(directory)
                tracker.log_artifacts(Path(directory), EXPORT_DIR)


def _log_curves(tracker, num_layers: int) -> None:
    """Plot artifacts of the run: training and evaluation loss, and each layer's attention health
    (ppSBN temperature, entropy of the exact attention: 1 = uniform, and for random features the
    error of the model's draw next to that of fresh draws: far apart, the model has fitted its draw)
    over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for metric in ("train_loss", "eval_loss"):
        points = tracker.history(metric)
        if points:
            axes.plot(*zip(*points, strict=True), label=metric, marker="." if metric == "eval_loss" else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    tracker.log_figure(figure, "plots/loss.png")
    plt.close(figure)

    figure, panels = plt.subplots(1, 3, figsize=(15, 4))
    curves = (
        (panels[0], "temperature", "ppSBN temperature (bound on |q.k|)"),
        (panels[1], "entropy", "attention entropy / log(keys)"),
        (panels[2], "approx_error", "attention error: model's draw (-), fresh draws (--)"),
        (panels[2], "fresh_draw_error", None),
    )
    for panel, name, label in curves:
        for layer in range(num_layers):
            points = tracker.history(f"attention/layer{layer}/{name}")
            if points:
                fresh = name == "fresh_draw_error"
                panel.plot(*zip(*points, strict=True), marker=".", linestyle="--" if fresh else "-",
                           color=f"C{layer}", label=None if fresh else f"layer {layer}")
        if label is None:
            continue
        panel.set_xlabel("step")
        panel.set_ylabel(label)
        panel.grid(alpha=0.3)
        if panel.has_data():
            panel.legend(fontsize=8)
    if panels[2].has_data():
        panels[2].set_yscale("log")
    figure.tight_layout()
    tracker.log_figure(figure, "plots/attention.png")
    plt.close(figure)


def _build_engine(config: TrainConfig, world_size: int):
    """The model in a DeepSpeed engine with torch's AdamW (ppSBN temperatures in their own group) and
    the warmup + schedule multiplier; returns (engine, scheduler)."""
    import deepspeed

    model_class = MacformerForCausalLM if config.task == "causal_lm" else MacformerForSequenceClassification
    model = model_class(config.model)
    if config.activation_checkpointing:
        model.trunk.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.optimizer_groups(config.learning_rate, config.weight_decay),
                                  eps=config.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(config, world_size))
    return engine, scheduler


def _restore(engine, batches: TrainBatches, rank: int) -> checkpoint.TrainerState:
    """Continue from Ray Train's latest checkpoint, if there is one."""
    import ray.train

    saved = ray.train.get_checkpoint()
    if not saved:
        return checkpoint.TrainerState(0, None)
    with saved.as_directory() as directory:
        trainer_state, reader_state = checkpoint.restore(Path(directory), engine, rank)
    batches.load_state_dict(reader_state)
    return trainer_state


def _start_tracking(config: TrainConfig, loop_config: dict[str, Any], state: checkpoint.TrainerState, rank: int,
                    world_size: int) -> tuple[Tracker | NoTracker, int]:
    """Every rank calls it; rank 0 gets the MLflow run (new, or the checkpoint's) and the last step it
    has metrics for (after a restart the steps up to there are recomputed identically and not logged
    twice); other ranks a tracker that does nothing."""
    import ray

    node_ids: list[str | None] = [None] * world_size  # a multi-node run says so in its tags
    dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    if rank != 0:
        return NoTracker(), 0
    tracker = Tracker(config.resolved_tracking_uri(), config.experiment, config.run_name, state.run_id,
                      config.parent_run_id, run_directory=config.run_directory())
    shown_config = {key: mask_credentials(value) if isinstance(value, str) else value
                    for key, value in config.to_dict().items()}
    tracker.log_params(run_params(shown_config, config.model, world_size, loop_config["manifest"]))
    tracker.set_tags({"git_commit": loop_config["git_commit"], "ray_job_id": loop_config["ray_job_id"],
                      "resumed_from_step": str(state.step), "ray_nodes": str(len(set(node_ids))),
                      "ray_node_ids": ",".join(sorted(set(node_ids)))})
    if state.run_id is None:
        tracker.log_dict(shown_config, "config/train.json")
        tracker.log_dict(config.model.to_dict(), "config/model.json")
        tracker.log_dict(deepspeed_config(config, world_size), "config/deepspeed.json")
    model = config.model
    print(f"training {model.attention} ({model.kernel}, D={model.num_features}) on {world_size} workers from "
          f"step {state.step}; MLflow run {tracker.run_id}", flush=True)
    logged_through = tracker.last_step("train_loss") if state.run_id else 0
    if logged_through > state.step:
        tracker.set_tags({"metrics_resumed_after_step": str(logged_through)})
        print(f"steps {state.step + 1}-{logged_through} were logged before the restart; logging resumes at step "
              f"{logged_through + 1}", flush=True)
    return tracker, logged_through


def _train_step(engine, iterator, config: TrainConfig, world_size: int, scheduler) -> dict[str, float]:
    """One optimizer step over gradient_accumulation micro-batches; its metrics (loss averaged over ranks)."""
    started = time.perf_counter()
    losses, tokens = [], 0
    for _ in range(config.gradient_accumulation):
        batch = {k: v.to(engine.device) for k, v in next(iterator).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
        tokens += int(batch["input_ids"].numel())
    elapsed = time.perf_counter() - started
    return {
        "train_loss": float(_mean_over_ranks(torch.stack(losses).mean())),
        "tokens_per_s": tokens * world_size / elapsed,
        "samples_per_s": config.micro_batch_size * config.gradient_accumulation * world_size / elapsed,
        "step_time_s": elapsed,
        "learning_rate": scheduler.get_last_lr()[0],
        "peak_memory_mb": _peak_memory_mb(engine.device),
    }


def _skip_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory all-reduce op (30-90 s on a machine's first
    run, and again for every new environment path) when it wraps the process group; only
    `inference_all_reduce` (tensor-parallel inference) uses it, training's collectives go through gloo.
    Marking the op incompatible, which DeepSpeed's op registry keeps for the whole process, skips the
    build."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. loop_config: {"train": TrainConfig with its model resolved, "manifest":
    the dataset's, "git_commit": ..., "ray_job_id": ...}."""
    config: TrainConfig = loop_config["train"]
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shared_memory_all_reduce()
    # Warnings and errors only from libraries' loggers (Ray Train logs a ~300-character line per
    # checkpoint report through the root logger); progress is this function's own print.
    logging.getLogger().setLevel(logging.WARNING)
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)
    engine, scheduler = _build_engine(config, world_size)
    reader = partial(ShardReader, config.data, rank, world_size, manifest=loop_config["manifest"])
    batches = TrainBatches(reader(seed=config.seed, split=config.train_split), config.task, config.micro_batch_size)
    evaluation = eval_batches(reader(shuffle=False, split=config.eval_split), config.task, config.micro_batch_size,
                              config.eval_batches)
    state = _restore(engine, batches, rank)
    tracker, logged_through = _start_tracking(config, loop_config, state, rank, world_size)
    iterator, step = iter(batches), state.step
    engine.train()
    while step < config.max_steps:
        metrics = _train_step(engine, iterator, config, world_size, scheduler)
        step += 1
        if step % config.eval_every == 0 or step == config.max_steps:
            metrics.update(_evaluate(engine, evaluation, config.task))
        if step > logged_through:
            tracker.log_metrics(metrics, step)
        if rank == 0:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in
                              ("train_loss", "eval_loss", "eval_accuracy", "tokens_per_s"))
            print(f"step {step}/{config.max_steps}: {shown}", flush=True)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            _save_checkpoint(engine, batches, step, tracker.run_id, {**metrics, "step": step}, rank)
    _export(engine, config, rank, tracker)
    if rank == 0:
        _log_curves(tracker, config.model.num_layers)
    tracker.finish()
