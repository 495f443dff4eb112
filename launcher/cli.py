"""`macformer` command line. Bad input (a MacformerError) ends with one line naming the problem and the fix,
exit code 2; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from macformer.errors import MacformerError
from macformer.host_memory import reuse_freed_host_memory
from pipelines.errors import PipelineError

if TYPE_CHECKING:  # the command line starts fast: heavy modules load only with their command
    from launcher.config import TrainConfig


def _add_prepare(subparsers: argparse._SubParsersAction) -> None:
    # Options the user leaves out are absent, so PrepareConfig's defaults are the only ones.
    parser = subparsers.add_parser(
        "prepare", help="tokenize a corpus into packed causal-LM shards with a manifest (Ray Data)",
        description="Train (or load) a sentencepiece tokenizer, tokenize the corpus with Ray Data and write "
                    "seq_len + 1 token windows into checksummed shards with manifest.json, atomically. "
                    "Defaults: pipelines.prepare.PrepareConfig.", argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--input", dest="inputs", nargs="+", required=True, metavar="PATH_OR_GLOB_OR_URI",
                        help="files, directories, globs, s3:// or gs:// URIs, or 'stdlib' (Python's own sources)")
    parser.add_argument("--output", required=True, help="dataset directory to create")
    parser.add_argument("--seq-len", type=int, help="tokens per training window (plus one for the shift)")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-size", type=int, help="train a tokenizer of this size")
    vocab.add_argument("--tokenizer", help="use this sentencepiece .model instead of training one")
    parser.add_argument("--tokenizer-type", choices=["bpe", "unigram"])
    parser.add_argument("--tokenizer-sample-mb", type=float, help="corpus text used to train it")
    parser.add_argument("--format", dest="shard_format", choices=["parquet", "arrow"])
    parser.add_argument("--shard-size-mb", type=float)
    parser.add_argument("--text-column", "--text-field", dest="text_column",
                        help="text column of Parquet/CSV inputs, or field of JSON Lines records")
    parser.add_argument("--num-workers", type=int, help="tokenizer actors")
    parser.add_argument("--batch-size", type=int, help="documents per tokenizer call")
    parser.add_argument("--ray-address", help="join this Ray cluster ('auto' or host:port)")
    parser.add_argument("--stdlib-limit", type=int, help="use only the first N stdlib files")
    parser.add_argument("--valid-fraction", type=float,
                        help="hold out this fraction of documents as split 'valid' (the rest is 'train')")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")


def _run_prepare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pipelines.prepare import PrepareConfig, prepare

    settings = {k: v for k, v in vars(args).items() if k != "command"}
    if "tokenizer" in settings:  # a given tokenizer fixes the vocabulary
        settings["vocab_size"] = None
    prepare(PrepareConfig(**{**settings, "inputs": tuple(settings["inputs"])},
                          command=shlex.join(["macformer", *argv])))
    return 0


LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")


def _add_lra(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lra", help="write a Long Range Arena task (generated ListOps, or LRA files you have) as shards",
        description="ListOps is generated (LRA specification, deterministic by --seed, every label checked by "
                    "an independent evaluator); text (aclImdb dir), retrieval (dir with new_aan_pairs.*.tsv), "
                    "image (cifar-10-batches-py dir) and pathfinder (a pathfinder32/<difficulty> dir) are read "
                    "from --input.",
    )
    parser.add_argument("task", choices=LRA_TASKS)
    parser.add_argument("--output", required=True)
    parser.add_argument("--input", help="directory of the LRA files (all tasks but listops)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate byte-level inputs (text 4000, retrieval 4000 each by default)")
    parser.add_argument("--train", type=int, default=96_000, help="ListOps training samples")
    parser.add_argument("--valid", type=int, default=2_000, help="ListOps validation samples")
    parser.add_argument("--test", type=int, default=2_000, help="ListOps test samples")
    parser.add_argument("--min-length", type=int, default=None, help="ListOps: shortest sequence kept (default: "
                        "pipelines.listops.ListOpsSpec)")
    parser.add_argument("--max-depth", type=int, default=None, help="ListOps: deepest nesting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="shard_format", default="parquet", choices=["parquet", "arrow"])
    parser.add_argument("--shard-size-mb", type=float, default=64.0)
    parser.add_argument("--overwrite", action="store_true")


def _run_lra(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pathlib import Path

    from pipelines import lra
    from pipelines.listops import ListOpsSpec

    if args.task == "listops":
        given = {"max_depth": args.max_depth, "min_length": args.min_length, "max_length": args.max_length}
        spec = ListOpsSpec(**{name: value for name, value in given.items() if value is not None})
        task = lra.listops_task(args.train, args.valid, args.test, args.seed, spec)
        settings = {"spec": vars(spec), "train": args.train, "valid": args.valid, "test": args.test,
                    "seed": args.seed}
    else:
        if not args.input:
            raise PipelineError(f"the {args.task} task reads LRA files: pass --input DIR")
        directory = Path(args.input)
        if not directory.is_dir():
            raise PipelineError(f"--input {directory} is not a directory; point it at the {args.task} files")
        max_length = args.max_length or 4000
        task = {"text": lambda: lra.text_task(directory, max_length),
                "retrieval": lambda: lra.retrieval_task(directory, max_length),
                "image": lambda: lra.image_task(directory),
                "pathfinder": lambda: lra.pathfinder_task(directory)}[args.task]()
        settings = {"max_length": max_length}
    lra.write_task(task, args.output, settings, args.shard_format, args.shard_size_mb, args.overwrite)
    return 0


def _add_train_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.num_features=64 zero_stage=2")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: ./mlflow.db)")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from launcher.config import TrainConfig

    overrides = list(args.overrides) + ([f"tracking_uri={args.tracking_uri}"] if args.tracking_uri else [])
    return TrainConfig.load(args.config, overrides)


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train with Ray Train + DeepSpeed, tracked in MLflow",
        description="Runs a Ray Train TorchTrainer; each worker wraps a Macformer model in a DeepSpeed engine and "
                    "reads its share of the shards. Settings come from --config and key=value overrides.",
    )
    _add_train_settings(parser)
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto' or host:port)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run with this run_name and storage_path from its latest checkpoint")


SUMMARY_METRICS = ("train_loss", "eval_loss", "eval_perplexity", "eval_accuracy", "tokens_per_s",
                   "attention_temperature", "attention_entropy")


def _run_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launcher.train import train

    metrics = train(_train_config(args), args.ray_address, resume=args.resume)
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in SUMMARY_METRICS if isinstance(metrics.get(k), float))
    print(f"finished at step {metrics.get('step')}: {shown}")
    return 0


def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="table and plots of an MLflow experiment's runs")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: ./mlflow.db)")
    parser.add_argument("--plots", default="compare", help="directory for the PNG plots")


def _run_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pathlib import Path

    from launcher.compare import collect, format_table, plot
    from launcher.tracking import default_tracking_uri

    rows = collect(args.experiment, default_tracking_uri(args.tracking_uri))
    if not rows:
        raise PipelineError(f"experiment {args.experiment!r} has no training run yet; run `macformer train` first")
    print(format_table(rows))
    for path in plot(rows, Path(args.plots), args.experiment):
        print(f"wrote {path}")
    return 0


def _add_sweep(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sweep", help="a grid of training runs through Ray Tune, child runs in MLflow")
    parser.add_argument("--grid", required=True, help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every trial")
    parser.add_argument("--ray-address", default=None)


def _run_sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launcher.sweep import Sweep, run_sweep

    sweep = Sweep.load(args.grid, list(args.overrides))
    parent = run_sweep(sweep, args.ray_address)
    print(f"sweep {sweep.name}: {len(sweep.trials)} trials under MLflow run {parent}; "
          f"compare with `macformer compare --experiment {sweep.trials[0].experiment}`")
    return 0


def _add_submit(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit", help="run `macformer train` as a Ray job on a cluster",
        description="Validates the training config here and submits `python -m launcher.cli train <settings>` "
                    "(every setting explicit, local paths absolute) with this directory as the job's working_dir; "
                    "prints the job id and follows the logs. Equivalent to `ray job submit --working-dir . -- ...`.",
    )
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard / Jobs API address")
    _add_train_settings(parser)
    parser.add_argument("--no-follow", action="store_true", help="do not stream the job's logs (still waits for it)")


def _run_submit(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launcher.submit import submit

    job_id, status = submit(_train_config(args), args.address, follow=not args.no_follow)
    print(f"Ray job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


CHECKPOINT_HELP = "exported model directory, runs:/<run_id>/model, or experiment:NAME (its best finished run)"


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate an exported model on a prepared dataset")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--data", required=True, help="dataset directory (prepare or lra output)")
    parser.add_argument("--split", default=None,
                        help="dataset split to evaluate (default: the held-out one, test or valid, if there is one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI for runs:/ checkpoints")


def _run_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launcher.evaluate import evaluate, held_out_split, load_exported

    model = load_exported(args.checkpoint, args.tracking_uri)
    split = args.split or held_out_split(args.data)
    metrics = evaluate(model, args.data, split, args.batch_size, args.batches)
    print(f"split {split or 'all (the dataset has no held-out split)'}: "
          + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return 0


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt with an exported causal LM "
                                   "(recurrent O(D d) state for feature attentions, KV cache for softmax)")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.model of the training dataset")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile: ~20 s to compile on CPU, then faster per token "
                        "(worth it for long generations)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI for runs:/ checkpoints")


def _run_generate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from launcher.evaluate import generate_text, load_exported

    model = load_exported(args.checkpoint, args.tracking_uri)
    print(generate_text(model, args.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                        args.seed, compile=args.compile))
    return 0


BENCHMARKS = ("attention_speed", "approximation_error", "decoding", "training", "spectral_grid", "tokenization",
              "sharp_attention", "maclaurin_estimators")


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark of benchmarks/ (speed, memory, error, ...)",
                                   description="Run `macformer bench NAME --help` for a benchmark's options.")
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own arguments")


def _run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(f"benchmarks.{args.name}").main(args.options)


COMMANDS = {"prepare": (_add_prepare, _run_prepare), "lra": (_add_lra, _run_lra), "train": (_add_train, _run_train),
            "compare": (_add_compare, _run_compare), "sweep": (_add_sweep, _run_sweep),
            "submit": (_add_submit, _run_submit), "eval": (_add_eval, _run_eval),
            "generate": (_add_generate, _run_generate), "bench": (_add_bench, _run_bench)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="macformer", description="Macformer: random-feature attention at scale")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    reuse_freed_host_memory()  # generate, evaluate and bench compute in this process
    try:
        return COMMANDS[args.command][1](args, argv)
    except MacformerError as error:  # bad input: one line; anything else is a bug and shows its traceback
        print(f"macformer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"macformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
