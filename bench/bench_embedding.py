"""Benchmark: batch embedding throughput (notes/s) on the default dataset, two comparisons in one run.

1. **Ray Data pipeline vs a plain loop** (target ≥ 0.9x): ``pipelines.embed.embed`` (Ray Data,
   ``ActorPoolStrategy`` with ``embedding.num_actors`` actors of ``embedding.cpus_per_actor`` CPUs,
   driver-side Parquet parts) against a fresh Python process that loads the same encoder and calls
   ``notellm.encoders.embed_notes`` on the same notes with the same batch size and as many torch
   threads as the actor pool holds CPUs (``num_actors x cpus_per_actor``). Both
   are timed end to end from this driver: the pipeline pays its actor's process start, imports
   and model load, the plain loop its interpreter start, imports and model load. Each runs on
   ``--notes`` notes and on a quarter of them; the difference gives the **marginal throughput**
   (notes/s once started, the number that matters for a large corpus), reported beside the
   end-to-end one. Ray runs as a local cluster started by this script.
2. **Length-sorted vs unsorted micro-batches** (target ≥ 1.3x): ``embed_notes`` with and without
   ``sort_by_length`` on one loaded encoder in this process, with the padding share of each.

Measurements are repeated ``--repeats`` times, interleaved; medians are reported and written to
``bench/out/embedding.json``. The encoder is NoteLLM (``--checkpoint``, default the newest
checkpoint of ``training.run_name``, else the untrained model's state saved to a temp folder:
the same compute) or any ``--method`` of ``notellm.encoders``.

    .venv/bin/python -m bench.bench_embedding [--config configs/demo.yaml] [--notes 384] [--repeats 3] \\
        [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from notellm.config import REPO_ROOT, PipelineConfig, load_config
from notellm.io_utils import atomic_write_text
from notellm.training import TrainingDataError, newest_checkpoint

OUT = REPO_ROOT / "bench" / "out"
NOTES = ["note_id", "title", "content", "hashtags", "category"]


def notellm_checkpoint(cfg: PipelineConfig, given: str | None, tmp: Path) -> str:
    """``given``, else the newest checkpoint of the configured run, else the untrained model's
    trainable state written to ``tmp`` (same architecture and compute as a trained one)."""
    if given:
        return given
    try:
        return str(newest_checkpoint(cfg)[0])
    except TrainingDataError:
        from notellm.modeling import build_notellm
        from notellm.training import TRAINABLE_STATE_FILE

        model, _ = build_notellm(cfg.model, cfg.lora, for_training=False, emb_token=cfg.prompts.emb_token)
        model.save_trainable_state(tmp / TRAINABLE_STATE_FILE)
        print(f"no checkpoint of {cfg.training.run_name}: using the untrained model's state")
        return str(tmp)


def padding_share(lengths: np.ndarray, batch_size: int, sort: bool) -> float:
    """Share of padded positions in the forward batches of ``embed_notes``."""
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(lengths))
    padded = sum(int(lengths[order[i:i + batch_size]].max()) * len(order[i:i + batch_size])
                 for i in range(0, len(order), batch_size))
    return 1 - lengths.sum() / padded


def total_cpus(cfg: PipelineConfig) -> int:
    """CPUs the pipeline's actor pool holds: the plain loop gets as many torch threads."""
    return cfg.embedding.num_actors * cfg.embedding.cpus_per_actor


def read_notes(cfg: PipelineConfig, n: int) -> pa.Table:
    return pq.read_table(cfg.resolve_path(cfg.data.notes), columns=NOTES).slice(0, n)


def plain_loop(args: argparse.Namespace) -> None:
    """The plain loop's process (``--plain-loop N``): load, embed, print the embed-only seconds."""
    import torch

    from notellm.encoders import embed_notes, load_encoder

    cfg = load_config(REPO_ROOT / args.config, args.overrides)
    torch.set_num_threads(total_cpus(cfg))
    notes = read_notes(cfg, args.plain_loop).to_pylist()
    encoder = load_encoder(cfg, args.method, args.checkpoint)
    started = time.perf_counter()
    vectors = embed_notes(encoder, notes, cfg.embedding.batch_size)
    assert vectors.shape[0] == len(notes)
    print(json.dumps({"embed_s": time.perf_counter() - started}))


def time_plain(args: argparse.Namespace, checkpoint: str | None, n: int) -> tuple[float, float]:
    """(end-to-end seconds incl. interpreter start, embed-only seconds) of the plain loop on n notes."""
    command = [sys.executable, "-m", "bench.bench_embedding", "--config", args.config, "--method", args.method,
               "--plain-loop", str(n), *(["--checkpoint", checkpoint] if checkpoint else []), *args.overrides]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    total = time.perf_counter() - started
    return total, json.loads(proc.stdout.strip().splitlines()[-1])["embed_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--notes", type=int, default=384, help="notes of the dataset to embed (and a quarter)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="notellm")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--sort-only", action="store_true", help="only comparison 2 (e.g. with longer prompts)")
    parser.add_argument("--plain-loop", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.plain_loop is not None:
        return plain_loop(args)

    import ray
    import torch

    from notellm.encoders import embed_notes, load_encoder
    from pipelines.embed import embed

    cfg = load_config(REPO_ROOT / args.config, args.overrides)
    e = cfg.embedding
    threads = total_cpus(cfg)
    torch.set_num_threads(threads)
    large, small = args.notes, max(args.notes // 4, 1)
    table = read_notes(cfg, large)
    notes = table.to_pylist()
    results: dict = {"config": args.config, "overrides": args.overrides, "notes": large, "notes_small": small,
                     "batch_size": e.batch_size, "threads": threads, "actors": e.num_actors, "bf16": e.bf16,
                     "method": args.method, "prompt_budgets": [cfg.prompts.title_max_tokens,
                                                               cfg.prompts.content_max_tokens]}
    times: dict[str, list[float]] = {k: [] for k in ("ray", "ray_small", "plain", "plain_small", "plain_embed",
                                                       "sorted", "unsorted")}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        checkpoint = notellm_checkpoint(cfg, args.checkpoint, tmp) if args.method == "notellm" else args.checkpoint
        results["checkpoint"] = checkpoint
        if not args.sort_only:
            ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
        print(f"embedding {large} and {small} notes with {args.method} (batch {e.batch_size}; {e.num_actors} "
              f"actor(s) x {e.cpus_per_actor} CPU vs a plain loop with {threads} threads; "
              f"bf16 {e.bf16}, prompt budgets {results['prompt_budgets']}), {args.repeats} repeats")

        # --- 1. Ray Data pipeline vs plain loop, end to end and marginal
        for r in range(0 if args.sort_only else args.repeats):
            for n, key in ((large, "ray"), (small, "ray_small")):
                started = time.perf_counter()
                embed(cfg, table.slice(0, n), args.method, tmp / f"{key}-{r}", source=(checkpoint, None))
                times[key].append(time.perf_counter() - started)
            for n, key in ((large, "plain"), (small, "plain_small")):
                total, embed_only = time_plain(args, checkpoint, n)
                times[key].append(total)
                if n == large:
                    times["plain_embed"].append(embed_only)
            print(f"repeat {r + 1}: ray {times['ray'][-1]:.1f}s / {times['ray_small'][-1]:.1f}s, plain "
                  f"{times['plain'][-1]:.1f}s / {times['plain_small'][-1]:.1f}s ({large} / {small} notes; plain "
                  f"embed only {times['plain_embed'][-1]:.1f}s)", flush=True)
        ray.shutdown()  # no-op when not started

        # --- 2. length-sorted vs unsorted micro-batches, one loaded encoder
        encoder = load_encoder(cfg, args.method, checkpoint)
        lengths = np.asarray([i.length for i in encoder.tokenize(notes)])
        embed_notes(encoder, notes[: e.batch_size], e.batch_size)  # warm-up
        for r in range(args.repeats):
            for sort, key in ((True, "sorted"), (False, "unsorted")):
                started = time.perf_counter()
                embed_notes(encoder, notes, e.batch_size, sort_by_length=sort)
                times[key].append(time.perf_counter() - started)
            print(f"repeat {r + 1}: sorted {times['sorted'][-1]:.1f}s, unsorted {times['unsorted'][-1]:.1f}s",
                  flush=True)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    results |= {f"{k}_median_s": round(v, 2) for k, v in med.items()}
    results |= {f"{k}_notes_per_s": round(large / v, 2) for k, v in med.items() if not k.endswith("_small")}
    results["raw_seconds"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
    if not args.sort_only:
        marginal = {p: statistics.median((large - small) / (b - s) for b, s in zip(times[p], times[f"{p}_small"]))
                    for p in ("ray", "plain")}
        results |= {f"{p}_marginal_notes_per_s": round(v, 2) for p, v in marginal.items()}
        results["ray_vs_plain"] = round(med["plain"] / med["ray"], 3)
        results["ray_vs_plain_marginal"] = round(marginal["ray"] / marginal["plain"], 3)
        print(f"\nRay Data pipeline vs plain loop, {large} notes end to end: {results['ray_notes_per_s']:.1f} vs "
              f"{results['plain_notes_per_s']:.1f} notes/s, ratio {results['ray_vs_plain']:.2f}x (target >= 0.9x)")
        print(f"  marginal ({small} -> {large} notes): {results['ray_marginal_notes_per_s']:.1f} vs "
              f"{results['plain_marginal_notes_per_s']:.1f} notes/s, ratio {results['ray_vs_plain_marginal']:.2f}x; "
              f"plain embed only {results['plain_embed_notes_per_s']:.1f} notes/s")
    results["sorted_vs_unsorted"] = round(med["unsorted"] / med["sorted"], 3)
    results["padding_sorted"] = round(float(padding_share(lengths, e.batch_size, True)), 4)
    results["padding_unsorted"] = round(float(padding_share(lengths, e.batch_size, False)), 4)
    results["prompt_tokens_min_median_max"] = [int(lengths.min()), int(np.median(lengths)), int(lengths.max())]
    print(f"length-sorted {results['sorted_notes_per_s']:.1f} notes/s vs unsorted "
          f"{results['unsorted_notes_per_s']:.1f} notes/s: ratio {results['sorted_vs_unsorted']:.2f}x "
          f"(target >= 1.3x); padding {100 * results['padding_sorted']:.1f}% vs "
          f"{100 * results['padding_unsorted']:.1f}%; prompt tokens min/median/max "
          f"{results['prompt_tokens_min_median_max']}")
    out = OUT / ("embedding_sort.json" if args.sort_only else "embedding.json")
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
