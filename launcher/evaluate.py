"""`macformer eval` and `macformer generate` on an exported model (safetensors + config.json), no
DeepSpeed or Ray needed: a local directory, or an MLflow artifact URI such as runs:/<run_id>/model."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from launcher.batches import eval_batches
from launcher.config import ConfigError
from launcher.tracking import default_tracking_uri, mask_credentials
from macformer import MacformerForCausalLM, MacformerForSequenceClassification
from macformer.models import CONFIG_FILE, PreTrainedMacformer
from pipelines.reader import ShardReader
from pipelines.shards import load_manifest, vocab_size
from pipelines.storage import is_uri
from pipelines.tokenizer import processor_from_bytes

MODEL_CLASSES = {cls.__name__: cls for cls in (MacformerForCausalLM, MacformerForSequenceClassification)}


def _best_model_uri(experiment: str, tracking_uri: str, log: Callable[[str], None]) -> str:
    """The model of the experiment's best finished training run: highest eval_accuracy, else
    lowest eval_loss (a run without either ranks last), newest first among equals."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    runs = [run for run in runs if "attention" in run.data.params]  # training runs, not sweep parents
    if not runs:
        raise ConfigError(f"no finished training run in experiment {experiment!r} at {tracking_uri}; "
                          "train one first or pass the model directory")

    def rank(run) -> tuple[int, float]:
        metrics = run.data.metrics
        if "eval_accuracy" in metrics:
            return 0, -metrics["eval_accuracy"]
        return (1, metrics["eval_loss"]) if "eval_loss" in metrics else (2, 0.0)

    best = min(runs, key=rank)  # min is stable: the newest of equally good runs
    metric = next((f"{k} {best.data.metrics[k]:.4g}" for k in ("eval_accuracy", "eval_loss")
                   if k in best.data.metrics), "no evaluation metric")
    log(f"experiment {experiment!r}: best of {len(runs)} finished runs is {best.info.run_name!r} "
        f"(run {best.info.run_id}, {metric})")
    return f"runs:/{best.info.run_id}/model"


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_exported(location: str, tracking_uri: str | None = None, log: Callable[[str], None] = _to_stderr
                  ) -> PreTrainedMacformer:
    """From a model directory, an MLflow artifact URI (runs:/<run_id>/model), or `experiment:NAME`
    (the model of that experiment's best finished training run, named through `log`)."""
    uri = default_tracking_uri(tracking_uri)
    if location.startswith("experiment:"):
        location = _best_model_uri(location.removeprefix("experiment:"), uri, log)
    if is_uri(location) or location.startswith("runs:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            location = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=uri)
        except MlflowException as error:
            raise ConfigError(f"cannot fetch {location} from MLflow at {mask_credentials(uri)} "
                              f"({str(error).splitlines()[0][:200]}); check the run id and --tracking-uri") from None
    path = Path(location) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{location} holds no exported model ({CONFIG_FILE} missing); pass the `model` "
                          "directory a training run exports, or runs:/<run_id>/model")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ConfigError(f"{location} holds a {model_type!r}, not one of {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[model_type].from_pretrained(location).eval()


def held_out_split(data: str) -> str | None:
    """The split an evaluation uses by default: test, else valid, else the whole dataset."""
    splits = {entry.get("split") for entry in load_manifest(data)["shards"]}
    return next((split for split in ("test", "valid") if split in splits), None)


PERPLEXITY_CAP_LOSS = 50.0  # exp(50): beyond it a perplexity says nothing more and overflows float32


def evaluation_totals(model, batches, task: str) -> torch.Tensor:
    """[sum of loss x samples, correct predictions, samples] over `batches` (float64; sums, so that
    ranks can add theirs up before `evaluation_metrics`)."""
    totals = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        output = model(**batch)
        size = batch["input_ids"].shape[0]
        totals[0] += float(output.loss) * size
        if task == "classification":
            totals[1] += float((output.logits.argmax(-1) == batch["labels"]).sum())
        totals[2] += size
    return totals


def evaluation_metrics(totals: torch.Tensor, task: str) -> dict[str, float]:
    """eval_loss and eval_perplexity (causal LM) or eval_accuracy (classification) from the totals."""
    samples = float(totals[2].clamp_min(1))
    loss = float(totals[0]) / samples
    if task == "causal_lm":
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, PERPLEXITY_CAP_LOSS))}
    return {"eval_loss": loss, "eval_accuracy": float(totals[1]) / samples}


@torch.no_grad()
def evaluate(model: PreTrainedMacformer, data: str, split: str | None, batch_size: int, batches: int
             ) -> dict[str, float]:
    task = "causal_lm" if isinstance(model, MacformerForCausalLM) else "classification"
    manifest = load_manifest(data)
    kind = manifest["kind"]
    if kind != task:
        raise ConfigError(f"{data} is a {kind} dataset and the model a {type(model).__name__}; evaluate on a "
                          f"{task} dataset (the kind the model was trained on)")
    check_vocabulary(model, vocab_size(manifest), f"dataset {data}")
    totals = evaluation_totals(model, eval_batches(ShardReader(data, shuffle=False, split=split), task, batch_size,
                                                   batches), task)
    if totals[2] == 0:
        raise ConfigError(f"{data} has fewer samples than one batch of {batch_size}; lower --batch-size")
    return {**evaluation_metrics(totals, task), "samples": float(totals[2])}


def check_vocabulary(model: PreTrainedMacformer, vocab_size: int, source: str) -> None:
    """A tokenizer or dataset whose ids the model's embedding cannot hold is another model's."""
    if vocab_size > model.config.vocab_size:
        raise ConfigError(f"{source} has {vocab_size} token ids, the model's vocabulary {model.config.vocab_size}; "
                          "use the tokenizer/dataset the model was trained with")


@torch.no_grad()
def generate_text(model: PreTrainedMacformer, tokenizer: str, prompt: str, max_new_tokens: int,
                  temperature: float, top_k: int | None, seed: int, compile: bool = False) -> str:
    if not isinstance(model, MacformerForCausalLM):
        raise ConfigError("generate needs a causal LM checkpoint")
    path = Path(tokenizer)
    if not path.is_file():
        raise ConfigError(f"tokenizer {path} not found; pass the tokenizer.model of the training dataset")
    processor = processor_from_bytes(path.read_bytes())
    check_vocabulary(model, processor.get_piece_size(), f"tokenizer {path}")
    ids = processor.encode(prompt) or [processor.eos_id()]
    tokens = model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                            eos_token_id=processor.eos_id(), generator=torch.Generator().manual_seed(seed),
                            compile=compile)
    return processor.decode([i for i in tokens[0].tolist() if i != processor.eos_id()])
