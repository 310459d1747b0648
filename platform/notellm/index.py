"""The faiss note index: exact search for small pools, tuned IVF/HNSW for large ones.

Vectors are float32 ``[N, d]`` and L2-normalised by the encoders, so inner product = cosine.
faiss stores them under int64 *row positions* ``0..N-1`` (no ID map: positions are the order of
``build`` followed by every ``add``); the string note ids and their categories live beside the
index in ``ids.parquet``, row ``i`` describing position ``i``.

Index kinds (``choose_factory``), all of which keep the raw vectors, so the index is its own
vector store (``reconstruct``) and ``rebuild`` needs no second copy of the embeddings:

* ``Flat``            — exact inner product (``IndexFlatIP``); recall 1.0 by definition.
* ``IVF{nlist},Flat`` — inverted lists, ``nlist ~ 4 sqrt(N)``, k-means trained on a seeded
  sample (``reconstruct_n`` scans the lists, so no direct map is needed).
* ``HNSW{M},Flat``    — graph index (construction is multi-threaded, hence not bit-for-bit
  reproducible; IVF and Flat are).

The search parameter (``nprobe`` for IVF, ``efSearch`` for HNSW) is tuned at build time: a held-out
sample of queries (by default ``TUNING_QUERIES`` database vectors perturbed by Gaussian noise and
re-normalised, or the caller's own sample) is searched exactly with a flat index, and the
parameter grows until recall@100 against that exact top-100 reaches ``target_recall_at_100``.
The chosen value and the measured recall are stored in the metadata.

On disk, one folder::

    index.faiss     faiss.write_index (faiss's own format; no pickle anywhere)
    ids.parquet     columns note_id (string), category (string, nullable); row i = position i
    metadata.json   model name/version/run id, dim, normalisation, metric, factory, nprobe /
                    ef_search, note count, build time, measured recall, faiss version, ...

``save`` writes a temporary sibling folder and renames it into place; an existing folder is moved
aside first and restored if the final rename fails, so a failed save never loses the old index.
``load`` refuses an index whose model name, version, run id, dimension or normalisation differ
from the model that will query it.

Search results: ``scores`` float32 ``[Q, k]`` and ``note_ids`` ``list[list[str | None]]`` (Q lists
of k). When fewer than k candidates exist (small pool, small category, excluded self, or an
approximate index that found fewer), the missing slots are padded: score ``-inf``, note id
``None``. Rows are sorted by decreasing score.

Within-category search (``categories=``) and restriction go through faiss's own
``SearchParameters(sel=IDSelectorBatch(...))`` on the same index: exact for ``Flat``; on IVF/HNSW
the tuned ``nprobe``/``efSearch`` is used, so recall for a very small category can fall below
the target tuned on the whole pool (use ``Flat`` — the default up to ``exact_max_notes`` — for
evaluation pools).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from notellm.config import IndexConfig
from notellm.io_utils import fsync_dir

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
METADATA_FILE = "metadata.json"
METADATA_FORMAT = 1
"""Version of the metadata.json layout; bumped when fields change meaning."""

RECALL_K = 100
"""The K of the tuned recall@K (the issue's target is recall@100 vs exact search)."""
TUNING_QUERIES = 1_000
"""Held-out queries used to tune nprobe/efSearch (fewer if the pool is smaller)."""
TUNING_NOISE = 0.2
"""Default tuning queries: database vectors plus Gaussian noise of this expected L2 norm."""
NORM_TOLERANCE = 1e-3
"""A vector counts as L2-normalised when | ||x|| - 1 | <= this."""
IVF_LISTS_PER_SQRT_N = 4
"""auto/ivf: nlist = IVF_LISTS_PER_SQRT_N * sqrt(N) (faiss's usual 4-16 sqrt(N))."""
IVF_TRAIN_POINTS_PER_LIST = 40
"""k-means trains on this many sampled points per list (faiss warns below 39); also caps nlist."""
HNSW_M = 32
"""Graph degree M of ``HNSW{M},Flat``."""
HNSW_MAX_EF_SEARCH = 4_096
"""Largest efSearch tried while tuning; failing to reach the target there is an error."""

_FACTORY = re.compile(r"^(Flat|IVF(?P<nlist>[1-9]\d*),Flat|HNSW(?P<m>[1-9]\d*),Flat)$")


class NoteIndexError(ValueError):
    """Base class: every error here names the file or field and the reason."""


class IndexInputError(NoteIndexError):
    """Bad vectors, ids, categories or arguments given to build/add/search."""


class IndexMismatchError(NoteIndexError):
    """The stored index was built by a different model than the one that will query it."""


class IndexFileError(NoteIndexError):
    """A missing, unreadable or inconsistent index folder."""


class IndexTuningError(RuntimeError):
    """The target recall could not be reached with the largest search parameter tried."""


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the embedding model whose vectors the index holds (or that will query it).

    ``version``: registry version or weights fingerprint; ``run_id``: the training run (MLflow).
    """

    name: str
    version: str | None
    run_id: str | None
    dim: int
    normalized: bool = True

    @classmethod
    def from_encoder(cls, info: Any) -> ModelInfo:
        """From a ``notellm.encoders.EncoderInfo`` (or its dict, as in ``encoder.json``).

        ``name`` is ``"<method>/<model_name>"``: two methods on one base model (``llm-mean``,
        ``prompteol``) share weights and version but are different embedding spaces.
        """
        d = dict(info) if isinstance(info, Mapping) else asdict(info)
        try:
            return cls(f"{d['method']}/{d['model_name']}", d["version"], d.get("run_id"), int(d["dim"]),
                       bool(d.get("normalized", True)))
        except KeyError as exc:
            raise IndexInputError(f"encoder info lacks field {exc.args[0]!r}: {d}") from None


_MODEL_FIELDS = {"model_name": "name", "model_version": "version", "run_id": "run_id", "dim": "dim",
                 "normalized": "normalized"}


@dataclass
class IndexMetadata:
    """Everything ``metadata.json`` holds (one flat JSON object)."""

    model_name: str
    model_version: str | None
    run_id: str | None
    dim: int
    normalized: bool
    metric: str
    factory: str
    nprobe: int | None
    ef_search: int | None
    note_count: int
    notes_at_build: int
    build_seconds: float
    recall_at_100: float
    recall_queries: int
    built_at: str
    faiss_version: str
    seed: int
    format: int = METADATA_FORMAT


# --------------------------------------------------------------------------- validation

def _check_vectors(vectors: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``[n, d]`` array, or IndexInputError."""
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise IndexInputError(f"{what}: expected a 2-D array [n, d], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise IndexInputError(f"{what}: empty (0 vectors)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise IndexInputError(f"{what}: expected float vectors, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise IndexInputError(f"{what}: dimension {arr.shape[1]} != index dimension {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise IndexInputError(f"{what}: row {int(np.argmin(finite))} has NaN or inf values")
    norms = np.linalg.norm(arr, axis=1)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        row = int(np.argmax(bad))
        raise IndexInputError(
            f"{what}: row {row} has L2 norm {norms[row]:.4f}; vectors must be L2-normalised "
            f"(x / ||x||) before indexing or querying ({int(bad.sum())} rows affected)"
        )
    return arr


def _check_ids(note_ids: Sequence[str], n: int, what: str) -> list[str]:
    ids = list(note_ids)
    if len(ids) != n:
        raise IndexInputError(f"{what}: {len(ids)} note ids for {n} vectors")
    for i, nid in enumerate(ids):
        if not isinstance(nid, str) or not nid:
            raise IndexInputError(f"{what}: note id at row {i} must be a non-empty string, got {nid!r}")
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        raise IndexInputError(f"{what}: duplicate note id {dup!r}")
    return ids


def _check_categories(categories: Sequence[str | None] | None, n: int, what: str) -> list[str | None]:
    if categories is None:
        return [None] * n
    cats = list(categories)
    if len(cats) != n:
        raise IndexInputError(f"{what}: {len(cats)} categories for {n} vectors")
    for i, c in enumerate(cats):
        if c is not None and not isinstance(c, str):
            raise IndexInputError(f"{what}: category at row {i} must be a string or None, got {c!r}")
    return cats


# --------------------------------------------------------------------------- pure helpers

def choose_factory(n: int, dim: int, cfg: IndexConfig) -> str:
    """The faiss factory string for ``n`` notes of dimension ``dim`` (metric: inner product).

    ``cfg.kind``: ``flat`` → ``Flat``; ``ivf`` → ``IVF{nlist},Flat``; ``hnsw`` → ``HNSW32,Flat``;
    ``auto`` → ``Flat`` up to ``cfg.exact_max_notes`` notes, else IVF.
    ``nlist = round(4 sqrt(n))``, capped so k-means gets ``IVF_TRAIN_POINTS_PER_LIST`` points per list.
    """
    if n <= 0 or dim <= 0:
        raise IndexInputError(f"choose_factory: need n > 0 and dim > 0, got n={n}, dim={dim}")
    kind = cfg.kind
    if kind == "auto":
        kind = "flat" if n <= cfg.exact_max_notes else "ivf"
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M},Flat"
    nlist = max(1, min(round(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // IVF_TRAIN_POINTS_PER_LIST))
    return f"IVF{nlist},Flat"


def exact_top_k(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with ``IndexFlatIP``: (scores float32 [Q, k], positions int64 [Q, k])."""
    flat = faiss.IndexFlatIP(database.shape[1])
    flat.add(database)
    return flat.search(queries, k)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx_i ∩ exact_i| / |exact_i| for position arrays [Q, k] (-1 ignored)."""
    hits = 0
    total = 0
    for a, e in zip(approx, exact, strict=True):
        e_set = set(e[e >= 0].tolist())
        hits += len(e_set.intersection(a[a >= 0].tolist()))
        total += len(e_set)
    return hits / total if total else 1.0


def default_tuning_queries(vectors: np.ndarray, n_queries: int, seed: int) -> np.ndarray:
    """``n_queries`` random database rows plus Gaussian noise (expected norm ``TUNING_NOISE``),
    re-normalised: float32 [n_queries, d]. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(vectors.shape[0], size=min(n_queries, vectors.shape[0]), replace=False)
    noise = rng.standard_normal((rows.size, vectors.shape[1])).astype(np.float32)
    queries = vectors[np.sort(rows)] + noise * np.float32(TUNING_NOISE / math.sqrt(vectors.shape[1]))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries, dtype=np.float32)


def _kind(factory: str) -> str:
    match = _FACTORY.match(factory)
    if match is None:
        raise IndexInputError(
            f"factory {factory!r} is not supported: use 'Flat', 'IVF<nlist>,Flat' or 'HNSW<M>,Flat' "
            "(index kinds that keep the raw vectors, so rebuild can reconstruct them)"
        )
    return "flat" if factory == "Flat" else ("ivf" if match.group("nlist") else "hnsw")


def _search_params(index: faiss.Index, kind: str, nprobe: int | None, ef_search: int | None,
                   selector: faiss.IDSelector | None) -> faiss.SearchParameters | None:
    """Per-call search parameters carrying the tuned value and an optional id selector."""
    if kind == "ivf":
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe)
    elif kind == "hnsw":
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(ef_search)
    else:
        if selector is None:
            return None
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params


def _tune(index: faiss.Index, kind: str, queries: np.ndarray, exact: np.ndarray, k: int,
          target: float, n_lists: int) -> tuple[int | None, float]:
    """Smallest nprobe/efSearch whose recall@k vs ``exact`` [Q, k] reaches ``target``.

    Doubles the parameter until the target is met, then bisects between the last two values
    (recall grows with the parameter). Returns (parameter, measured recall); (None, 1.0) for Flat.
    """
    if kind == "flat":
        return None, 1.0

    def measure(value: int) -> float:
        params = _search_params(index, kind, value, value, None)
        _, positions = index.search(queries, k, params=params)
        return recall_at_k(positions, exact)

    # HNSW: efSearch below k behaves like k, so start there.
    start, limit = (1, n_lists) if kind == "ivf" else (k, HNSW_MAX_EF_SEARCH)
    lo, value = None, start
    while True:
        recall = measure(value)
        if recall >= target:
            break
        if value >= limit:
            raise IndexTuningError(
                f"{kind}: recall@{k} {recall:.4f} < target {target} even at "
                f"{'nprobe' if kind == 'ivf' else 'efSearch'}={value}; use index.kind=flat or ivf"
            )
        lo, value = value, min(value * 2, limit)
    hi, hi_recall = value, recall
    if lo is None:
        return hi, hi_recall
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_recall = measure(mid)
        if mid_recall >= target:
            hi, hi_recall = mid, mid_recall
        else:
            lo = mid
    return hi, hi_recall


# --------------------------------------------------------------------------- the index

class NoteIndex:
    """A faiss index over note embeddings plus its ids, categories and metadata.

    Build with ``NoteIndex.build``, open a saved one with ``NoteIndex.load``.
    """

    def __init__(self, index: faiss.Index, note_ids: list[str], categories: list[str | None],
                 metadata: IndexMetadata) -> None:
        self.index = index
        self.note_ids = note_ids
        self.categories = categories
        self.metadata = metadata
        self.kind = _kind(metadata.factory)
        self._position = {nid: i for i, nid in enumerate(note_ids)}
        self._id_array = np.array(note_ids, dtype=object)  # position -> note id, for vectorised lookups
        self._by_category: dict[str, list[int]] = {}
        for i, cat in enumerate(categories):
            if cat is not None:
                self._by_category.setdefault(cat, []).append(i)

    def __len__(self) -> int:
        return len(self.note_ids)

    @property
    def model_info(self) -> ModelInfo:
        m = self.metadata
        return ModelInfo(m.model_name, m.model_version, m.run_id, m.dim, m.normalized)

    # ---- build / add

    @classmethod
    def build(cls, vectors: np.ndarray, note_ids: Sequence[str], categories: Sequence[str | None] | None,
              cfg: IndexConfig, model_info: ModelInfo, *, factory: str | None = None,
              tuning_queries: np.ndarray | None = None, seed: int = 0) -> NoteIndex:
        """Build, train and tune an index.

        vectors: float32 [N, d], L2-normalised, ``d == model_info.dim``; note_ids: N unique
        strings; categories: N strings/None (or None: no within-category search). ``factory``
        overrides ``choose_factory``; ``tuning_queries`` float32 [Q, d] (normalised) replaces the
        default perturbed-database sample. Deterministic in ``seed`` for Flat and IVF.
        """
        started = time.perf_counter()
        if not model_info.normalized:
            raise IndexInputError("model_info.normalized is False: the index holds L2-normalised vectors only")
        vectors = _check_vectors(vectors, model_info.dim, "build vectors")
        n, dim = vectors.shape
        ids = _check_ids(note_ids, n, "build")
        cats = _check_categories(categories, n, "build")
        factory = factory or choose_factory(n, dim, cfg)
        kind = _kind(factory)

        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        n_lists = 0
        if kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            n_lists = ivf.nlist
            if n < n_lists:
                raise IndexInputError(f"factory {factory!r}: {n} vectors cannot train {n_lists} lists")
            ivf.cp.seed = seed
            rng = np.random.default_rng(seed)
            n_train = min(n, IVF_TRAIN_POINTS_PER_LIST * n_lists)
            sample = vectors if n_train == n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
            index.train(sample)
        index.add(vectors)

        k = min(RECALL_K, n)
        if tuning_queries is None:
            queries = default_tuning_queries(vectors, TUNING_QUERIES, seed + 1)
        else:
            queries = _check_vectors(tuning_queries, dim, "tuning_queries")
        if kind == "flat":
            param, recall = None, 1.0
        else:
            _, exact = exact_top_k(vectors, queries, k)
            param, recall = _tune(index, kind, queries, exact, k, cfg.target_recall_at_100, n_lists)
        metadata = IndexMetadata(
            model_name=model_info.name, model_version=model_info.version, run_id=model_info.run_id,
            dim=dim, normalized=True, metric="inner_product", factory=factory,
            nprobe=param if kind == "ivf" else None, ef_search=param if kind == "hnsw" else None,
            note_count=n, notes_at_build=n, build_seconds=round(time.perf_counter() - started, 3),
            recall_at_100=round(float(recall), 6), recall_queries=int(queries.shape[0]),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"), faiss_version=faiss.__version__,
            seed=seed,
        )
        return cls(index, ids, cats, metadata)

    def add(self, vectors: np.ndarray, note_ids: Sequence[str],
            categories: Sequence[str | None] | None = None) -> None:
        """Append new notes (cold start) without retraining: IVF assigns them to the trained
        lists, HNSW links them into the graph, Flat appends. vectors float32 [n, d], normalised.

        Refuses ids already in the index. The stored recall stays the one measured at build
        (``notes_at_build`` says when); ``rebuild`` re-trains and re-tunes after many adds.
        """
        vectors = _check_vectors(vectors, self.metadata.dim, "add vectors")
        ids = _check_ids(note_ids, vectors.shape[0], "add")
        cats = _check_categories(categories, vectors.shape[0], "add")
        clash = [nid for nid in ids if nid in self._position]
        if clash:
            raise IndexInputError(f"add: note id {clash[0]!r} is already in the index "
                                  f"({len(clash)} duplicates); rebuild to replace vectors")
        start = len(self.note_ids)
        self.index.add(vectors)
        for offset, (nid, cat) in enumerate(zip(ids, cats, strict=True)):
            self._position[nid] = start + offset
            if cat is not None:
                self._by_category.setdefault(cat, []).append(start + offset)
        self.note_ids.extend(ids)
        self._id_array = np.concatenate([self._id_array, np.array(ids, dtype=object)])
        self.categories.extend(cats)
        self.metadata.note_count = len(self.note_ids)

    def vectors(self) -> np.ndarray:
        """All stored vectors, float32 [N, d], in position order (reconstructed from the index)."""
        return self.index.reconstruct_n(0, self.index.ntotal)

    # ---- search

    def search(self, queries: np.ndarray, k: int,
               categories: str | Sequence[str] | None = None,
               exclude_ids: Sequence[str | None] | None = None) -> tuple[np.ndarray, list[list[str | None]]]:
        """Top-k notes by inner product for each query.

        queries: float32 [Q, d], L2-normalised. categories: None (whole pool), one category for all
        queries, or Q categories (query i searches only notes of categories[i]). exclude_ids: Q
        note ids (or None) each removed from its own query's results (e.g. the query note itself).
        Returns (scores float32 [Q, k], note ids Q lists of k); missing slots: -inf / None.
        """
        queries = _check_vectors(queries, self.metadata.dim, "search queries")
        q = queries.shape[0]
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise IndexInputError(f"search: k must be a positive int, got {k!r}")
        k = int(k)
        if exclude_ids is not None and len(exclude_ids) != q:
            raise IndexInputError(f"search: {len(exclude_ids)} exclude_ids for {q} queries")
        if isinstance(categories, str):
            categories = [categories] * q
        if categories is not None and len(categories) != q:
            raise IndexInputError(f"search: {len(categories)} categories for {q} queries")

        fetch = min(k + (1 if exclude_ids is not None else 0), len(self.note_ids))
        scores = np.full((q, k), -np.inf, dtype=np.float32)
        out_ids: list[list[str | None]] = [[None] * k for _ in range(q)]
        if categories is None:
            groups = {None: np.arange(q)}
        else:
            groups = {}
            for i, cat in enumerate(categories):
                groups.setdefault(cat, []).append(i)
        m = self.metadata
        for cat, rows in groups.items():
            rows = np.asarray(rows, dtype=np.int64)
            selector, members = None, None
            if cat is not None:
                if cat not in self._by_category:
                    raise IndexInputError(f"search: category {cat!r} has no notes in the index")
                members = np.asarray(self._by_category[cat], dtype=np.int64)
                selector = faiss.IDSelectorBatch(members)
            params = _search_params(self.index, self.kind, m.nprobe, m.ef_search, selector)
            d, positions = self.index.search(queries[rows], fetch, params=params)
            keep = positions >= 0
            if exclude_ids is not None:
                skip = np.array([self._position.get(exclude_ids[qi], -1) for qi in rows], dtype=np.int64)
                keep &= positions != skip[:, None]
            # Move kept results to the front of each row (stable: order by score is preserved).
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
            keep = np.take_along_axis(keep, order, 1)
            d = np.take_along_axis(d, order, 1)
            positions = np.take_along_axis(positions, order, 1)
            width = positions.shape[1]
            scores[rows, :width] = np.where(keep, d, -np.inf)
            names = np.where(keep, self._id_array[np.where(keep, positions, 0)], None)
            for r, qi in enumerate(rows):
                out_ids[qi][:width] = names[r].tolist()
        return scores, out_ids

    # ---- persistence

    def save(self, directory: str | Path) -> Path:
        """Write index.faiss + ids.parquet + metadata.json into ``directory`` atomically.

        Files go to a temporary sibling folder, are fsynced, and the folder is renamed into place.
        An existing ``directory`` is renamed aside first and put back if the final rename fails;
        any failure before that leaves it untouched. Returns the directory.
        """
        target = Path(directory).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        old: Path | None = None
        try:
            os.chmod(tmp, 0o755)
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            table = pa.table({"note_id": pa.array(self.note_ids, pa.string()),
                              "category": pa.array(self.categories, pa.string())})
            pq.write_table(table, tmp / IDS_FILE, compression="zstd")
            (tmp / METADATA_FILE).write_text(json.dumps(asdict(self.metadata), indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
            for name in (INDEX_FILE, IDS_FILE, METADATA_FILE):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old)  # old is an empty folder: rename over it
            try:
                os.replace(tmp, target)
            except BaseException:
                if old is not None:
                    os.replace(old, target)
                    old = None
                raise
            fsync_dir(target.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and old.exists():
                shutil.rmtree(old, ignore_errors=True)
        return target

    @classmethod
    def load(cls, directory: str | Path, expect: ModelInfo) -> NoteIndex:
        """Open a saved index for querying by the model ``expect``.

        Raises IndexMismatchError (naming metadata.json and the field) when the stored model name,
        version, run id, dimension or normalisation differ from ``expect``, and IndexFileError when
        files are missing or disagree with each other.
        """
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        for name in (METADATA_FILE, IDS_FILE, INDEX_FILE):
            if not (directory / name).is_file():
                raise IndexFileError(f"{directory / name}: missing (not a saved note index?)")
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
            metadata = IndexMetadata(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise IndexFileError(f"{meta_path}: not valid index metadata ({exc})") from exc
        if metadata.format != METADATA_FORMAT:
            raise IndexFileError(f"{meta_path}: format {metadata.format}, this code reads {METADATA_FORMAT}")
        for stored_field, attr in _MODEL_FIELDS.items():
            stored, wanted = getattr(metadata, stored_field), getattr(expect, attr)
            if stored != wanted:
                raise IndexMismatchError(
                    f"{meta_path}: {stored_field} is {stored!r} but the querying model has {wanted!r}; "
                    "this index was built from a different embedding space — rebuild it with this model"
                )
        table = pq.read_table(directory / IDS_FILE)
        if table.column_names[:2] != ["note_id", "category"]:
            raise IndexFileError(f"{directory / IDS_FILE}: expected columns note_id, category, got {table.column_names}")
        note_ids = table.column("note_id").to_pylist()
        categories = table.column("category").to_pylist()
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.d != metadata.dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFileError(f"{directory / INDEX_FILE}: dimension {index.d} / metric {index.metric_type} "
                                 f"disagree with {meta_path} (dim {metadata.dim}, inner product)")
        if not (index.ntotal == len(note_ids) == metadata.note_count):
            raise IndexFileError(f"{directory}: {index.ntotal} vectors in {INDEX_FILE}, {len(note_ids)} rows in "
                                 f"{IDS_FILE}, note_count {metadata.note_count} in {METADATA_FILE}")
        return cls(index, note_ids, categories, metadata)


def rebuild(directory: str | Path, cfg: IndexConfig, *, out_dir: str | Path | None = None,
            seed: int | None = None) -> NoteIndex:
    """Re-create a saved index from its own vectors: factory re-chosen for the current N,
    re-trained and re-tuned; ids, categories and model identity kept. Saved atomically to
    ``out_dir`` (default: in place). Use after many incremental ``add`` calls.
    """
    directory = Path(directory)
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise IndexFileError(f"{meta_path}: missing (not a saved note index?)")
    stored = json.loads(meta_path.read_text(encoding="utf-8"))
    model = ModelInfo(stored["model_name"], stored["model_version"], stored["run_id"], stored["dim"],
                      stored["normalized"])
    old = NoteIndex.load(directory, model)
    fresh = NoteIndex.build(old.vectors(), old.note_ids, old.categories, cfg, model,
                            seed=old.metadata.seed if seed is None else seed)
    fresh.save(out_dir if out_dir is not None else directory)
    return fresh
