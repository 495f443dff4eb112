"""Decoding: per-token latency and memory of a causal LM as the context grows.

For each context length the prompt is prefilled once (the model's caches: RMFA's recurrent state
S' [heads, D, d + 1] per layer; softmax's growing key/value cache), then `--new-tokens` tokens are
decoded one at a time exactly as `MacformerForCausalLM.generate()` does, and the median time per
token, the decoding state's size and the peak memory of the decoding steps are reported. The
softmax KV cache is the baseline: ratios are KV-cache time / RMFA time at the same context and mode.
Modes: "eager" (generate()'s default) and "compiled" (generate(compile=True): the step through
torch.compile, both attentions; its first two steps compile and are not timed).

    python -m benchmarks.decoding --contexts 512 1024 2048 4096 8192 16384 --modes eager compiled
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (
    PeakMemory,
    add_common_arguments,
    check_positive,
    format_table,
    pyplot,
    save_figure,
    write_results,
)
from macformer import MacformerConfig, MacformerForCausalLM
from macformer.host_memory import reuse_freed_host_memory
from macformer.layers import LayerCache


def cache_bytes(caches: list[LayerCache]) -> int:
    return sum(t.numel() * t.element_size() for c in caches for t in c.buffers())


MODES = ("eager", "compiled")


@torch.no_grad()
def decode(model: MacformerForCausalLM, context: int, new_tokens: int, device: torch.device, mode: str) -> dict:
    """Prefill `context` tokens, then decode `new_tokens` with generate()'s decoding step: the first
    untimed (compiled: the first two, which compile), the rest timed and their peak memory measured."""
    step = model.decoding_step(compile=mode == "compiled")
    untimed = 2 if mode == "compiled" else 1  # compiling: the first step, then once more with a dynamic position
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(device)
    # As generate() sizes them for new_tokens + 1 tokens (it samples its last token without a step): a
    # step that filled the buffer would make the keys' view contiguous and recompile the compiled step.
    caches = model.new_caches(capacity=context + new_tokens + 1)
    start = time.perf_counter()
    token = model.lm_head(model.model(prompt, caches=caches))[:, -1].argmax(-1)
    prefill = time.perf_counter() - start
    positions = range(context, context + new_tokens)
    for position in positions[:untimed]:
        token = step(token[:, None], caches, position).argmax(-1)
    times = []
    with PeakMemory(device) as memory:
        for position in positions[untimed:]:
            start = time.perf_counter()
            token = step(token[:, None], caches, position).argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return {"prefill_s": prefill, "ms_per_token": statistics.median(times) * 1e3,
            "state_mib": cache_bytes(caches) / 2**20, "decode_peak_mib": memory.peak_mib}


@torch.no_grad()
def linear_layers_ms(model: MacformerForCausalLM, device: torch.device, repeats: int = 32) -> float:
    """Median time of running every linear layer of the model once on one token: the weight reads
    that any attention pays per decoded token, so `softmax ms / this` bounds the speedup over the KV
    cache that a recurrent state could reach at that context."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, 1, layer.in_features, device=device) for layer in layers]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for layer, x in zip(layers, inputs, strict=True):
            layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def build(attention: str, args: argparse.Namespace, device: torch.device) -> MacformerForCausalLM:
    config = MacformerConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
        d_ff=4 * args.d_model, max_seq_len=max(args.contexts) + args.new_tokens, attention=attention,
        num_features=args.num_features, causal=True, chunk_size=64,
    )
    torch.manual_seed(0)
    return MacformerForCausalLM(config).to(device).eval()


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for attention in ("softmax", "rmfa"):
        model = build(attention, args, device)
        for mode in args.modes:
            for context in args.contexts:
                row = {"attention": attention, "mode": mode, "context": context,
                       **decode(model, context, args.new_tokens, device, mode)}
                rows.append(row)
                print(f"{attention} {mode} context {context}: {row['ms_per_token']:.2f} ms/token, state "
                      f"{row['state_mib']:.2f} MiB, prefill {row['prefill_s']:.2f} s", flush=True)
        if attention == "rmfa":
            floor = linear_layers_ms(model, device)
    baseline = {(r["mode"], r["context"]): r for r in rows if r["attention"] == "softmax"}
    for row in rows:
        base = baseline[(row["mode"], row["context"])]
        row["speedup_vs_kv_cache"] = base["ms_per_token"] / row["ms_per_token"]
        row["state_ratio_vs_kv_cache"] = base["state_mib"] / row["state_mib"]
        row["linear_layers_ms"] = floor
        row["speedup_ceiling"] = base["ms_per_token"] / floor
    return rows


def plot(rows: list[dict], args: argparse.Namespace) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for attention in ("softmax", "rmfa"):
        for mode in args.modes:
            points = [r for r in rows if (r["attention"], r["mode"]) == (attention, mode)]
            label = "softmax + KV cache" if attention == "softmax" else f"RMFA recurrent state (D={args.num_features})"
            axes[0].plot([r["context"] for r in points], [r["ms_per_token"] for r in points], marker="o",
                         label=f"{label}, {mode}", linestyle="--" if mode == "compiled" else "-")
            if mode == args.modes[0]:  # the state does not depend on the mode
                axes[1].plot([r["context"] for r in points], [r["state_mib"] for r in points], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="context length", ylabel="ms per generated token")
    axes[1].set(xscale="log", yscale="log", xlabel="context length", ylabel="decoding state (MiB)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(figure, args.output / "decoding.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macformer bench decoding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="eager: generate()'s default; compiled: generate(compile=True)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-features", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8000)
    add_common_arguments(parser, "decoding")
    args = parser.parse_args(argv)
    check_positive(parser, contexts=args.contexts, new_tokens=args.new_tokens, d_model=args.d_model, heads=args.heads,
                   layers=args.layers, num_features=args.num_features, vocab_size=args.vocab_size)
    if args.new_tokens < 3:
        parser.error(f"--new-tokens must be at least 3 (a compiled step's first two compile), got {args.new_tokens}")
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reuse_freed_host_memory()  # as the macformer command and every training worker do
    rows = measure(args)
    print(format_table(rows, ["attention", "mode", "context", "ms_per_token", "state_mib", "decode_peak_mib",
                              "prefill_s", "speedup_vs_kv_cache", "speedup_ceiling", "state_ratio_vs_kv_cache"]))
    rmfa = [r for r in rows if r["attention"] == "rmfa"]
    summary = {f"{r['mode']}_speedup_vs_kv_cache_{r['context']}": r["speedup_vs_kv_cache"] for r in rmfa}
    summary.update({f"{r['mode']}_speedup_ceiling_{r['context']}": r["speedup_ceiling"] for r in rmfa})
    summary["linear_layers_ms"] = rmfa[0]["linear_layers_ms"]
    for mode in args.modes:
        times = [r["ms_per_token"] for r in rmfa if r["mode"] == mode]
        summary[f"{mode}_rmfa_ms_per_token_longest_over_shortest"] = times[-1] / times[0]
    for key, value in summary.items():
        print(f"{key}: {value:.3g}")
    args.output.mkdir(parents=True, exist_ok=True)
    write_results(args, "decoding", rows, summary, [plot(rows, args)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
