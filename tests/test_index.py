"""The faiss note index (notellm.index) on random clustered data, checked against numpy brute force."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest

from notellm.config import REPO_ROOT, IndexConfig
from notellm.index import (
    IDS_FILE,
    INDEX_FILE,
    METADATA_FILE,
    IndexFileError,
    IndexInputError,
    IndexMismatchError,
    ModelInfo,
    NoteIndex,
    choose_factory,
    default_tuning_queries,
    recall_at_k,
    rebuild,
)

DIM = 32
MODEL = ModelInfo(name="tiny-llama", version="3", run_id="run-abc", dim=DIM)


def clustered(n: int, seed: int, n_clusters: int = 50, dim: int = DIM, spread: float = 0.6) -> np.ndarray:
    """Gaussian-mixture vectors, L2-normalised: float32 [n, dim]."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    x = centers[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def ids_for(n: int, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def brute_force(db: np.ndarray, ids: list[str], queries: np.ndarray, k: int) -> list[list[str]]:
    """Exact top-k note ids by inner product with numpy (float64 scores)."""
    scores = queries.astype(np.float64) @ db.T.astype(np.float64)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < db.shape[0] else np.tile(np.arange(db.shape[0]),
                                                                                           (len(queries), 1))
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
    return [[ids[j] for j in row] for row in order]


def mean_recall(got: list[list[str | None]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got, exact, strict=True)]))


def ivf_cfg(target: float = 0.95) -> IndexConfig:
    return IndexConfig(kind="auto", exact_max_notes=1_000, target_recall_at_100=target)


@pytest.fixture(scope="module")
def ivf_data() -> tuple[np.ndarray, list[str], list[str]]:
    db = clustered(20_000, seed=1)
    cats = [f"c{i % 4}" for i in range(len(db))]
    return db, ids_for(len(db)), cats


@pytest.fixture(scope="module")
def ivf_index(ivf_data) -> NoteIndex:
    db, ids, cats = ivf_data
    return NoteIndex.build(db, ids, cats, ivf_cfg(), MODEL, seed=0)


# --------------------------------------------------------------------------- factory choice

def test_choose_factory_follows_n_and_kind():
    cfg = IndexConfig(kind="auto", exact_max_notes=100_000)
    assert choose_factory(100_000, 128, cfg) == "Flat"
    assert choose_factory(1_000_000, 128, cfg) == "IVF4000,Flat"  # 4 sqrt(N)
    assert choose_factory(100_001, 128, cfg).startswith("IVF")
    assert choose_factory(50, 128, IndexConfig(kind="flat")) == "Flat"
    assert choose_factory(50, 128, IndexConfig(kind="hnsw")) == "HNSW32,Flat"
    # tiny pools: nlist capped so k-means has enough points per list
    assert choose_factory(400, 128, IndexConfig(kind="ivf")) == "IVF10,Flat"
    assert choose_factory(10, 128, IndexConfig(kind="ivf")) == "IVF1,Flat"


# --------------------------------------------------------------------------- exact search

def test_flat_search_equals_numpy_brute_force():
    db, queries = clustered(3_000, seed=2), clustered(40, seed=3)
    ids = ids_for(len(db))
    index = NoteIndex.build(db, ids, None, IndexConfig(), MODEL)
    assert index.metadata.factory == "Flat" and index.metadata.recall_at_100 == 1.0
    scores, got = index.search(queries, 20)
    assert got == brute_force(db, ids, queries, 20)
    np.testing.assert_allclose(scores, np.sort(queries @ db.T, axis=1)[:, ::-1][:, :20], atol=1e-5)
    assert scores.dtype == np.float32 and scores.shape == (40, 20)


def test_within_category_equals_brute_force_within_the_category():
    db, queries = clustered(2_000, seed=4), clustered(30, seed=5)
    ids = ids_for(len(db))
    cats = [["a", "b", "c"][i % 3] for i in range(len(db))]
    index = NoteIndex.build(db, ids, cats, IndexConfig(), MODEL)
    query_cats = [["a", "b", "c"][i % 3] for i in range(len(queries))]  # mixed per query
    _, got = index.search(queries, 15, categories=query_cats)
    for qi, cat in enumerate(query_cats):
        members = [i for i, c in enumerate(cats) if c == cat]
        expected = brute_force(db[members], [ids[i] for i in members], queries[qi:qi + 1], 15)[0]
        assert got[qi] == expected
    # a single category for all queries
    _, only_b = index.search(queries, 15, categories="b")
    assert all(cats[int(nid[1:])] == "b" for row in only_b for nid in row)


def test_exclude_self_removes_the_query_note_only():
    db = clustered(1_000, seed=6)
    ids = ids_for(len(db))
    index = NoteIndex.build(db, ids, None, IndexConfig(), MODEL)
    queries = db[:10]
    _, with_self = index.search(queries, 5)
    assert [row[0] for row in with_self] == ids[:10]
    _, without = index.search(queries, 5, exclude_ids=ids[:10])
    for qi in range(10):
        assert ids[qi] not in without[qi]
        assert without[qi] == brute_force(np.delete(db, qi, 0), ids[:qi] + ids[qi + 1:], queries[qi:qi + 1], 5)[0]


def test_missing_slots_are_padded_with_none_and_minus_inf():
    db = clustered(10, seed=7)
    ids = ids_for(10)
    cats = ["a"] * 3 + ["b"] * 7
    index = NoteIndex.build(db, ids, cats, IndexConfig(), MODEL)
    scores, got = index.search(db[:1], 5, categories="a", exclude_ids=[ids[0]])
    assert got[0][:2] and set(got[0][:2]) == {"n1", "n2"} and got[0][2:] == [None, None, None]
    assert np.isfinite(scores[0, :2]).all() and np.isneginf(scores[0, 2:]).all()
    with pytest.raises(IndexInputError, match="category 'zzz'"):
        index.search(db[:1], 5, categories="zzz")


# --------------------------------------------------------------------------- approximate, tuned

def test_ivf_tuned_recall_reaches_target_vs_exact(ivf_index, ivf_data):
    db, ids, _ = ivf_data
    m = ivf_index.metadata
    nlist = int(m.factory[3:].split(",")[0])
    assert m.factory.startswith("IVF") and 1 < m.nprobe < nlist  # tuned, not exhaustive
    assert m.recall_at_100 >= 0.95 and m.recall_queries == 1_000
    # The stored recall is reproducible: same tuning queries, same search, same number.
    tune_q = default_tuning_queries(db, 1_000, m.seed + 1)
    exact = brute_force(db, ids, tune_q, 100)
    assert mean_recall(ivf_index.search(tune_q, 100)[1], exact) == pytest.approx(m.recall_at_100, abs=1e-3)
    # The tuning picked the smallest nprobe: one less misses the target.
    lower = NoteIndex(ivf_index.index, ids, list(ivf_index.categories), replace(m, nprobe=m.nprobe - 1))
    assert mean_recall(lower.search(tune_q, 100)[1], exact) < 0.95
    # Held-out queries (new noise, other rows) also reach about the target.
    held_out = default_tuning_queries(db, 300, seed=99)
    assert mean_recall(ivf_index.search(held_out, 100)[1], brute_force(db, ids, held_out, 100)) >= 0.93


def test_hnsw_tuned_recall_reaches_target_vs_exact():
    db = clustered(5_000, seed=8, dim=64, spread=2.0)
    ids = ids_for(len(db))
    model = ModelInfo("m", None, None, 64)
    index = NoteIndex.build(db, ids, None, IndexConfig(kind="hnsw", target_recall_at_100=0.995), model)
    m = index.metadata
    assert m.factory == "HNSW32,Flat" and m.ef_search > 100 and m.recall_at_100 >= 0.995
    tune_q = default_tuning_queries(db, 1_000, m.seed + 1)
    exact = brute_force(db, ids, tune_q, 100)
    assert mean_recall(index.search(tune_q, 100)[1], exact) == pytest.approx(m.recall_at_100, abs=1e-3)
    lower = NoteIndex(index.index, ids, list(index.categories), replace(m, ef_search=m.ef_search - 1))
    assert mean_recall(lower.search(tune_q, 100)[1], exact) < 0.995
    held_out = default_tuning_queries(db, 300, seed=42)
    assert mean_recall(index.search(held_out, 100)[1], brute_force(db, ids, held_out, 100)) >= 0.985


def test_ivf_category_restriction_only_returns_that_category(ivf_index, ivf_data):
    db, ids, cats = ivf_data
    queries = db[:20]
    _, got = ivf_index.search(queries, 50, categories=[cats[i] for i in range(20)], exclude_ids=ids[:20])
    for qi in range(20):
        assert all(nid is not None and cats[int(nid[1:])] == cats[qi] for nid in got[qi])
        assert ids[qi] not in got[qi]


def test_recall_at_k_counts_overlap_and_ignores_missing():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = np.array([[3, 2, 9, -1], [4, 5, 6, 7]])
    assert recall_at_k(approx, exact) == pytest.approx((2 + 4) / 8)


# --------------------------------------------------------------------------- add (cold start)

def test_flat_add_equals_a_fresh_build_and_refuses_duplicates():
    db, queries = clustered(1_500, seed=9), clustered(20, seed=10)
    ids = ids_for(1_500)
    cats = ["x" if i % 2 else "y" for i in range(1_500)]
    grown = NoteIndex.build(db[:1_000], ids[:1_000], cats[:1_000], IndexConfig(), MODEL)
    grown.add(db[1_000:], ids[1_000:], cats[1_000:])
    fresh = NoteIndex.build(db, ids, cats, IndexConfig(), MODEL)
    assert len(grown) == 1_500 and grown.metadata.note_count == 1_500 and grown.metadata.notes_at_build == 1_000
    assert grown.search(queries, 30)[1] == fresh.search(queries, 30)[1]
    assert grown.search(queries, 30, categories="x")[1] == fresh.search(queries, 30, categories="x")[1]
    for existing in ("n5", "n1499"):  # from build, from add
        with pytest.raises(IndexInputError, match=f"'{existing}' is already in the index"):
            grown.add(db[:1], [existing], ["x"])
    assert len(grown) == 1_500 and grown.index.ntotal == 1_500  # nothing half-added


def test_ivf_add_finds_new_notes_without_retraining(ivf_data):
    db, ids, cats = ivf_data
    index = NoteIndex.build(db[:15_000], ids[:15_000], cats[:15_000], ivf_cfg(), MODEL)
    centroids_before = index.index.quantizer.reconstruct_n(0, index.index.nlist)
    index.add(db[15_000:], ids[15_000:], cats[15_000:])
    np.testing.assert_array_equal(index.index.quantizer.reconstruct_n(0, index.index.nlist), centroids_before)
    _, got = index.search(db[15_000:15_200], 1)
    assert sum(row[0] == nid for row, nid in zip(got, ids[15_000:15_200], strict=True)) >= 195


# --------------------------------------------------------------------------- persistence

def test_save_load_round_trip_gives_identical_results(ivf_index, tmp_path):
    queries = clustered(50, seed=11)
    saved = ivf_index.save(tmp_path / "idx")
    assert sorted(p.name for p in saved.iterdir()) == sorted([INDEX_FILE, IDS_FILE, METADATA_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp folders left
    meta = json.loads((saved / METADATA_FILE).read_text())
    assert meta["model_name"] == "tiny-llama" and meta["model_version"] == "3" and meta["run_id"] == "run-abc"
    assert meta["dim"] == DIM and meta["normalized"] is True and meta["metric"] == "inner_product"
    assert meta["note_count"] == 20_000 and meta["recall_at_100"] >= 0.95 and meta["nprobe"] >= 1
    loaded = NoteIndex.load(saved, MODEL)
    s1, i1 = ivf_index.search(queries, 100, categories="c1")
    s2, i2 = loaded.search(queries, 100, categories="c1")
    assert i1 == i2
    np.testing.assert_array_equal(s1, s2)
    assert loaded.metadata == ivf_index.metadata


@pytest.mark.parametrize(("field", "value"), [("version", "4"), ("run_id", "run-other"), ("name", "smollm2-135m"),
                                             ("dim", 64), ("version", None)])
def test_load_refuses_a_different_model(tmp_path, field, value):
    db = clustered(200, seed=12)
    NoteIndex.build(db, ids_for(200), None, IndexConfig(), MODEL).save(tmp_path / "idx")
    other = ModelInfo(**{**MODEL.__dict__, field: value})
    stored_field = {"version": "model_version", "name": "model_name"}.get(field, field)
    with pytest.raises(IndexMismatchError, match=rf"metadata\.json: {stored_field} is"):
        NoteIndex.load(tmp_path / "idx", other)
    assert NoteIndex.load(tmp_path / "idx", MODEL).metadata.note_count == 200


def test_load_refuses_inconsistent_files(tmp_path):
    db = clustered(200, seed=13)
    index = NoteIndex.build(db, ids_for(200), None, IndexConfig(), MODEL)
    index.save(tmp_path / "a")
    NoteIndex.build(db[:100], ids_for(100), None, IndexConfig(), MODEL).save(tmp_path / "b")
    (tmp_path / "a" / IDS_FILE).write_bytes((tmp_path / "b" / IDS_FILE).read_bytes())
    with pytest.raises(IndexFileError, match="200 vectors in index.faiss, 100 rows in ids.parquet"):
        NoteIndex.load(tmp_path / "a", MODEL)
    (tmp_path / "b" / INDEX_FILE).unlink()
    with pytest.raises(IndexFileError, match="index.faiss: missing"):
        NoteIndex.load(tmp_path / "b", MODEL)


def test_failed_save_leaves_the_old_index_intact(tmp_path):
    """A real write failure: the saving process may not write files over 64 KiB (RLIMIT_FSIZE)."""
    db = clustered(2_000, seed=14)
    target = tmp_path / "idx"
    NoteIndex.build(db[:100], ids_for(100), None, IndexConfig(), MODEL).save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    np.save(tmp_path / "db.npy", db, allow_pickle=False)
    code = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from notellm.config import IndexConfig
        from notellm.index import ModelInfo, NoteIndex
        db = np.load({str(tmp_path / "db.npy")!r}, allow_pickle=False)
        index = NoteIndex.build(db, [f"m{{i}}" for i in range(len(db))], None, IndexConfig(),
                                ModelInfo("tiny-llama", "3", "run-abc", {DIM}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        index.save({str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": f"{REPO_ROOT / 'platform'}:{REPO_ROOT}", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr  # 256 KB index.faiss
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder removed
    assert NoteIndex.load(target, MODEL).note_ids == ids_for(100)


def test_save_replaces_an_existing_index(tmp_path):
    db = clustered(300, seed=15)
    NoteIndex.build(db[:100], ids_for(100), None, IndexConfig(), MODEL).save(tmp_path / "idx")
    NoteIndex.build(db, ids_for(300), None, IndexConfig(), MODEL).save(tmp_path / "idx")
    assert len(NoteIndex.load(tmp_path / "idx", MODEL)) == 300
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


# --------------------------------------------------------------------------- rebuild

def test_rebuild_after_adds_equals_a_fresh_build(ivf_data, tmp_path):
    db, ids, cats = ivf_data
    queries = clustered(50, seed=16)
    grown = NoteIndex.build(db[:12_000], ids[:12_000], cats[:12_000], ivf_cfg(), MODEL, seed=3)
    grown.add(db[12_000:], ids[12_000:], cats[12_000:])
    grown.save(tmp_path / "idx")
    rebuilt = rebuild(tmp_path / "idx", ivf_cfg())
    fresh = NoteIndex.build(db, ids, cats, ivf_cfg(), MODEL, seed=3)
    assert rebuilt.metadata.factory == fresh.metadata.factory != grown.metadata.factory  # nlist follows N
    assert rebuilt.metadata.nprobe == fresh.metadata.nprobe
    assert rebuilt.metadata.notes_at_build == 20_000
    reloaded = NoteIndex.load(tmp_path / "idx", MODEL)
    for idx in (rebuilt, reloaded):
        s, got = idx.search(queries, 100)
        s_fresh, want = fresh.search(queries, 100)
        assert got == want
        np.testing.assert_array_equal(s, s_fresh)


def test_rebuild_switches_flat_to_ivf_when_the_pool_grows(tmp_path):
    db = clustered(3_000, seed=17)
    ids = ids_for(3_000)
    cfg = IndexConfig(kind="auto", exact_max_notes=2_000)
    index = NoteIndex.build(db[:1_500], ids[:1_500], None, cfg, MODEL)
    index.add(db[1_500:], ids[1_500:])
    index.save(tmp_path / "idx")
    assert index.metadata.factory == "Flat"
    rebuilt = rebuild(tmp_path / "idx", cfg, out_dir=tmp_path / "new")
    assert rebuilt.metadata.factory.startswith("IVF") and rebuilt.metadata.recall_at_100 >= 0.95
    np.testing.assert_array_equal(rebuilt.vectors(), db)
    assert NoteIndex.load(tmp_path / "new", MODEL).note_ids == ids


def test_model_info_from_encoder_info_keeps_methods_apart():
    from notellm.encoders import EncoderInfo

    mean = ModelInfo.from_encoder(EncoderInfo("llm-mean", "smollm2-135m", 576, "sha256:abc", None))
    eol = ModelInfo.from_encoder(EncoderInfo("prompteol", "smollm2-135m", 576, "sha256:abc", None).as_dict())
    assert mean == ModelInfo("llm-mean/smollm2-135m", "sha256:abc", None, 576, True)
    assert eol.name == "prompteol/smollm2-135m" and eol != mean
    with pytest.raises(IndexInputError, match="lacks field 'method'"):
        ModelInfo.from_encoder({"model_name": "x", "dim": 3, "version": "v"})


# --------------------------------------------------------------------------- input validation

def test_bad_inputs_are_refused_with_clear_messages():
    db = clustered(100, seed=18)
    ids = ids_for(100)
    cfg = IndexConfig()
    with pytest.raises(IndexInputError, match="row 3 has L2 norm .* must be L2-normalised"):
        bad = db.copy()
        bad[3] *= 2
        NoteIndex.build(bad, ids, None, cfg, MODEL)
    with pytest.raises(IndexInputError, match="row 5 has NaN"):
        bad = db.copy()
        bad[5, 0] = np.nan
        NoteIndex.build(bad, ids, None, cfg, MODEL)
    with pytest.raises(IndexInputError, match="dimension 32 != index dimension 64"):
        NoteIndex.build(db, ids, None, cfg, ModelInfo("m", None, None, 64))
    with pytest.raises(IndexInputError, match="empty"):
        NoteIndex.build(db[:0], [], None, cfg, MODEL)
    with pytest.raises(IndexInputError, match="duplicate note id 'n1'"):
        NoteIndex.build(db[:3], ["n0", "n1", "n1"], None, cfg, MODEL)
    with pytest.raises(IndexInputError, match="99 note ids for 100 vectors"):
        NoteIndex.build(db, ids[:99], None, cfg, MODEL)
    with pytest.raises(IndexInputError, match="3 categories for 100 vectors"):
        NoteIndex.build(db, ids, ["a", "b", "c"], cfg, MODEL)
    with pytest.raises(IndexInputError, match="factory 'IVF4,PQ8' is not supported"):
        NoteIndex.build(db, ids, None, cfg, MODEL, factory="IVF4,PQ8")
    index = NoteIndex.build(db, ids, None, cfg, MODEL)
    with pytest.raises(IndexInputError, match="search queries: row 0 has L2 norm"):
        index.search(db[:2] * 3, 5)
    with pytest.raises(IndexInputError, match="search queries: dimension 16"):
        index.search(clustered(2, seed=0, dim=16), 5)
    with pytest.raises(IndexInputError, match="2 exclude_ids for 1 queries"):
        index.search(db[:1], 5, exclude_ids=["n0", "n1"])
    with pytest.raises(IndexInputError, match="has no notes"):  # built without categories
        index.search(db[:1], 5, categories="a")
