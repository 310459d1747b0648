"""Benchmark: co-occurrence pair mining on SYNTHETIC behaviour data (bench/synthetic_behaviors.py).

Compares, in one run:
* the Ray Data pipeline (``pipelines.mine_pairs.mine_parts_ray``) at 1M and 10M events: events/s,
  and cost growth 1M → 10M (target ≤ 12× the time for 10× the events);
* the Ray pipeline vs the plain pandas/Python reference (``tests/reference_mining.py``) on the
  same 1M events (the reference is the speed a straightforward implementation gets);
* peak memory: the summed RSS of this process and every process it started (Ray's GCS, raylet,
  workers), sampled every 0.2 s. RSS counts shared object-store pages once per process that
  touched them, so this is an upper bound.

Ray runs as a fresh local cluster started by this script (``num_cpus`` = all cores), so the
process tree holds all of it. Medians of ``--repeats`` runs (the reference runs once: it is slow).

    .venv/bin/python -m bench.bench_mining [--sizes 1000000 10000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import pandas as pd
import psutil
import pyarrow.parquet as pq

from bench.synthetic_behaviors import write as write_synthetic
from notellm.config import REPO_ROOT, MiningConfig
from pipelines.mine_pairs import mine_parts_ray

OUT = REPO_ROOT / "bench" / "out"


class PeakRSS:
    """Samples the summed RSS of this process tree in a thread; ``peak`` in bytes."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self.peak = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load_events(n_events: int) -> pd.DataFrame:
    folder = write_synthetic(OUT / f"synthetic-{n_events // 1_000_000}m", n_events)
    return pq.read_table(folder / "behaviors.parquet", columns=["user_id", "note_id", "ts"]).to_pandas()


def time_ray(events: pd.DataFrame, cfg: MiningConfig, repeats: int) -> tuple[list[float], int, int]:
    """Wall seconds per run, pairs out, peak RSS bytes."""
    seconds, peak, pairs = [], 0, 0
    for _ in range(repeats):
        with PeakRSS() as mem:
            started = time.perf_counter()
            out = mine_parts_ray({"all": (events, cfg)})
            seconds.append(time.perf_counter() - started)
        pairs = out["all"][0].num_rows
        peak = max(peak, mem.peak)
    return seconds, pairs, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    import ray

    cfg = MiningConfig()  # the defaults: 7-day window, u=30, l=0.01, t=10, cap 30 notes, skip
    print(f"SYNTHETIC data (Zipf notes, log-normal users), mining config {cfg.model_dump()}")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results: dict[int, dict] = {}
    for n in args.sizes:
        events = load_events(n)
        mine_parts_ray({"all": (events.head(10_000), cfg)})  # warm-up: worker start-up, imports
        seconds, pairs, peak = time_ray(events, cfg, args.repeats)
        med = statistics.median(seconds)
        results[n] = {"median_s": med, "pairs": pairs, "peak_rss_gb": peak / 1e9}
        print(f"ray   {n:>11,} events: median {med:6.1f}s of {['%.1f' % s for s in seconds]} "
              f"-> {n / med:,.0f} events/s, {pairs:,} pairs, peak RSS (tree) {peak / 1e9:.2f} GB", flush=True)
    ray.shutdown()

    if len(args.sizes) >= 2:
        small, large = min(args.sizes), max(args.sizes)
        growth = results[large]["median_s"] / results[small]["median_s"]
        print(f"cost growth {small:,} -> {large:,} events ({large / small:.0f}x events): "
              f"{growth:.2f}x time (target <= 12x)")

    if not args.skip_reference:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from reference_mining import reference_mine

        n = min(args.sizes)
        events = load_events(n)
        with PeakRSS() as mem:
            started = time.perf_counter()
            ref_pairs, _ = reference_mine(events, cfg.window_days, cfg.u, cfg.l, cfg.t, cfg.max_notes_per_user,
                                          cfg.heavy_user_policy, cfg.seed)
            ref_s = time.perf_counter() - started
        print(f"pandas reference {n:,} events: {ref_s:.1f}s -> {n / ref_s:,.0f} events/s, "
              f"{len(ref_pairs):,} pairs, peak RSS {mem.peak / 1e9:.2f} GB")
        assert len(ref_pairs) == results[n]["pairs"], "reference and Ray disagree on the pair count"
        print(f"ratio ray vs reference on {n:,} events: {ref_s / results[n]['median_s']:.2f}x faster")


if __name__ == "__main__":
    main()
