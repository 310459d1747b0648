r"""The Note Compression Prompt (method.md section 2): the only place prompt strings live.

Template (one template serves embedding and generation)::

    [BOS]<Instruction> <Input Note> The compression word is:"[EMB]". <Output Guidance> <Output>[EOS]

* ``[BOS]`` = ``tokenizer.bos_token`` (SmolLM2: ``<|im_start|>``), ``[EOS]`` = ``tokenizer.eos_token``
  (SmolLM2: ``<|im_end|>``), ``[EMB]`` = ``PromptConfig.emb_token`` added to the tokenizer as an extra
  special token by ``add_emb_token`` (idempotent; the model must resize its embeddings to
  ``len(tokenizer)``).
* Spacing is literal: no space after ``[BOS]``; one space between Instruction, Input Note and
  ``The compression word is:"``; ``[EMB]`` directly after ``:"`` and directly followed by ``".``;
  one space, the Output Guidance, one space, the Output, and ``[EOS]`` directly after it.

Tasks
-----
* ``category``: Instruction ``INSTRUCTION_CATEGORY``, Input Note
  ``{'title': t, 'topic': tp, 'content': ct}``, Output Guidance ``The category is:``, Output: the
  category.
* ``hashtag``: Instruction ``INSTRUCTION_HASHTAG`` with ``<j>`` replaced by the digits of j, Input
  Note ``{'title': t, 'content': ct}``, Output Guidance ``The <j> topics are:``, Output: j hashtags
  sampled at random from the note's hashtags, kept in the note's order, joined with ``", "``.
  ``j = min(number of hashtags, prompts.max_hashtags_sampled)``; the instruction is used verbatim
  (j = 1 reads "generate 1 topics of the note.").
* Which task a note gets is a seeded draw per note (``plan_task``): a ``random.Random`` seeded with
  ``prompts.seed + int(sha256(note_id)[:8 bytes])`` (never Python's ``hash()``, which is salted per
  process) draws u ~ U[0, 1); the note gets the hashtag task when ``u < prompts.hashtag_task_ratio``
  (r) *and* it has at least one hashtag, otherwise the category task. So a note without hashtags
  gets the category task even when drawn for the hashtag task, and the realised share is r times
  the share of notes with hashtags. The same generator then samples the j hashtags, so the plan
  depends only on (note_id, hashtags, config).

Rendering of the fields
-----------------------
Each field (title t, hashtags tp, content ct, category c, each hashtag) is normalised the same way:

1. every added-token string of the tokenizer (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``,
   ``[EMB]``, SmolLM2's ``<filename>`` etc.) is deleted, repeatedly, so a note can never inject a
   control token: the rendered text then holds exactly one ``[EMB]``, one ``[BOS]`` and (training
   prompts) one ``[EOS]``;
2. every run of whitespace (newlines, tabs, non-breaking spaces...) becomes one space, and leading
   and trailing whitespace is dropped. Prompts are therefore single-line; line structure of the
   content is not kept (it would cost budget tokens and the paper's truncated fields are short).

Hashtags are normalised one by one; empty ones and repeats are dropped. ``tp`` is the hashtags
joined with ``", "`` (a hashtag that itself contains ``", "`` cannot be told apart when parsing a
generated list: ``parse_output`` splits on commas).

Inside the Input Note every value is a single-quoted Python string literal: ``\`` is written ``\\``
and ``'`` is written ``\'`` (nothing else needs escaping once whitespace is collapsed). So the Input
Note is always a valid Python dict literal whose values are the (truncated) fields:
``ast.literal_eval`` gives them back, and no field text can close its quote and fake another key.
Double quotes, emoji, CJK and right-to-left text are written as they are. Outputs (category,
hashtags) stand outside any quotes and are not escaped.

Truncation
----------
Title and content are cut to ``prompts.title_max_tokens`` / ``prompts.content_max_tokens`` tokens,
counted on the escaped field text tokenized on its own; the topic list and the template are never
cut. The cut is made in text space: the escaped field is tokenized with character offsets and
cut where the first token over budget starts (a character split over several byte-level tokens is
dropped whole, so no broken UTF-8 appears), trailing spaces are stripped, and a dangling ``\`` of a
cut escape pair is dropped. A field is first clipped to ``(budget + 1) × longest vocabulary entry``
characters (more than budget + 1 tokens can span), so a 200k-character body costs no more than a
short one.

Why text space and not ids assembled segment by segment: the stored ``input_ids`` are exactly
``tokenizer(text, add_special_tokens=False)`` of the stored ``text``, so any component that renders
a note (training, batch embedding, online serving) gets the same ids from the same text, and a
decoded prompt re-encodes to itself. Ids glued per segment would differ from the tokenization of
the same text wherever BPE merges across a segment boundary (SmolLM2: the opening quote and a
field starting with ``"`` become one token `` '"``), so the ids could not be reproduced from the
text. In context a field can therefore cost a token more or less than counted alone, at its two
ends: on the default dataset a prompt is at most 2 tokens longer than its template (with empty
fields) plus the two budgets; the tests allow 4.

Encoded prompts and positions
-----------------------------
``PromptBuilder.encode`` tokenizes the rendered text once and returns ``input_ids``, ``labels``,
``emb_token_pos`` (the index of ``[EMB]``) and ``emb_pos = emb_token_pos - 1``: the index of the token
right before ``[EMB]`` (SmolLM2: the token ``:"``), whose last hidden state is the note embedding
(method.md section 3). ``labels`` are -100 everywhere except on the Output tokens and the final
``[EOS]``; the Output starts with the separating space (SmolLM2 folds it into the first output token,
e.g. ``" ai"``), so generation is prompted with the text up to ``is:`` (no trailing space) and
must produce `` ai[EOS]``. The tokenizer splits text at special tokens before BPE, so the Output
Guidance tokens after ``[EMB]`` never depend on the note; the encoder checks that they are not
merged with the Output.

Variants (one code path):

* ``train``: the whole template, with Output and ``[EOS]`` (task from ``plan_task`` unless given).
* ``embed``: the category-task prompt cut right after ``[EMB]`` (no output), for indexing and
  serving. Its ids are exactly the first ``emb_token_pos + 1`` ids of the category ``train`` prompt
  of the same note, so training and serving embed the same tokens.
* ``generate``: cut right after the Output Guidance (``...The category is:``), for generation.

Rendered examples (SmolLM2 tokenizer, default config; each prompt is one line, wrapped here at
spaces) of the note ``{'note_id': 'golden:2', 'title': '咖啡 ☕ which grind for a moka pot? 🤔',
'content': "Medium-fine, a bit coarser than espresso.\r\nשלום — it's my first pot 😀",
'hashtags': ['grinding', 'moka-pot'], 'category': 'coffee'}``.

Category task (``train``)::

    <|im_start|>Extract the note information in json format, compress it into one word for
    recommendation, and generate the category of the note. {'title': '咖啡 ☕ which grind for a
    moka pot? 🤔', 'topic': 'grinding, moka-pot', 'content': 'Medium-fine, a bit coarser than
    espresso. שלום — it\'s my first pot 😀'} The compression word is:"[EMB]". The category is:
    coffee<|im_end|>

Hashtag task (``train``, j = 2)::

    <|im_start|>Extract the note information in json format, compress it into one word for
    recommendation, and generate 2 topics of the note. {'title': '咖啡 ☕ which grind for a moka
    pot? 🤔', 'content': 'Medium-fine, a bit coarser than espresso. שלום — it\'s my first pot 😀'}
    The compression word is:"[EMB]". The 2 topics are: grinding, moka-pot<|im_end|>

Embedding-only (``embed``); the pooled token (``emb_pos``) is ``:"``::

    <|im_start|>Extract the note information in json format, compress it into one word for
    recommendation, and generate the category of the note. {'title': '咖啡 ☕ which grind for a
    moka pot? 🤔', 'topic': 'grinding, moka-pot', 'content': 'Medium-fine, a bit coarser than
    espresso. שלום — it\'s my first pot 😀'} The compression word is:"[EMB]

The exact strings of this note and of a long note (cut to the content budget) are checked in
under ``tests/golden/`` and compared by ``tests/test_prompts.py``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from notellm.config import PromptConfig

Task = Literal["category", "hashtag"]
Variant = Literal["train", "embed", "generate"]

CATEGORY: Task = "category"
HASHTAG: Task = "hashtag"
TASKS: tuple[Task, ...] = (CATEGORY, HASHTAG)
VARIANTS: tuple[Variant, ...] = ("train", "embed", "generate")

IGNORE_INDEX = -100  # label of tokens without generation loss (torch CrossEntropyLoss default)

# --- the template text (method.md section 2), word for word -----------------------------------
INSTRUCTION_CATEGORY = (
    "Extract the note information in json format, compress it into one word for recommendation, "
    "and generate the category of the note."
)
INSTRUCTION_HASHTAG = (
    "Extract the note information in json format, compress it into one word for recommendation, "
    "and generate {j} topics of the note."
)
COMPRESSION_WORD = "The compression word is:"
GUIDANCE_CATEGORY = "The category is:"
GUIDANCE_HASHTAG = "The {j} topics are:"
HASHTAG_SEPARATOR = ", "

# --- baselines (method.md "Baselines named above") ---------------------------------------------
PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'
"""PromptEOL: the note's plain text in the one-word prompt; the last token's hidden state is pooled."""
PLAIN_TEXT_SEPARATOR = " | "
"""Joins title, hashtags and content in the plain (prompt-free) note text of the baselines."""


class PromptError(ValueError):
    """A note cannot be rendered or encoded; the message names the note and the reason."""


# --- pure helpers --------------------------------------------------------------------------------


def note_seed(note_id: str, seed: int) -> int:
    """``seed`` + the first 8 bytes of sha256(note_id) as an unsigned int: stable across processes."""
    digest = hashlib.sha256(note_id.encode("utf-8")).digest()
    return seed + int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class TaskPlan:
    """The seeded choices for one note: its training task and the hashtags its hashtag task outputs.

    ``sampled`` is filled whenever the note has hashtags (also when ``task`` is category, so a
    hashtag prompt can still be rendered for it); ``j == len(sampled)``.
    """

    task: Task
    sampled: tuple[str, ...]

    @property
    def j(self) -> int:
        return len(self.sampled)


def plan_task(note_id: str, hashtags: Sequence[str], cfg: PromptConfig) -> TaskPlan:
    """Draw the task of ``note_id`` (hashtag with probability r, if it has hashtags) and sample
    ``min(len(hashtags), cfg.max_hashtags_sampled)`` of its (normalised) ``hashtags``, kept in
    their order. Deterministic in (note_id, hashtags, cfg)."""
    rng = random.Random(note_seed(note_id, cfg.seed))
    drawn_hashtag = rng.random() < cfg.hashtag_task_ratio
    if not hashtags:
        return TaskPlan(CATEGORY, ())
    j = min(len(hashtags), cfg.max_hashtags_sampled)
    picked = sorted(rng.sample(range(len(hashtags)), j))
    return TaskPlan(HASHTAG if drawn_hashtag else CATEGORY, tuple(hashtags[i] for i in picked))


def strip_tokens(text: str, forbidden: Sequence[str]) -> str:
    """``text`` with every occurrence of each ``forbidden`` string deleted, until none is left."""
    changed = True
    while changed:
        changed = False
        for token in forbidden:
            if token and token in text:
                text = text.replace(token, "")
                changed = True
    return text


def normalize_text(text: str | None, forbidden: Sequence[str] = ()) -> str:
    """Delete ``forbidden`` strings, collapse whitespace runs to one space, strip. None -> ''."""
    if not text:
        return ""
    return " ".join(strip_tokens(text, forbidden).split())


def normalize_hashtags(hashtags: Sequence[str] | None, forbidden: Sequence[str] = ()) -> list[str]:
    """Normalised hashtags, empty ones and repeats dropped, first occurrence order kept."""
    out: list[str] = []
    for tag in hashtags or ():
        clean = normalize_text(tag, forbidden)
        if clean and clean not in out:
            out.append(clean)
    return out


def quote_escape(text: str) -> str:
    r"""Escape for a single-quoted Python literal: ``\`` -> ``\\``, ``'`` -> ``\'``."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _drop_dangling_escape(text: str) -> str:
    r"""Drop a trailing lone ``\`` left by cutting an escape pair (escaped text holds ``\`` only in
    pairs ``\\`` or ``\'``, so an odd number of trailing backslashes means a cut pair)."""
    trailing = len(text) - len(text.rstrip("\\"))
    return text[:-1].rstrip(" ") if trailing % 2 else text


def parse_output(text: str, task: Task) -> str | list[str]:
    """Parse generated Output text (special tokens already removed): the category string, or the
    list of hashtags (split on commas, stripped, empty items dropped)."""
    if task == CATEGORY:
        return " ".join(text.split())
    if task == HASHTAG:
        return [t for t in (" ".join(p.split()) for p in text.split(",")) if t]
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def add_emb_token(tokenizer: PreTrainedTokenizerBase, emb_token: str | None = None) -> int:
    """Register ``emb_token`` (default ``PromptConfig().emb_token``) as an extra special token of
    ``tokenizer`` (in place) and return its id. Idempotent: a second call returns the same id and
    changes nothing. Never call it on a shared tokenizer (``load_tokenizer(..., fresh=True)``)."""
    emb_token = emb_token or PromptConfig().emb_token
    registered = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    if emb_token not in registered:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [emb_token]}, replace_extra_special_tokens=False
        )
    ids = tokenizer(emb_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise PromptError(f"emb token {emb_token!r} did not become a single token (ids {ids})")
    return ids[0]


# --- rendering and encoding ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Fields:
    """A note's fields ready for the template (title/content escaped and truncated)."""

    title: str
    content: str
    hashtags: list[str]
    category: str
    title_truncated: bool
    content_truncated: bool


@dataclass(frozen=True)
class RenderedPrompt:
    """One prompt as text. ``output`` is the Output text (category or hashtags joined with ", ";
    the expected answer, also for ``generate``; None for ``embed``); ``j`` is 0 for the category
    task."""

    note_id: str
    variant: Variant
    task: Task
    j: int
    text: str
    output: str | None
    title_truncated: bool
    content_truncated: bool


@dataclass(frozen=True)
class EncodedPrompt:
    """A rendered prompt and its tokens (length L = len(input_ids); no padding, mask all ones).

    ``labels``: L ids, ``IGNORE_INDEX`` except on the Output tokens and the final EOS (``train``);
    None for ``embed``/``generate``. ``emb_token_pos``: index of ``[EMB]``; ``emb_pos``: the index
    before it, the pooled position."""

    prompt: RenderedPrompt
    input_ids: list[int]
    labels: list[int] | None
    emb_pos: int
    emb_token_pos: int


class PromptBuilder:
    """Renders and tokenizes Note Compression Prompts with one tokenizer and one ``PromptConfig``.

    The constructor adds ``cfg.emb_token`` to ``tokenizer`` (in place, idempotent): pass a private
    tokenizer (``load_tokenizer(name, fresh=True)``). A note is a mapping with ``note_id``,
    ``title``, ``content``, ``hashtags`` (list of str) and ``category`` (the notes contract).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: PromptConfig) -> None:
        if tokenizer.bos_token is None or tokenizer.eos_token is None:
            raise PromptError(
                f"tokenizer {type(tokenizer).__name__} has no bos_token/eos_token; the prompt "
                "template needs both"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise PromptError("a fast tokenizer (character offsets) is needed to truncate fields")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.emb_token = cfg.emb_token
        self.emb_token_id = add_emb_token(tokenizer, cfg.emb_token)
        self.bos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
        self.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        # Strings the tokenizer would turn into added tokens: deleted from every field.
        self.forbidden = tuple(
            sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
        )
        # Longest vocabulary entry: an upper bound on the characters one token spans (byte-level
        # entries hold one symbol per byte), so N tokens never span more than N times this.
        self.max_token_chars = max(len(t) for t in tokenizer.get_vocab())
        self._guidance_ids: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ fields

    def truncate_many(self, texts: Sequence[str], max_tokens: int) -> list[tuple[str, bool]]:
        """Cut each escaped field text to at most ``max_tokens`` tokens (counted alone, one batched
        tokenizer call); returns (text, whether it was cut) per input."""
        limit = (max_tokens + 1) * self.max_token_chars
        clipped = [t[:limit] for t in texts]
        enc = self.tokenizer(clipped, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, clip, offsets in zip(texts, clipped, enc["offset_mapping"]):
            if len(offsets) <= max_tokens and len(clip) == len(text):
                out.append((text, False))
                continue
            cut = clip[: offsets[max_tokens][0]] if len(offsets) > max_tokens else clip
            out.append((_drop_dangling_escape(cut.rstrip(" ")), True))
        return out

    def truncate(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """``truncate_many`` for one text."""
        return self.truncate_many([text], max_tokens)[0]

    def _fields_many(self, notes: Sequence[Mapping[str, Any]]) -> list[_Fields]:
        """Normalised fields of each note; title and content escaped and truncated."""
        def escaped(note: Mapping[str, Any], key: str) -> str:
            return quote_escape(normalize_text(note.get(key), self.forbidden))

        titles = self.truncate_many([escaped(n, "title") for n in notes], self.cfg.title_max_tokens)
        contents = self.truncate_many([escaped(n, "content") for n in notes], self.cfg.content_max_tokens)
        return [
            _Fields(
                title=title,
                content=content,
                hashtags=normalize_hashtags(note.get("hashtags"), self.forbidden),
                category=normalize_text(note.get("category"), self.forbidden),
                title_truncated=t_cut,
                content_truncated=c_cut,
            )
            for note, (title, t_cut), (content, c_cut) in zip(notes, titles, contents)
        ]

    def plain_texts(self, notes: Sequence[Mapping[str, Any]]) -> list[str]:
        """Prompt-free text of each note for the baselines (zero-shot LLM, PromptEOL, MiniLM, BM25):
        the title, the hashtags joined with ``", "`` and the content, each normalised like the
        prompt fields but not quote-escaped, title and content cut to the same token budgets, the
        non-empty parts joined with ``PLAIN_TEXT_SEPARATOR``. Same information as the NoteLLM
        prompt, without the instruction."""
        def cut(key: str, budget: int) -> list[str]:
            texts = [normalize_text(n.get(key), self.forbidden) for n in notes]
            return [t for t, _ in self.truncate_many(texts, budget)]

        titles = cut("title", self.cfg.title_max_tokens)
        contents = cut("content", self.cfg.content_max_tokens)
        out = []
        for note, title, content in zip(notes, titles, contents):
            tags = HASHTAG_SEPARATOR.join(normalize_hashtags(note.get("hashtags"), self.forbidden))
            out.append(PLAIN_TEXT_SEPARATOR.join(part for part in (title, tags, content) if part))
        return out

    def prompteol_texts(self, notes: Sequence[Mapping[str, Any]]) -> list[str]:
        """``PROMPTEOL_TEMPLATE`` around each note's ``plain_texts``."""
        return [PROMPTEOL_TEMPLATE.format(text=t) for t in self.plain_texts(notes)]

    # ------------------------------------------------------------------ rendering

    def render(
        self, note: Mapping[str, Any], variant: Variant = "train", task: Task | None = None
    ) -> RenderedPrompt:
        """Render ``note`` as text; see ``render_many``."""
        return self.render_many([note], variant, task)[0]

    def render_many(
        self, notes: Sequence[Mapping[str, Any]], variant: Variant = "train", task: Task | None = None
    ) -> list[RenderedPrompt]:
        """Render notes as text. ``task`` defaults to each note's plan (``embed``: always the
        category task). Raises ``PromptError`` for an unknown variant/task, a hashtag task on a note
        without hashtags, or an empty category in a category training/generation prompt."""
        fields = self._fields_many(notes)
        return [self._render(str(n["note_id"]), f, variant, task) for n, f in zip(notes, fields)]

    def _render(self, note_id: str, f: _Fields, variant: Variant, task: Task | None) -> RenderedPrompt:
        if variant not in VARIANTS:
            raise PromptError(f"unknown prompt variant {variant!r}; expected one of {VARIANTS}")
        title, content, hashtags, category = f.title, f.content, f.hashtags, f.category
        plan = plan_task(note_id, hashtags, self.cfg)
        if variant == "embed":
            if task not in (None, CATEGORY):
                raise PromptError(f"embed prompts use the category task, not {task!r}")
            task = CATEGORY
        task = task or plan.task
        if task == CATEGORY:
            j = 0
            topic = quote_escape(HASHTAG_SEPARATOR.join(hashtags))
            instruction, guidance, output = INSTRUCTION_CATEGORY, GUIDANCE_CATEGORY, category
            note_text = f"{{'title': '{title}', 'topic': '{topic}', 'content': '{content}'}}"
        elif task == HASHTAG:
            if not plan.sampled:
                raise PromptError(f"note {note_id!r}: hashtag task needs at least one hashtag, it has none")
            j = plan.j
            instruction = INSTRUCTION_HASHTAG.format(j=j)
            guidance = GUIDANCE_HASHTAG.format(j=j)
            output = HASHTAG_SEPARATOR.join(plan.sampled)
            note_text = f"{{'title': '{title}', 'content': '{content}'}}"
        else:
            raise PromptError(f"unknown task {task!r}; expected one of {TASKS}")
        if not output and variant != "embed":
            raise PromptError(f"note {note_id!r}: empty {task} output (category is blank after normalising)")
        tok = self.tokenizer
        text = f'{tok.bos_token}{instruction} {note_text} {COMPRESSION_WORD}"{self.emb_token}'
        if variant != "embed":
            text += f'". {guidance}'
        if variant == "train":
            text += f" {output}{tok.eos_token}"
        return RenderedPrompt(
            note_id=note_id,
            variant=variant,
            task=task,
            j=j,
            text=text,
            output=None if variant == "embed" else output,
            title_truncated=f.title_truncated,
            content_truncated=f.content_truncated,
        )

    # ------------------------------------------------------------------ encoding

    def _guidance(self, task: Task, j: int) -> list[int]:
        """Ids of the text between [EMB] and the Output (``". The category is:``)."""
        key = f"{task}:{j}"
        if key not in self._guidance_ids:
            guidance = GUIDANCE_CATEGORY if task == CATEGORY else GUIDANCE_HASHTAG.format(j=j)
            self._guidance_ids[key] = self.tokenizer(f'". {guidance}', add_special_tokens=False)["input_ids"]
        return self._guidance_ids[key]

    def _finish(self, prompt: RenderedPrompt, ids: list[int]) -> EncodedPrompt:
        where = f"note {prompt.note_id!r} ({prompt.variant}, {prompt.task})"
        if ids[0] != self.bos_token_id:
            raise PromptError(f"{where}: first token {ids[0]} is not BOS {self.bos_token_id}")
        if ids.count(self.emb_token_id) != 1:
            raise PromptError(f"{where}: expected one [EMB] token, found {ids.count(self.emb_token_id)}")
        emb_token_pos = ids.index(self.emb_token_id)
        labels = None
        if prompt.variant == "embed":
            if emb_token_pos != len(ids) - 1:
                raise PromptError(f"{where}: [EMB] is not the last token")
        else:
            guidance = self._guidance(prompt.task, prompt.j)
            start = emb_token_pos + 1
            if ids[start : start + len(guidance)] != guidance:
                raise PromptError(f"{where}: the Output Guidance tokens merged with the Output")
            out_start = start + len(guidance)
            if prompt.variant == "generate" and out_start != len(ids):
                raise PromptError(f"{where}: tokens after the Output Guidance in a generation prompt")
            if prompt.variant == "train":
                if ids[-1] != self.eos_token_id or ids.count(self.eos_token_id) != 1 or out_start >= len(ids) - 1:
                    raise PromptError(f"{where}: expected Output tokens then one final EOS")
                labels = [IGNORE_INDEX] * out_start + ids[out_start:]
        return EncodedPrompt(prompt, ids, labels, emb_token_pos - 1, emb_token_pos)

    def encode(
        self, note: Mapping[str, Any], variant: Variant = "train", task: Task | None = None
    ) -> EncodedPrompt:
        """Render ``note`` and tokenize the text (no extra special tokens: BOS is in the text)."""
        return self.encode_many([note], variant, task)[0]

    def encode_many(
        self, notes: Sequence[Mapping[str, Any]], variant: Variant = "train", task: Task | None = None
    ) -> list[EncodedPrompt]:
        """``encode`` for many notes with one batched tokenizer call."""
        prompts = self.render_many(notes, variant, task)
        if not prompts:
            return []
        ids = self.tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]
        return [self._finish(p, i) for p, i in zip(prompts, ids)]

    def encode_table(self, notes: pa.Table, variant: Variant) -> pa.Table:
        """Encode every row of a notes table (columns of the notes contract; extra columns are
        ignored) into a table of ``TRAIN_SCHEMA`` (``train``) or ``EMBED_SCHEMA`` (``embed``)."""
        if variant not in ("train", "embed"):
            raise PromptError(f"encode_table writes train or embed prompts, not {variant!r}")
        cols = [c for c in ("note_id", "title", "content", "hashtags", "category") if c in notes.column_names]
        encoded = self.encode_many(notes.select(cols).to_pylist(), variant)
        return encoded_to_table(encoded, variant)


# --- Arrow layout of the prompts stage -----------------------------------------------------------

_COMMON_FIELDS = [
    pa.field("note_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("length", pa.int32(), nullable=False),
    pa.field("emb_pos", pa.int32(), nullable=False),
    pa.field("emb_token_pos", pa.int32(), nullable=False),
    pa.field("title_truncated", pa.bool_(), nullable=False),
    pa.field("content_truncated", pa.bool_(), nullable=False),
]
EMBED_SCHEMA = pa.schema(_COMMON_FIELDS)
"""Embedding-only prompts: one row per note (category-task prompt cut after [EMB])."""

TRAIN_SCHEMA = pa.schema(
    _COMMON_FIELDS
    + [
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("j", pa.int32(), nullable=False),
        pa.field("output", pa.string(), nullable=False),
    ]
)
"""Training prompts: one row per note; ``labels`` as in ``EncodedPrompt``, ``task`` category|hashtag,
``j`` (0 for category), ``output`` the expected Output text."""


def encoded_to_table(encoded: Sequence[EncodedPrompt], variant: Variant) -> pa.Table:
    """Arrow table (``TRAIN_SCHEMA`` or ``EMBED_SCHEMA``) of encoded prompts, in order."""
    schema = TRAIN_SCHEMA if variant == "train" else EMBED_SCHEMA
    cols: dict[str, list[Any]] = {
        "note_id": [e.prompt.note_id for e in encoded],
        "text": [e.prompt.text for e in encoded],
        "input_ids": [e.input_ids for e in encoded],
        "length": [len(e.input_ids) for e in encoded],
        "emb_pos": [e.emb_pos for e in encoded],
        "emb_token_pos": [e.emb_token_pos for e in encoded],
        "title_truncated": [e.prompt.title_truncated for e in encoded],
        "content_truncated": [e.prompt.content_truncated for e in encoded],
    }
    if variant == "train":
        cols["labels"] = [e.labels for e in encoded]
        cols["task"] = [e.prompt.task for e in encoded]
        cols["j"] = [e.prompt.j for e in encoded]
        cols["output"] = [e.prompt.output for e in encoded]
    return pa.Table.from_pydict(cols, schema=schema)
