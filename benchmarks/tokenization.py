"""Tokenization throughput: this pipeline (Ray Data actors) vs HF `datasets.map(num_proc=N)` vs one
sentencepiece process (the per-core limit), on the same corpus with the same tokenizer.

Each way turns the same documents into the same token ids (checked: equal totals). The engines
(Ray, the HF process pool) start inside the timed region only where they would for a user: Ray is
initialised before timing (a cluster is long-lived), HF's pool starts per map call.

    python -m benchmarks.tokenization --workers 2 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_common_arguments, pyplot, save_figure, write_results
from pipelines.prepare import PrepareConfig, prepare
from pipelines.ray_runtime import ray_session
from pipelines.sources import stdlib_files
from pipelines.tokenizer import processor_from_bytes, train_tokenizer


def read_documents(paths: list[str]) -> list[str]:
    """Non-empty documents, decoded as the pipeline decodes them (empty files yield no tokens)."""
    texts = (Path(p).read_bytes().decode("utf-8", errors="replace") for p in paths)
    return [text for text in texts if text]


def copies(paths: list[str], repeat: int, directory: Path) -> list[str]:
    """The files themselves, or `repeat` copies of them under distinct names (a bigger corpus)."""
    if repeat == 1:
        return paths
    result = []
    for copy in range(repeat):
        for index, path in enumerate(paths):
            target = directory / str(copy) / f"{index:05d}.py"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            result.append(str(target))
    return result


def single_process(model: bytes, texts: list[str]) -> int:
    processor = processor_from_bytes(model)
    return sum(len(ids) + 1 for ids in processor.encode(texts, out_type=int, num_threads=1))


def hf_datasets(model: bytes, texts: list[str], workers: int, cache: Path) -> int:
    """The usual HF recipe: map to input_ids (+ EOS), results written to an Arrow cache file."""
    import datasets

    def encode(batch: dict, processor_cache: dict = {}) -> dict:  # noqa: B006 - per-process cache
        processor = processor_cache.setdefault("p", processor_from_bytes(model))
        encoded = processor.encode(batch["text"], out_type=int, num_threads=1)
        return {"input_ids": [[*ids, processor.eos_id()] for ids in encoded]}

    dataset = datasets.Dataset.from_dict({"text": texts})
    tokenized = dataset.map(encode, batched=True, batch_size=64, num_proc=workers, remove_columns=["text"],
                            load_from_cache_file=False, cache_file_name=str(cache / "tokenized.arrow"))
    return int(sum(len(ids) for ids in tokenized.with_format("arrow")["input_ids"].to_pylist()))


def pipeline(model_path: Path, paths: list[str], workers: int, output: Path) -> int:
    config = PrepareConfig(inputs=tuple(paths), output=str(output), seq_len=4096, tokenizer=str(model_path),
                           vocab_size=None, num_workers=workers, overwrite=True)
    return prepare(config, log=lambda message: None)["total_tokens"]


def timed(function, *args) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = function(*args)
    return tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="macformer bench tokenization", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=None, help="stdlib files in the corpus (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="corpus = this many copies of the files")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000)
    add_common_arguments(parser, "tokenization")
    args = parser.parse_args(argv)
    if (args.files is not None and args.files <= 0) or args.workers <= 0 or args.repeat <= 0:
        parser.error("--files, --workers and --repeat must be positive")

    workdir = Path(tempfile.mkdtemp(prefix="tokenization-bench-"))
    try:
        paths = copies(stdlib_files(args.files), args.repeat, workdir / "corpus")
        texts = read_documents(paths)
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        model = train_tokenizer(texts, args.vocab_size, sample_bytes=8 << 20)
        model_path = workdir / "tokenizer.model"
        model_path.write_bytes(model)
        results = {}
        results["single process"] = timed(single_process, model, texts)
        results[f"HF datasets.map num_proc={args.workers}"] = timed(hf_datasets, model, texts, args.workers, workdir)
        with ray_session(None):
            pipeline(model_path, paths[:40], args.workers, workdir / "warmup")  # actor code paths warm
            results[f"macformer prepare ({args.workers} actors)"] = timed(
                pipeline, model_path, paths, args.workers, workdir / "dataset")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    counts = {tokens for tokens, _ in results.values()}
    if len(counts) != 1:
        raise SystemExit(f"the three ways disagree on the token count: {results}")
    single_rate = results["single process"][0] / results["single process"][1]
    print(f"corpus: {len(paths)} stdlib files ({args.repeat} copies), {megabytes:.1f} MB, {counts.pop():,} tokens; "
          f"{os.cpu_count()} CPUs")
    print("| way | seconds | tokens/s | vs single process | vs 2x single process |")
    print("|---|---|---|---|---|")
    rows = []
    for name, (tokens, seconds) in results.items():
        rate = tokens / seconds
        rows.append({"way": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": rate,
                     "vs_single_process": rate / single_rate})
        print(f"| {name} | {seconds:.2f} | {rate:,.0f} | {rate / single_rate:.2f}x | "
              f"{rate / (2 * single_rate):.0%} |")
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7, 3))
    ax.barh([r["way"] for r in rows], [r["tokens_per_s"] / 1e6 for r in rows])
    ax.set(xlabel="million tokens/s", title=f"{megabytes:.1f} MB of stdlib sources, {os.cpu_count()} CPUs")
    args.output.mkdir(parents=True, exist_ok=True)
    figure_path = save_figure(figure, args.output / "tokenization.png")
    summary = {"files": len(paths), "megabytes": megabytes,
               **{f"vs_single_process {r['way']}": r["vs_single_process"] for r in rows}}
    write_results(args, "tokenization", rows, summary, [figure_path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
