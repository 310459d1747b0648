"""Benchmark: the tuned faiss note index (notellm.index) vs exact search, on SYNTHETIC vectors.

Data: ``--n`` database vectors and ``--queries`` held-out query vectors drawn from one Gaussian
mixture in ``--dim`` dimensions (``--clusters`` centres ~ N(0, I), points = centre + ``--spread``
· N(0, I)), L2-normalised, float32. Clustered like real embeddings; pure uniform noise would be
unrealistically hard for any approximate index.

Compares, in one run:
* ours: ``NoteIndex.build`` with the default config (``kind=auto`` → ``IVF{4 sqrt N},Flat`` above
  ``exact_max_notes``; nprobe tuned on its default perturbed-database sample to recall@100 ≥
  ``target_recall_at_100``), vs
* the reference: exact inner-product search (``IndexFlatIP``) on the same vectors.

Reports build time, index bytes (the saved ``index.faiss``), RSS, queries/s of both (median of
``--repeats`` interleaved runs of all held-out queries in one batch, k=100; raw faiss ``search`` and through
``NoteIndex.search`` which adds the id mapping), their ratio (target ≥ 10x), and recall@100 of ours
vs exact on the held-out queries (target ≥ 0.95). faiss runs on ``--threads`` threads.

    .venv/bin/python -m bench.bench_faiss [--n 1000000] [--dim 128] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import psutil

from notellm.config import REPO_ROOT, IndexConfig
from notellm.index import ModelInfo, NoteIndex, recall_at_k

OUT = REPO_ROOT / "bench" / "out"
K = 100


def gaussian_mixture(n: int, dim: int, n_clusters: int, spread: float, seed: int,
                     chunk: int = 100_000) -> np.ndarray:
    """L2-normalised mixture samples: float32 [n, dim], generated in chunks (bounded memory)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centers[rng.integers(0, n_clusters, m)] + np.float32(spread) * rng.standard_normal(
            (m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss() -> int:
    return psutil.Process().memory_info().rss


def timed_searches(searches: dict[str, object], queries: np.ndarray, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each ``search(queries)``, runs interleaved (exact, ours, exact, ours, ...)
    so that load from other processes hits all of them alike; one warm-up each first."""
    for search in searches.values():
        search(queries[:10])
    seconds: dict[str, list[float]] = {name: [] for name in searches}
    for _ in range(repeats):
        for name, search in searches.items():
            started = time.perf_counter()
            search(queries)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    faiss.omp_set_num_threads(args.threads)
    cfg = IndexConfig()  # defaults: kind=auto, exact_max_notes=100k, target recall@100 0.95
    print(f"SYNTHETIC Gaussian mixture: {args.n:,} x {args.dim} + {args.queries:,} held-out queries, "
          f"{args.clusters} clusters, spread {args.spread}; faiss {faiss.__version__}, {args.threads} threads; "
          f"config {cfg.model_dump()}", flush=True)
    data = gaussian_mixture(args.n + args.queries, args.dim, args.clusters, args.spread, args.seed)
    db, queries = data[:args.n], np.ascontiguousarray(data[args.n:])
    del data
    ids = [f"n{i}" for i in range(args.n)]
    model = ModelInfo("synthetic", None, None, args.dim)
    rss_data = rss()

    # ---- ours: tuned approximate index
    started = time.perf_counter()
    ours = NoteIndex.build(db, ids, None, cfg, model, seed=args.seed)
    build_s = time.perf_counter() - started
    rss_ours = rss()
    m = ours.metadata
    print(f"ours  build {build_s:.1f}s: {m.factory}, nprobe={m.nprobe} ef_search={m.ef_search}, "
          f"tuned recall@100 {m.recall_at_100:.4f} on {m.recall_queries} tuning queries", flush=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        saved = ours.save(Path(tmp) / "index")
        index_bytes = (saved / "index.faiss").stat().st_size
        started = time.perf_counter()
        NoteIndex.load(saved, model)
        load_s = time.perf_counter() - started

    # ---- reference: exact search on the same vectors
    started = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(db)
    exact_build_s = time.perf_counter() - started
    exact_bytes = exact.ntotal * args.dim * 4

    _, truth = exact.search(queries, K)
    _, approx = ours.index.search(queries, K, params=faiss.SearchParametersIVF(nprobe=m.nprobe)
                                  if m.nprobe else None)
    held_out_recall = recall_at_k(approx, truth)
    _, approx_ids = ours.search(queries, K)
    truth_ids = [[ids[j] for j in row] for row in truth]
    api_recall = float(np.mean([len(set(a) & set(t)) / K for a, t in zip(approx_ids, truth_ids, strict=True)]))

    params = faiss.SearchParametersIVF(nprobe=m.nprobe) if m.nprobe else None
    runs = timed_searches({"exact": lambda q: exact.search(q, K),
                           "ours": lambda q: ours.index.search(q, K, params=params),
                           "api": lambda q: ours.search(q, K)}, queries, args.repeats)
    exact_runs, ours_runs, api_runs = runs["exact"], runs["ours"], runs["api"]
    exact_s, ours_s, api_s = (statistics.median(runs[name]) for name in ("exact", "ours", "api"))
    q = len(queries)
    exact_qps, ours_qps, api_qps = q / exact_s, q / ours_s, q / api_s
    ratio, api_ratio = ours_qps / exact_qps, api_qps / exact_qps
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print(f"exact IndexFlatIP: build {exact_build_s:.1f}s, {exact_bytes / 1e6:.0f} MB, median {exact_s:.3f}s "
          f"of {['%.3f' % s for s in exact_runs]} -> {exact_qps:,.0f} queries/s")
    print(f"ours  {m.factory} nprobe={m.nprobe}: {index_bytes / 1e6:.0f} MB on disk (load {load_s:.1f}s), "
          f"median {ours_s:.4f}s of {['%.4f' % s for s in ours_runs]} -> {ours_qps:,.0f} queries/s")
    print(f"ours  via NoteIndex.search (ids as strings): median {api_s:.4f}s of {['%.4f' % s for s in api_runs]} "
          f"-> {api_qps:,.0f} queries/s")
    print(f"speed-up vs exact: {ratio:.1f}x raw faiss, {api_ratio:.1f}x through NoteIndex.search (target >= 10x)")
    print(f"recall@100 vs exact on {q:,} held-out queries: {held_out_recall:.4f} (NoteIndex.search "
          f"{api_recall:.4f}; target >= {cfg.target_recall_at_100})")
    print(f"RSS: {rss_data / 1e9:.2f} GB with the vectors, +{(rss_ours - rss_data) / 1e9:.2f} GB for ours, "
          f"peak {peak_rss / 1e9:.2f} GB (whole process: vectors + ours + exact)")
    passed = held_out_recall >= cfg.target_recall_at_100 and ratio >= 10
    print("PASS" if passed else "FAIL", flush=True)

    result = {
        "data": {"kind": "synthetic gaussian mixture, L2-normalised float32", "n": args.n, "dim": args.dim,
                 "queries": q, "clusters": args.clusters, "spread": args.spread, "seed": args.seed},
        "faiss_version": faiss.__version__, "threads": args.threads, "repeats": args.repeats, "k": K,
        "config": cfg.model_dump(),
        "ours": {"factory": m.factory, "nprobe": m.nprobe, "ef_search": m.ef_search,
                 "build_s": round(build_s, 2), "load_s": round(load_s, 2), "index_bytes": index_bytes,
                 "rss_added_bytes": rss_ours - rss_data, "tuned_recall_at_100": m.recall_at_100,
                 "held_out_recall_at_100": round(held_out_recall, 4),
                 "api_recall_at_100": round(api_recall, 4),
                 "median_s": ours_s, "runs_s": ours_runs, "qps": round(ours_qps, 1),
                 "api_median_s": api_s, "api_runs_s": api_runs, "api_qps": round(api_qps, 1)},
        "exact": {"build_s": round(exact_build_s, 2), "index_bytes": exact_bytes, "median_s": exact_s,
                  "runs_s": exact_runs, "qps": round(exact_qps, 1)},
        "speedup": round(ratio, 2), "api_speedup": round(api_ratio, 2),
        "rss_with_vectors_bytes": rss_data, "peak_rss_bytes": peak_rss, "passed": passed,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    out_path = OUT / f"faiss_{args.n // 1000}k_{args.dim}d_spread{args.spread:g}.json"
    from notellm.io_utils import atomic_write_text

    atomic_write_text(out_path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
