"""Benchmark: batch embedding throughput (notes/s) on the default dataset, two comparisons in one run.

1. **Ray Data pipeline vs a plain loop** (target ≥ 0.9x): ``pipelines.embed.embed`` (Ray Data,
   ``ActorPoolStrategy`` with ``embedding.num_actors`` actors of ``embedding.cpus_per_actor`` CPUs,
   driver-side Parquet parts) against one process that loads the same encoder and calls
   ``notellm.encoders.embed_notes`` on the same notes with the same batch size and threads. Both
   timed end to end (model load included: the pipeline pays it in its actor); the plain loop's
   embed-only time is printed too. Ray runs as a local cluster started by this script.
2. **Length-sorted vs unsorted micro-batches** (target ≥ 1.3x): ``embed_notes`` with and without
   ``sort_by_length`` on one loaded encoder, with the padding share of each.

Each measurement is repeated ``--repeats`` times, interleaved; medians are reported and written to
``bench/out/embedding.json``. The encoder is NoteLLM (``--checkpoint``, default the newest
checkpoint of ``training.run_name``, else the untrained model's state saved to a temp folder:
the same compute) or any ``--method`` of ``notellm.encoders``.

    .venv/bin/python -m bench.bench_embedding [--config configs/demo.yaml] [--notes 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from notellm.config import REPO_ROOT, PipelineConfig, load_config
from notellm.encoders import embed_notes, load_encoder
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--notes", type=int, default=512, help="notes of the dataset to embed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="notellm")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()

    import ray

    from pipelines.embed import embed

    cfg = load_config(REPO_ROOT / args.config, args.overrides)
    e = cfg.embedding
    threads = e.cpus_per_actor
    torch.set_num_threads(threads)
    table = pq.read_table(cfg.resolve_path(cfg.data.notes), columns=NOTES).slice(0, args.notes)
    notes = table.to_pylist()
    results: dict = {"notes": len(notes), "batch_size": e.batch_size, "threads": threads,
                     "actors": e.num_actors, "bf16": e.bf16, "method": args.method}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        checkpoint = notellm_checkpoint(cfg, args.checkpoint, tmp) if args.method == "notellm" else args.checkpoint
        results["checkpoint"] = checkpoint
        ray.init(num_cpus=max(threads * e.num_actors, 1), include_dashboard=False, log_to_driver=False)
        print(f"embedding {len(notes)} notes with {args.method} (batch {e.batch_size}, {threads} threads, "
              f"bf16 {e.bf16}), {args.repeats} repeats")

        # --- 1. Ray Data pipeline vs plain loop (end to end, model load included)
        ray_s, plain_s, plain_embed_s = [], [], []
        for r in range(args.repeats):
            started = time.perf_counter()
            embed(cfg, table, args.method, tmp / f"ray-{r}", source=(checkpoint, None))
            ray_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            encoder = load_encoder(cfg, args.method, checkpoint)
            loaded = time.perf_counter()
            embed_notes(encoder, notes, e.batch_size)
            plain_s.append(time.perf_counter() - started)
            plain_embed_s.append(time.perf_counter() - loaded)
            print(f"repeat {r + 1}: ray {ray_s[-1]:.1f}s, plain {plain_s[-1]:.1f}s "
                  f"(embed only {plain_embed_s[-1]:.1f}s)", flush=True)
        ray.shutdown()

        # --- 2. length-sorted vs unsorted micro-batches, one loaded encoder
        lengths = np.asarray([i.length for i in encoder.tokenize(notes)])
        sorted_s, unsorted_s = [], []
        embed_notes(encoder, notes[: e.batch_size], e.batch_size)  # warm-up
        for r in range(args.repeats):
            for sort, bucket in ((True, sorted_s), (False, unsorted_s)):
                started = time.perf_counter()
                embed_notes(encoder, notes, e.batch_size, sort_by_length=sort)
                bucket.append(time.perf_counter() - started)
            print(f"repeat {r + 1}: sorted {sorted_s[-1]:.1f}s, unsorted {unsorted_s[-1]:.1f}s", flush=True)

    n = len(notes)
    med = {k: statistics.median(v) for k, v in (("ray", ray_s), ("plain", plain_s), ("plain_embed", plain_embed_s),
                                                 ("sorted", sorted_s), ("unsorted", unsorted_s))}
    results |= {f"{k}_median_s": round(v, 2) for k, v in med.items()}
    results |= {f"{k}_notes_per_s": round(n / v, 2) for k, v in med.items()}
    results["ray_vs_plain"] = round(med["plain"] / med["ray"], 3)
    results["sorted_vs_unsorted"] = round(med["unsorted"] / med["sorted"], 3)
    results["padding_sorted"] = round(float(padding_share(lengths, e.batch_size, True)), 4)
    results["padding_unsorted"] = round(float(padding_share(lengths, e.batch_size, False)), 4)
    results["prompt_tokens_min_median_max"] = [int(lengths.min()), int(np.median(lengths)), int(lengths.max())]
    print(f"\nRay Data pipeline {results['ray_notes_per_s']:.1f} notes/s vs plain loop "
          f"{results['plain_notes_per_s']:.1f} notes/s (end to end; plain embed only "
          f"{results['plain_embed_notes_per_s']:.1f}): ratio {results['ray_vs_plain']:.2f}x (target >= 0.9x)")
    print(f"length-sorted {results['sorted_notes_per_s']:.1f} notes/s vs unsorted "
          f"{results['unsorted_notes_per_s']:.1f} notes/s: ratio {results['sorted_vs_unsorted']:.2f}x "
          f"(target >= 1.3x); padding {100 * results['padding_sorted']:.1f}% vs "
          f"{100 * results['padding_unsorted']:.1f}%; prompt tokens min/median/max "
          f"{results['prompt_tokens_min_median_max']}")
    atomic_write_text(OUT / "embedding.json", json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT / 'embedding.json'}")


if __name__ == "__main__":
    main()
