"""Note Compression Prompts (method.md section 2) with the real SmolLM2 tokenizer, and the Ray Data
prompts stage on a real Ray cluster.

The template literals below are copied from method.md, independently of ``notellm.prompts``."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from notellm.config import REPO_ROOT, PromptConfig, load_config
from notellm.data.io import write_table
from notellm.models import load_tokenizer
from notellm.prompts import (
    CATEGORY,
    HASHTAG,
    IGNORE_INDEX,
    PromptBuilder,
    PromptError,
    add_emb_token,
    parse_output,
    plan_task,
    quote_escape,
)

GOLDEN = REPO_ROOT / "tests" / "golden"
NOTES_PATH = REPO_ROOT / "data" / "stackexchange" / "notes.parquet"

# --- method.md section 2, word for word ---------------------------------------------------------
BOS, EOS, EMB = "<|im_start|>", "<|im_end|>", "[EMB]"
INSTR_CAT = ("Extract the note information in json format, compress it into one word for recommendation, "
             "and generate the category of the note.")
INSTR_TAG = ("Extract the note information in json format, compress it into one word for recommendation, "
             "and generate {j} topics of the note.")
COMPRESS = ' The compression word is:"[EMB]". '
CAT_RE = re.compile(
    "^" + re.escape(BOS + INSTR_CAT + " ") + r"(\{'title': .*, 'topic': .*, 'content': .*\})"
    + re.escape(COMPRESS + "The category is: ") + r"(.+)" + re.escape(EOS) + "$"
)
TAG_RE = re.compile(
    "^" + re.escape(BOS) + re.escape(INSTR_TAG).replace(r"\{j\}", r"(\d+)") + " "
    + r"(\{'title': .*, 'content': .*\})" + re.escape(COMPRESS) + r"The (\d+) topics are: (.+)"
    + re.escape(EOS) + "$"
)
EMBED_RE = re.compile(
    "^" + re.escape(BOS + INSTR_CAT + " ") + r"(\{'title': .*, 'topic': .*, 'content': .*\})"
    + re.escape(' The compression word is:"[EMB]') + "$"
)

# Two fixed notes for the golden prompts (not read from the dataset, so the goldens never move).
GOLDEN_NOTES = [
    {
        "note_id": "golden:1",
        "title": 'What is "backprop"?',
        "content": (
            "What does \"backprop\" mean? I've Googled it, but it's showing backpropagation.\n\n"
            "Is the \"backprop\" term basically the same as \"backpropagation\" or does it have a "
            "different meaning? In my notes (C:\\ml\\notes.txt) I wrote:\n\tbackprop = chain rule + "
            "gradient descent\nbut my teacher said that's only half of the story, and that the word "
            "is also used for the whole training loop in some textbooks."
        ),
        "hashtags": ["neural-networks", "definitions", "terminology", "backpropagation"],
        "category": "ai",
    },
    {
        "note_id": "golden:2",
        "title": "咖啡 ☕ which grind for a moka pot? 🤔",
        "content": "Medium-fine, a bit coarser than espresso.\r\nשלום — it's my first pot 😀",
        "hashtags": ["grinding", "moka-pot"],
        "category": "coffee",
    },
]
GOLDEN_FILES = {"category": "prompt_category.txt", "hashtag": "prompt_hashtag.txt", "embed": "prompt_embed.txt"}


def golden_prompts(builder: PromptBuilder) -> dict[str, list[str]]:
    """The rendered text of each golden note: category and hashtag training prompts and the embed one."""
    return {
        "category": [builder.render(n, "train", CATEGORY).text for n in GOLDEN_NOTES],
        "hashtag": [builder.render(n, "train", HASHTAG).text for n in GOLDEN_NOTES],
        "embed": [builder.render(n, "embed").text for n in GOLDEN_NOTES],
    }


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(load_tokenizer("smollm2-135m", fresh=True), PromptConfig())


@pytest.fixture(scope="module")
def dataset_notes() -> list[dict]:
    return pq.read_table(NOTES_PATH).select(["note_id", "title", "content", "hashtags", "category"]).to_pylist()


def _tokens(builder: PromptBuilder, text: str) -> list[int]:
    return builder.tokenizer(text, add_special_tokens=False)["input_ids"]


def _norm(text: str | None) -> str:
    return " ".join((text or "").split())


# --- golden prompts ----------------------------------------------------------------------------


def test_golden_prompts_equal_the_checked_in_text(builder):
    rendered = golden_prompts(builder)
    for kind, name in GOLDEN_FILES.items():
        expected = (GOLDEN / name).read_text(encoding="utf-8").splitlines()
        assert rendered[kind] == expected, f"{name} differs from the rendered prompts"


def test_golden_text_follows_the_method_template():
    cat = (GOLDEN / GOLDEN_FILES["category"]).read_text(encoding="utf-8").splitlines()
    tag = (GOLDEN / GOLDEN_FILES["hashtag"]).read_text(encoding="utf-8").splitlines()
    emb = (GOLDEN / GOLDEN_FILES["embed"]).read_text(encoding="utf-8").splitlines()
    assert len(cat) == len(tag) == len(emb) == len(GOLDEN_NOTES)
    for note, c, t, e in zip(GOLDEN_NOTES, cat, tag, emb):
        m = CAT_RE.match(c)
        assert m, c
        fields = ast.literal_eval(m.group(1))
        assert list(fields) == ["title", "topic", "content"]
        assert fields["title"] == _norm(note["title"]) and fields["topic"] == ", ".join(note["hashtags"])
        assert _norm(note["content"]).startswith(fields["content"])
        assert m.group(2) == note["category"]
        m = TAG_RE.match(t)
        assert m, t
        j = min(len(note["hashtags"]), 3)
        assert m.group(1) == m.group(3) == str(j)
        assert list(ast.literal_eval(m.group(2))) == ["title", "content"]
        sampled = m.group(4).split(", ")
        assert len(sampled) == j and set(sampled) <= set(note["hashtags"])
        assert EMBED_RE.match(e) and c.startswith(e)
    # golden:1's content is long: cut to the budget, never the template
    assert "\n" not in "".join(cat) and "training loop" not in cat[0]


def test_module_docstring_examples_are_the_golden_prompts():
    import notellm.prompts

    blocks = re.findall(r"::\n\n((?:    .*\n)+)", notellm.prompts.__doc__)
    examples = [" ".join(line.strip() for line in block.splitlines()) for block in blocks[1:]]
    golden = [(GOLDEN / GOLDEN_FILES[k]).read_text(encoding="utf-8").splitlines()[1]
              for k in ("category", "hashtag", "embed")]
    assert examples == golden


def test_pooled_position_is_the_token_before_emb(builder):
    for note in GOLDEN_NOTES:
        train = builder.encode(note, "train", CATEGORY)
        embed = builder.encode(note, "embed")
        assert builder.tokenizer.decode([train.input_ids[train.emb_pos]]) == ':"'
        assert train.input_ids[train.emb_token_pos] == builder.emb_token_id == train.input_ids[train.emb_pos + 1]
        assert embed.emb_token_pos == len(embed.input_ids) - 1 and embed.emb_pos == len(embed.input_ids) - 2
        # serving embeds exactly the tokens training pooled
        assert embed.input_ids == train.input_ids[: train.emb_token_pos + 1]


def test_add_emb_token_is_idempotent():
    tok = load_tokenizer("smollm2-135m", fresh=True)
    size = len(tok)
    first = add_emb_token(tok, "[EMB]")
    assert len(tok) == size + 1 and first == size
    assert add_emb_token(tok, "[EMB]") == first and len(tok) == size + 1
    assert tok("a [EMB]b", add_special_tokens=False)["input_ids"].count(first) == 1
    assert EMB not in load_tokenizer("smollm2-135m").get_vocab()  # the shared tokenizer is untouched


# --- every note of the default dataset ---------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(builder, dataset_notes):
    return builder.encode_many(dataset_notes, "train")


def _expected_output(note: dict, task: str, j: int, output_text: str) -> str:
    if task == CATEGORY:
        return note["category"]
    tags = output_text.split(", ")
    assert j == len(tags) == min(len(note["hashtags"]), 3)
    positions = [note["hashtags"].index(t) for t in tags]  # a subset, in the note's order
    assert positions == sorted(set(positions))
    return ", ".join(tags)


def test_every_dataset_prompt_is_well_formed(builder, dataset_notes, encoded):
    tok = builder.tokenizer
    assert len(encoded) == len(dataset_notes)
    for note, enc in zip(dataset_notes, encoded):
        ids, labels, p = enc.input_ids, enc.labels, enc.prompt
        assert p.note_id == note["note_id"]
        assert ids == _tokens(builder, p.text), note["note_id"]  # the text reproduces the ids
        assert ids[0] == builder.bos_token_id and ids[-1] == builder.eos_token_id
        assert ids[enc.emb_pos + 1] == builder.emb_token_id and ids.count(builder.emb_token_id) == 1
        # labels: -100 up to the Output, then the Output tokens and the EOS
        out_start = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert all(lab == IGNORE_INDEX for lab in labels[:out_start]) and labels[out_start:] == ids[out_start:]
        assert out_start > enc.emb_token_pos + 1
        expected = _expected_output(note, p.task, p.j, p.output)
        assert tok.decode(labels[out_start:]) == f" {expected}{EOS}"
        guidance = "The category is:" if p.task == CATEGORY else f"The {p.j} topics are:"
        assert tok.decode(ids[:out_start]).endswith(f'{EMB}". {guidance}')
        # the template is intact and the fields are prefixes of the note's fields
        m = (CAT_RE if p.task == CATEGORY else TAG_RE).match(p.text)
        assert m, p.text
        fields = ast.literal_eval(m.group(1 if p.task == CATEGORY else 2))
        assert _norm(note["title"]).startswith(fields["title"])
        assert _norm(note["content"]).startswith(fields["content"])
        assert p.title_truncated == (fields["title"] != _norm(note["title"]))
        assert p.content_truncated == (fields["content"] != _norm(note["content"]))
        assert len(_tokens(builder, quote_escape(fields["title"]))) <= builder.cfg.title_max_tokens
        assert len(_tokens(builder, quote_escape(fields["content"]))) <= builder.cfg.content_max_tokens


def test_prompt_length_is_bounded_by_template_plus_budgets(builder, dataset_notes, encoded):
    cfg = builder.cfg
    empty = builder.encode_many([dict(n, title="", content="") for n in dataset_notes], "train")
    for note, enc, bare in zip(dataset_notes, encoded, empty):
        # a field may cost one token more in context than alone at each of its two ends
        assert len(enc.input_ids) <= len(bare.input_ids) + cfg.title_max_tokens + cfg.content_max_tokens + 4
    assert sum(e.prompt.content_truncated for e in encoded) > len(encoded) / 2  # budgets bite here


def test_embed_prompt_is_the_category_prompt_cut_after_emb(builder, dataset_notes):
    cat = builder.encode_many(dataset_notes, "train", CATEGORY)
    emb = builder.encode_many(dataset_notes, "embed")
    for c, e in zip(cat, emb):
        assert e.prompt.task == CATEGORY and e.labels is None and EMBED_RE.match(e.prompt.text)
        assert e.input_ids == c.input_ids[: c.emb_token_pos + 1]
        assert e.emb_pos == c.emb_pos


def test_hashtag_task_share_matches_r(builder, dataset_notes, encoded):
    r = builder.cfg.hashtag_task_ratio
    with_tags = sum(1 for n in dataset_notes if n["hashtags"])
    share = sum(e.prompt.task == HASHTAG for e in encoded) / with_tags
    sigma = math.sqrt(r * (1 - r) / with_tags)  # binomial standard deviation of the share
    assert abs(share - r) < 4 * sigma, (share, r, sigma)
    other_seed = [plan_task(n["note_id"], n["hashtags"], PromptConfig(seed=1)).task for n in dataset_notes]
    assert other_seed != [e.prompt.task for e in encoded]  # the seed matters
    for ratio, expected in ((0.0, 0), (1.0, with_tags)):
        cfg = PromptConfig(hashtag_task_ratio=ratio)
        assert sum(plan_task(n["note_id"], n["hashtags"], cfg).task == HASHTAG for n in dataset_notes) == expected


def test_generation_prompt_and_output_parsing(builder):
    note = GOLDEN_NOTES[0]
    train = builder.encode(note, "train", HASHTAG)
    gen = builder.encode(note, "generate", HASHTAG)
    assert gen.labels is None and gen.prompt.text.endswith(f"The {train.prompt.j} topics are:")
    assert gen.input_ids == [i for i, lab in zip(train.input_ids, train.labels) if lab == IGNORE_INDEX]
    assert parse_output(train.prompt.output, HASHTAG) == train.prompt.output.split(", ")
    assert parse_output("  ai \n", CATEGORY) == "ai"
    assert parse_output(" a,  b c ,,", HASHTAG) == ["a", "b c"]


# --- determinism --------------------------------------------------------------------------------


def test_same_input_gives_same_tokens_and_tasks(builder, dataset_notes, encoded):
    again = PromptBuilder(load_tokenizer("smollm2-135m", fresh=True), PromptConfig())
    sample = dataset_notes[::25]
    for a, b in zip(again.encode_many(sample, "train"), encoded[::25]):
        assert a == b
    # other processes with other hash seeds draw the same tasks and hashtags
    code = (
        "import json, sys; import pyarrow.parquet as pq; from notellm.config import PromptConfig; "
        "from notellm.prompts import plan_task; "
        f"rows = pq.read_table({str(NOTES_PATH)!r}).to_pylist()[::25]; "
        "print(json.dumps([[p.task, list(p.sampled)] for p in "
        "(plan_task(r['note_id'], r['hashtags'], PromptConfig()) for r in rows)]))"
    )
    expected = [[e.prompt.task, list(plan_task(e.prompt.note_id, n["hashtags"], PromptConfig()).sampled)]
                for n, e in zip(sample, encoded[::25])]
    for hash_seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=hash_seed), check=True)
        assert json.loads(proc.stdout) == expected


# --- edge cases ---------------------------------------------------------------------------------


def _note(**fields) -> dict:
    base = {"note_id": "edge:1", "title": "A title", "content": "Some content.", "hashtags": ["tag-a"],
            "category": "misc"}
    return base | fields


def _fields_of(prompt_text: str) -> dict:
    m = CAT_RE.match(prompt_text) or EMBED_RE.match(prompt_text)
    assert m, prompt_text
    return ast.literal_eval(m.group(1))


def test_unicode_fields_are_kept_whole(builder):
    short = "咖啡 ☕ שלום 😀"
    enc = builder.encode(_note(title=short, content="مرحبا 👩‍💻 עולם"), "train", CATEGORY)
    assert _fields_of(enc.prompt.text) == {"title": short, "topic": "tag-a", "content": "مرحبا 👩‍💻 עולם"}
    assert not enc.prompt.title_truncated and enc.input_ids == _tokens(builder, enc.prompt.text)
    # cut inside multi-token characters: whole characters only, within budget
    long_title = "שלום עולם مرحبا بالعالم 😀👩‍💻 咖啡咖啡咖啡 " * 5
    enc = builder.encode(_note(title=long_title, content="🤔" * 500 + " 中文" * 300), "train", CATEGORY)
    fields = _fields_of(enc.prompt.text)
    assert enc.prompt.title_truncated and enc.prompt.content_truncated and "\ufffd" not in enc.prompt.text
    assert _norm(long_title).startswith(fields["title"]) and fields["content"] and set(fields["content"]) == {"🤔"}
    assert len(_tokens(builder, fields["title"])) <= builder.cfg.title_max_tokens
    assert len(_tokens(builder, fields["content"])) <= builder.cfg.content_max_tokens
    assert enc.input_ids == _tokens(builder, enc.prompt.text)


def test_empty_and_missing_title_or_content(builder):
    for title, content in (("", "Only content"), ("Only title", ""), (None, "x"), ("x", None)):
        enc = builder.encode(_note(title=title, content=content), "train", CATEGORY)
        fields = _fields_of(enc.prompt.text)
        assert fields["title"] == (title or "") and fields["content"] == (content or "")
        assert enc.input_ids[enc.emb_pos + 1] == builder.emb_token_id


def test_notes_without_hashtags_get_the_category_task(builder):
    always = PromptBuilder(load_tokenizer("smollm2-135m", fresh=True), PromptConfig(hashtag_task_ratio=1.0))
    for tags in ([], None, ["", "  "]):
        enc = always.encode(_note(hashtags=tags), "train")
        assert enc.prompt.task == CATEGORY and "'topic': ''" in enc.prompt.text
        with pytest.raises(PromptError, match="hashtag task needs at least one hashtag"):
            always.encode(_note(hashtags=tags), "train", HASHTAG)
    assert always.encode(_note(), "train").prompt.task == HASHTAG


def test_very_long_bodies_are_truncated(builder):
    for content in ("word " * 40_000, "a" * 200_000, "\\'" * 100_000):
        enc = builder.encode(_note(content=content), "train", CATEGORY)
        fields = _fields_of(enc.prompt.text)
        assert enc.prompt.content_truncated and _norm(content).startswith(fields["content"])
        assert 0 < len(_tokens(builder, quote_escape(fields["content"]))) <= builder.cfg.content_max_tokens
        assert len(enc.input_ids) < 250


def test_quotes_backslashes_and_newlines_inside_fields(builder):
    title = "It's a \"quote\" \\ test', 'topic': 'fake"
    content = "line one\nline two\r\n\tindented 'single' and \"double\" \\n not a newline\\"
    enc = builder.encode(_note(title=title, content=content), "train", CATEGORY)
    fields = _fields_of(enc.prompt.text)
    assert fields == {"title": _norm(title), "topic": "tag-a", "content": _norm(content)}
    assert "\n" not in enc.prompt.text and "\r" not in enc.prompt.text and "\t" not in enc.prompt.text
    # a cut can land inside an escape pair: the literal must still parse
    for body in ("'" * 400, "\\" * 400, "x\\" * 200):
        fields = _fields_of(builder.render(_note(content=body), "embed").text)
        assert fields["content"] and body.startswith(fields["content"])


def test_special_token_strings_in_fields_are_removed(builder):
    note = _note(title="Hi <|im_end|> there [EMB]", content="<|im_start|>x [E[EMB]MB] <filename>y",
                 hashtags=["<|im_end|>", "ok"], category="misc<|endoftext|>")
    enc = builder.encode(note, "train", CATEGORY)
    assert enc.prompt.text.count(EMB) == 1 and enc.prompt.text.count(EOS) == 1
    assert enc.prompt.text.count(BOS) == 1
    fields = _fields_of(enc.prompt.text)
    assert fields == {"title": "Hi there", "topic": "ok", "content": "x y"}
    assert enc.prompt.output == "misc" and enc.input_ids == _tokens(builder, enc.prompt.text)


# --- the Ray Data stage -------------------------------------------------------------------------


def _write_stage_inputs(work, train_share: float = 0.75) -> tuple[pa.Table, pa.Table]:
    """Ingested notes = the default dataset; pairs = every third consecutive same-category pair of
    the earlier (train) and later (test) notes. Returns (train pairs, test pairs)."""
    notes = pq.read_table(NOTES_PATH)
    write_table(work / "ingested" / "notes.parquet", notes, "notes")
    ordered = notes.sort_by("created_at").to_pylist()
    cut = int(len(ordered) * train_share)

    def pairs(rows):
        by_cat: dict[str, list[str]] = {}
        for r in rows:
            by_cat.setdefault(r["category"], []).append(r["note_id"])
        out = [(a, b) for ids in by_cat.values() for a, b in zip(ids[:-1:3], ids[1::3])]
        return pa.table({"note_id": [a for a, _ in out], "related_note_id": [b for _, b in out],
                         "score": pa.array([0.5] * len(out), pa.float64()),
                         "n_users": pa.array([2] * len(out), pa.int64())})

    (work / "pairs").mkdir(parents=True, exist_ok=True)
    train, test = pairs(ordered[:cut]), pairs(ordered[cut:])
    pq.write_table(train, work / "pairs" / "train.parquet")
    pq.write_table(test, work / "pairs" / "test.parquet")
    return train, test


def _stage_cli(work, *extra):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.build_prompts", "--config", str(REPO_ROOT / "configs/demo.yaml"),
         f"data.work_dir={work}", *extra], cwd=REPO_ROOT, capture_output=True, text=True,
    )


def test_missing_inputs_name_the_stage_to_run(tmp_path):
    proc = _stage_cli(tmp_path)
    assert proc.returncode == 2 and "ingested/notes.parquet" in proc.stderr
    assert "python -m pipelines.ingest" in proc.stderr
    _write_stage_inputs(tmp_path)
    (tmp_path / "pairs" / "test.parquet").unlink()
    proc = _stage_cli(tmp_path)
    assert proc.returncode == 2 and "pairs/test.parquet" in proc.stderr and "python -m pipelines.mine_pairs" in proc.stderr
    assert not (tmp_path / "prompts").exists()


@pytest.fixture(scope="module")
def built(submit_stage, tmp_path_factory):
    """One run of the stage as a Ray job on the session's cluster, logging to its MLflow."""
    work = tmp_path_factory.mktemp("prompts_stage")
    train_pairs, _ = _write_stage_inputs(work)
    proc = submit_stage("pipelines.build_prompts", work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, train_pairs, proc


@pytest.fixture(scope="module")
def demo_builder(builder) -> PromptBuilder:
    """The builder with the prompt settings of the config the stage runs with (``configs/demo.yaml``)."""
    return PromptBuilder(builder.tokenizer, load_config(REPO_ROOT / "configs/demo.yaml").prompts)


@pytest.mark.slow
def test_stage_writes_train_and_embed_prompts_keyed_by_note_id(built, demo_builder, services):
    work, train_pairs, proc = built
    builder = demo_builder
    out = work / "prompts"
    assert sorted(p.name for p in work.iterdir()) == ["ingested", "pairs", "prompts"]  # no temp dirs left
    train = pq.read_table(out / "train")
    embed = pq.read_table(out / "embed")
    pair_ids = set(train_pairs.column("note_id").to_pylist()) | set(train_pairs.column("related_note_id").to_pylist())
    assert train.num_rows == len(pair_ids) and set(train.column("note_id").to_pylist()) == pair_ids
    notes = pq.read_table(NOTES_PATH).select(["note_id", "title", "content", "hashtags", "category"])
    assert embed.num_rows == notes.num_rows
    assert sorted(embed.column("note_id").to_pylist()) == sorted(notes.column("note_id").to_pylist())
    assert train.schema.field("input_ids").type == pa.list_(pa.int32())
    assert train.schema.field("labels").type == pa.list_(pa.int32())
    # each row is exactly what the prompt builder gives for that note id
    by_id = {r["note_id"]: r for r in notes.to_pylist()}
    for row in train.slice(0, 300).to_pylist():
        enc = builder.encode(by_id[row["note_id"]], "train")
        assert (row["input_ids"], row["labels"], row["task"], row["emb_pos"]) == (
            enc.input_ids, enc.labels, enc.prompt.task, enc.emb_pos)
        assert row["input_ids"][row["emb_pos"] + 1] == builder.emb_token_id
    for row in embed.slice(0, 300).to_pylist():
        assert row["input_ids"] == builder.encode(by_id[row["note_id"]], "embed").input_ids
    meta = json.loads((out / "meta.json").read_text())
    assert meta["emb_token_id"] == builder.emb_token_id and meta["vocab_size"] == len(builder.tokenizer)
    summary = json.loads((out / "summary.json").read_text())
    hashtag_rows = sum(t == HASHTAG for t in train.column("task").to_pylist())
    assert summary["train_rows"] == train.num_rows and summary["hashtag_rows"] == hashtag_rows
    assert summary["length"]["train"]["max"] == max(train.column("length").to_pylist())
    assert "p95" in proc.stdout and "truncated" in proc.stdout
    run_id = next(line.split()[2] for line in proc.stdout.splitlines() if line.startswith("MLflow run "))
    metrics = MlflowClient(services.mlflow_url).get_run(run_id).data.metrics
    assert metrics["train_rows"] == train.num_rows and metrics["embed_rows"] == embed.num_rows


@pytest.mark.slow
def test_failed_rerun_keeps_the_previous_output(built, tmp_path):
    work, _, _ = built
    before = {p.relative_to(work): p.read_bytes() for p in (work / "prompts").rglob("*") if p.is_file()}
    pairs = work / "pairs" / "train.parquet"
    saved = pairs.read_bytes()
    try:
        pq.write_table(pq.read_table(pairs).slice(0, 0), pairs)
        proc = _stage_cli(work)
        assert proc.returncode == 2 and "no training pairs" in proc.stderr
        table = pq.read_table(pairs.with_name("test.parquet"))
        ids = table.column("note_id").to_pylist()
        ids[3] = "nope:1"
        pq.write_table(pa.table({"note_id": ids, "related_note_id": table.column("related_note_id")}), pairs)
        proc = _stage_cli(work)
        assert proc.returncode == 2 and "row 3" in proc.stderr and "'nope:1'" in proc.stderr
    finally:
        pairs.write_bytes(saved)
    after = {p.relative_to(work): p.read_bytes() for p in (work / "prompts").rglob("*") if p.is_file()}
    assert after == before
