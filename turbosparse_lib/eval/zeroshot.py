"""Zero-shot evaluation built from held-out text: ``lastword`` and ``continuation``.

No package ships LAMBADA, HellaSwag or the other sets of the paper's table 10 (see
``shared/data-sources.md``), and nothing may be downloaded at run time. So the two tasks below are
built from the held-out Wikipedia articles (the ``test`` split) and are named for what they are:
they have the *form* of LAMBADA and HellaSwag, not their content, and their numbers are not
comparable with table 10's.

- ``lastword`` (LAMBADA-style): a passage of ``passage_words`` words made of whole sentences
  ends on a word; the model sees the passage without that word and must produce it. Selection
  rule: the passage's last sentence ends with a word of at least 3 letters (letters only, no
  digits or hyphens), not a common function word (``STOPWORDS``), followed by ``.``, ``!`` or
  ``?`` (and perhaps a closing quote or bracket, which are dropped with the full stop), and the
  word (ignoring case) already occurs earlier in the passage. The last condition stands in for
  LAMBADA's human filter (a word guessable from the passage but not from its last sentence
  alone): most LAMBADA targets occur earlier in their passage. Scored as in the LAMBADA OpenAI
  task of lm-evaluation-harness: correct when greedy decoding reproduces *all* the word's tokens
  (``acc``); the mean log-likelihood of the word is reported beside it. Chance is about 0.
- ``continuation`` (HellaSwag-style): ``context_sentences`` consecutive sentences; choose the true
  next sentence among ``n_choices`` options, the others being true endings of windows of *other*
  articles in the same length bin (one of ``LENGTH_BINS`` bins of equal count, in characters), so
  that length says nothing about which option is true. Scored as lm-evaluation-harness scores
  HellaSwag: the option with the highest summed log-likelihood (``acc``) and the highest
  log-likelihood per character (``acc_norm``). Chance is ``1 / n_choices``. Easier than
  HellaSwag: the distractors are random sentences, not adversarially filtered ones, so this
  measures mostly whether a model keeps to the topic and the discourse of its context.

Design:

- Text handling is tokenizer-free: ``build_tasks`` returns plain dataclasses of strings, so the
  same examples score our BPE models and SmolLM2 alike.
- Articles are read line by line: a line of fewer than ``MIN_PARAGRAPH_WORDS`` words is a
  heading, caption or list item and ends a *section*; passages and contexts never cross one.
  Sentences are cut by a regular expression at ``.!?`` followed by a capital, except after common
  abbreviations and initials. Examples never overlap one another.
- Deterministic: candidates are enumerated in corpus order and the first ``n_examples`` of a
  seeded permutation are kept (skipping a continuation window short of distractors), so a
  smaller ``n_examples`` gives a prefix of a larger one; the
  distractors of an example depend only on the seed and that example. Each task has its own
  random stream, so building one task alone gives the same examples as building all.
- Tokenisation follows lm-evaluation-harness: context and context + continuation are encoded
  without special tokens and the continuation's tokens are the tail of the latter, which is right
  for tokenizers that merge a leading space into the next word.
- Scoring (``loglikelihoods``) batches requests of similar length with right padding; under
  causal attention a real position never attends to the padding after it, so no attention mask
  is needed. Only the scored positions' logits are computed (``logits_to_keep``). Contexts are
  truncated on the left to ``max_length`` tokens (default: the model's
  ``max_position_embeddings``). Runs under ``torch.inference_mode`` in eval mode (restored
  afterwards).
- Cost: an example is scored as one sequence per option, so ``continuation`` costs about 5.5
  times ``lastword``: 500 examples of each are 53k and 289k tokens of our BPE (9k and 51k of
  SmolLM2's per 100). Scoring runs at about the speed of ``perplexity`` per token (measured on the
  cpu-preset 7.4M-parameter model: 2,000 vs 1,900 tokens/s on 2 busy cores).
- ``stderr`` is the binomial standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` over
  ``n`` independent examples.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .perplexity import progress_enabled

TaskName = Literal["lastword", "continuation"]
TASK_NAMES: tuple[str, ...] = ("lastword", "continuation")
MIN_PARAGRAPH_WORDS = 8  # shorter lines are headings, captions or list items (see the module docstring)
MIN_TARGET_LETTERS = 3  # lastword targets have at least this many letters
ENDING_WORDS = (8, 40)  # continuation: inclusive word-count range of the true ending and of distractors
LENGTH_BINS = 20  # continuation: options share one of this many equal-count bins of the endings' lengths

# Function words of 3+ letters: a passage ending on one is not a test of understanding the passage.
STOPWORDS = frozenset(
    """
    the and for with that this was were are his her hers its their theirs them they from which who whom whose
    also been has have had not but one all other others such these those there then than into onto over under
    about after before more most some any each only both well very can could would should will may might must
    did does our ours your yours you she him what when where while how why being same own out off too yet nor
    per via upon once again here thus ever even just much many few less least made make between during through
    against among within without along since until toward towards above below
    """.split()
)

# A sentence ends at . ! or ? (perhaps followed by a closing quote or bracket), then whitespace,
# then a capital letter, digit, or an opening quote or bracket.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)]))\s+(?=[\"“‘(]?[A-Z0-9])")
# A full stop after these does not end a sentence: initials ("J."), dotted acronyms ("U.S."), titles.
_ABBREVIATION = re.compile(
    r"(?:^|[\s(\"“])(?:[A-Z]|(?:[A-Za-z]\.){1,}[A-Za-z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|No|Nos|Vol|vs|ca|c|Lt|Gen|Col|Capt"
    r"|Sgt|Rev|Prof|Gov|Sen|Rep|Inc|Co|Ltd|Bros|Mt|Ft|approx|cf|al|fl|op|pp|Jan|Feb|Mar|Apr|Aug"
    r"|Sep|Sept|Oct|Nov|Dec)\.$"
)
# The last word of a sentence: a plain space (so that " " + word is the text's own), letters only, then the
# sentence's final punctuation.
_LAST_WORD = re.compile(r" ([^\W\d_]+)[.!?][\"'”’)]?$")


@dataclass(frozen=True)
class LastWordExample:
    """Predict ``target`` after ``context``; ``context + " " + target`` is the passage."""

    doc_id: str
    context: str  # the passage up to the target word, without trailing whitespace
    target: str  # the passage's last word, scored as the continuation " " + target

    @property
    def passage(self) -> str:
        return f"{self.context} {self.target}"


@dataclass(frozen=True)
class ContinuationExample:
    """Choose the true next sentence of ``context`` among ``choices`` (``choices[label]``)."""

    doc_id: str
    context: str  # consecutive sentences of one section, ending with the last one's punctuation
    choices: tuple[str, ...]  # sentences, each scored as the continuation " " + choice
    label: int  # index of the true next sentence in choices


# --- building the tasks from text ------------------------------------------------------------


def split_sentences(line: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of one line of prose."""
    spans, start = [], 0
    for m in _SENTENCE_BREAK.finditer(line):
        if _ABBREVIATION.search(line[start : m.start()]):
            continue  # "Dr. Smith", "J. R. R. Tolkien", "the U.S. Army": not a sentence end
        spans.append((start, m.start()))
        start = m.end()
    if line[start:].strip():
        spans.append((start, len(line.rstrip())))
    return spans


def sections(text: str) -> list[list[tuple[int, int]]]:
    """Sentence spans of ``text``, grouped into sections of consecutive prose lines.

    A line of fewer than ``MIN_PARAGRAPH_WORDS`` words (a heading, a caption, a list item) ends
    the current section. Spans index ``text`` itself, so a passage is ``text[start:end]`` with its
    original line breaks.
    """
    out: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    offset = 0
    for line in text.split("\n"):
        if len(line.split()) >= MIN_PARAGRAPH_WORDS:
            current += [(offset + a, offset + b) for a, b in split_sentences(line)]
        elif current:
            out.append(current)
            current = []
        offset += len(line) + 1
    if current:
        out.append(current)
    return out


def _n_words(s: str) -> int:
    return len(s.split())


def _lastword_candidates(doc_id: str, text: str, passage_words: tuple[int, int]) -> list[LastWordExample]:
    """Every non-overlapping passage of ``text`` that meets the selection rule (module docstring)."""
    lo, hi = passage_words
    out = []
    for spans in sections(text):
        first_free = 0  # passages of one section do not overlap
        for end_i in range(len(spans)):
            m = _LAST_WORD.search(text[spans[end_i][0] : spans[end_i][1]])
            if m is None:
                continue
            target = m.group(1)
            if len(target) < MIN_TARGET_LETTERS or target.lower() in STOPWORDS:
                continue
            # the shortest run of whole sentences ending at end_i with at least `lo` words
            start_i, n = end_i, _n_words(text[spans[end_i][0] : spans[end_i][1]])
            while n < lo and start_i > first_free:
                start_i -= 1
                n = _n_words(text[spans[start_i][0] : spans[end_i][1]])
            if not lo <= n <= hi:
                continue
            context = text[spans[start_i][0] : spans[end_i][0] + m.start(1)].rstrip()
            context_words = {w.lower() for w in re.findall(r"[^\W\d_]+", context)}
            if target.lower() not in context_words or context.split()[-1] == target:
                continue  # not guessable from the passage, or a repeated word ("very very")
            out.append(LastWordExample(doc_id, context, target))
            first_free = end_i + 1
    return out


def _continuation_windows(doc_id: str, text: str, context_sentences: int) -> list[tuple[str, str, str]]:
    """``(doc_id, context, ending)`` for non-overlapping windows of ``context_sentences + 1`` sentences."""
    lo, hi = ENDING_WORDS
    out = []
    for spans in sections(text):
        i = 0
        while i + context_sentences < len(spans):
            ending = text[slice(*spans[i + context_sentences])]
            if lo <= _n_words(ending) <= hi:
                context = text[spans[i][0] : spans[i + context_sentences - 1][1]]
                out.append((doc_id, context, ending))
                i += context_sentences + 1
            else:
                i += 1
    return out


def _as_documents(documents) -> list[tuple[str, str]]:
    if documents is None:
        from ..data.build import load_splits

        documents = load_splits()["test"]
    if hasattr(documents, "column_names"):  # a datasets.Dataset with doc_id and text columns
        return list(zip(documents["doc_id"], documents["text"]))
    return [(str(doc_id), text) for doc_id, text in documents]


def build_tasks(
    n_examples: int,
    tasks: Sequence[TaskName] = TASK_NAMES,
    seed: int = 0,
    documents=None,
    *,
    passage_words: tuple[int, int] = (50, 150),
    context_sentences: int = 3,
    n_choices: int = 4,
) -> dict[str, list]:
    """``n_examples`` examples of each task in ``tasks``, built from ``documents``.

    ``documents``: ``(doc_id, text)`` pairs or a ``datasets.Dataset`` with ``doc_id`` and ``text``
    columns; ``None`` (the default) is the held-out test split. ``passage_words`` bounds a
    ``lastword`` passage's length in words (LAMBADA's average is about 75); ``context_sentences``
    and ``n_choices`` shape ``continuation``. Returns ``{task: [LastWordExample | ContinuationExample]}``.
    """
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; valid: {', '.join(TASK_NAMES)}")
    if n_examples < 1 or n_choices < 2 or context_sentences < 1:
        raise ValueError(
            f"need n_examples >= 1, n_choices >= 2, context_sentences >= 1; got "
            f"{n_examples}, {n_choices}, {context_sentences}"
        )
    docs = _as_documents(documents)
    out: dict[str, list] = {}
    for task in tasks:
        task_id = TASK_NAMES.index(task)  # each task its own random stream
        if task == "lastword":
            candidates = [ex for doc_id, text in docs for ex in _lastword_candidates(doc_id, text, passage_words)]
        else:
            candidates = [w for doc_id, text in docs for w in _continuation_windows(doc_id, text, context_sentences)]
        if n_examples > len(candidates):
            raise ValueError(
                f"asked for {n_examples} {task} examples but these documents give only "
                f"{len(candidates)}; lower n_examples or pass more text"
            )
        order = np.random.default_rng([seed, task_id]).permutation(len(candidates))
        if task == "lastword":
            out[task] = [candidates[i] for i in order[:n_examples]]
            continue
        # distractors are the true endings of other windows: the same kind of sentence (never the
        # first of a section, 8-40 words), so that nothing but the context tells them apart
        pool_ids = [doc_id for doc_id, _, _ in candidates]
        pool_texts = [ending for _, _, ending in candidates]
        pool_bins = length_bins(np.array([len(t) for t in pool_texts]))
        examples: list[ContinuationExample] = []
        for i in order:
            if len(examples) == n_examples:
                break
            ex = _with_distractors(candidates[i], int(i), seed, task_id, n_choices, pool_ids, pool_texts, pool_bins)
            if ex is not None:
                examples.append(ex)
        if len(examples) < n_examples:
            raise ValueError(
                f"asked for {n_examples} continuation examples but only {len(examples)} find "
                f"{n_choices - 1} distractors in their length bin; lower n_examples or n_choices"
            )
        out[task] = examples
    return out


def length_bins(lengths: np.ndarray, n_bins: int = LENGTH_BINS) -> np.ndarray:
    """The bin (0 .. n_bins - 1) of each length, bins holding about equal shares of ``lengths``."""
    edges = np.quantile(lengths, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, lengths, side="right")


def _with_distractors(window, index, seed, task_id, n_choices, pool_ids, pool_texts, pool_bins):
    """The window's true ending among ``n_choices - 1`` endings of other articles in its length bin.

    The pool is every window's true ending and the options share a bin of it, so the true ending
    and its distractors are draws from one distribution: the true one is the shortest option as
    often as any other. (Distractors drawn from a band of lengths centred on the true ending made
    it the shortest option in 9% of examples instead of 25%, which ``acc``, a sum of
    log-probabilities that favours short options, turned into accuracy below chance.)
    """
    doc_id, context, ending = window
    ok = np.flatnonzero(pool_bins == pool_bins[index])
    ok = [j for j in ok if pool_ids[j] != doc_id and pool_texts[j] != ending]
    distinct = list(dict.fromkeys(pool_texts[j] for j in ok))  # a sentence repeated across articles counts once
    if len(distinct) < n_choices - 1:
        return None
    rng = np.random.default_rng([seed, task_id, index])  # depends on this example only, not on n_examples
    picked = [distinct[j] for j in rng.choice(len(distinct), n_choices - 1, replace=False)]
    label = int(rng.integers(n_choices))
    choices = picked[:label] + [ending] + picked[label:]
    return ContinuationExample(doc_id, context, tuple(choices), label)


# --- scoring ---------------------------------------------------------------------------------


def loglikelihoods(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool | None = None,
) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), is_greedy)`` per ``(context_ids, continuation_ids)`` request.

    ``is_greedy``: every continuation token is the argmax given the tokens before it. The context
    is truncated on the left so that context + continuation fit ``max_length`` input tokens.
    """
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
        if max_length is None:
            raise ValueError("pass max_length: the model's config has no max_position_embeddings")
    prepared = []  # (input ids, continuation ids) per request
    for context, continuation in requests:
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError("every request needs at least one context token and one continuation token")
        if len(continuation) > max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={max_length}")
        full = context + continuation
        prepared.append((full[-(max_length + 1) : -1], continuation))  # position p predicts full[p + 1]

    # longest first, so a batch holds sequences of similar length and padding stays small
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="zero-shot", unit="batch", disable=not progress_enabled(progress)):
                seq_len = len(prepared[batch[0]][0])
                # pad id 0 exists in every vocabulary; padding sits after each row's tokens, so
                # causal attention keeps it out of every scored position
                x = torch.zeros((len(batch), seq_len), dtype=torch.long)  # (B, T)
                for row, i in enumerate(batch):
                    x[row, : len(prepared[i][0])] = torch.tensor(prepared[i][0])
                # the first scored position of row i is len(input) - len(continuation)
                n_keep = max(seq_len - (len(prepared[i][0]) - len(prepared[i][1])) for i in batch)
                kw = {"logits_to_keep": n_keep} if keep_arg else {}
                logits = model(input_ids=x.to(device), use_cache=False, **kw).logits[:, -n_keep:]  # (B, n_keep, V)
                first_kept = seq_len - n_keep
                for row, i in enumerate(batch):
                    inputs, target = prepared[i]
                    a = len(inputs) - len(target) - first_kept
                    logp = torch.log_softmax(logits[row, a : a + len(target)].double(), dim=-1)  # (C, V)
                    target_t = torch.tensor(target, device=logp.device)
                    ll = logp.gather(-1, target_t[:, None]).sum().item()
                    results[i] = (ll, bool((logp.argmax(-1) == target_t).all()))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _encode_pairs(tokenizer, contexts: list[str], continuations: list[str]) -> list[tuple[list[int], list[int]]]:
    """lm-evaluation-harness's encoding: the continuation is the tail of encode(context + continuation)."""
    ctx = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    whole = tokenizer([c + k for c, k in zip(contexts, continuations)], add_special_tokens=False)["input_ids"]
    return [(c, w[len(c) :]) for c, w in zip(ctx, whole)]


def predict(
    model,
    tokenizer,
    tasks: dict[str, list],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool | None = None,
):
    """One row per example (a pandas DataFrame): task, example, doc_id, acc, acc_norm, target_loglik, chance.

    ``acc`` / ``acc_norm`` are 0/1 (``acc_norm`` is NaN for ``lastword``); ``target_loglik`` is the
    log-likelihood, in nats, of the correct continuation (the target word, or the true ending).
    """
    import pandas as pd

    contexts, continuations, owners = [], [], []  # owners[r] = (task, example index)
    for task, examples in tasks.items():
        if task not in TASK_NAMES:
            raise ValueError(f"unknown zero-shot task {task!r}; valid: {', '.join(TASK_NAMES)}")
        for k, ex in enumerate(examples):
            options = [ex.target] if task == "lastword" else list(ex.choices)
            for option in options:
                contexts.append(ex.context)
                continuations.append(" " + option)
                owners.append((task, k))
    scores = loglikelihoods(model, _encode_pairs(tokenizer, contexts, continuations), batch_size, max_length, progress)

    by_example: dict[tuple[str, int], list[int]] = {}
    for r, owner in enumerate(owners):
        by_example.setdefault(owner, []).append(r)
    rows = []
    for task, examples in tasks.items():
        for k, ex in enumerate(examples):
            rs = by_example[(task, k)]
            if task == "lastword":
                ll, greedy = scores[rs[0]]
                rows.append(
                    dict(
                        task=task,
                        example=k,
                        doc_id=ex.doc_id,
                        acc=float(greedy),
                        acc_norm=math.nan,
                        target_loglik=ll,
                        chance=0.0,
                    )
                )
                continue
            ll = np.array([scores[r][0] for r in rs])
            per_char = ll / np.array([len(continuations[r]) for r in rs])  # lm-eval's acc_norm: per character
            rows.append(
                dict(
                    task=task,
                    example=k,
                    doc_id=ex.doc_id,
                    acc=float(np.argmax(ll) == ex.label),
                    acc_norm=float(np.argmax(per_char) == ex.label),
                    target_loglik=float(ll[ex.label]),
                    chance=1.0 / len(ex.choices),
                )
            )
    return pd.DataFrame(rows)


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent examples."""
    return math.sqrt(p * (1.0 - p) / n)


def summarise(predictions):
    """Per task and metric: accuracy, stderr, n, chance and the mean log-likelihood of the correct answer."""
    import pandas as pd

    rows = []
    for task, df in predictions.groupby("task", sort=False):
        metrics = ("acc",) if task == "lastword" else ("acc", "acc_norm")
        for metric in metrics:
            p, n = float(df[metric].mean()), len(df)
            rows.append(
                dict(
                    task=task,
                    metric=metric,
                    accuracy=p,
                    stderr=binomial_stderr(p, n),
                    n=n,
                    chance=float(df["chance"].mean()),
                    mean_loglik=float(df["target_loglik"].mean()),
                )
            )
    return pd.DataFrame(rows, columns=["task", "metric", "accuracy", "stderr", "n", "chance", "mean_loglik"])


def evaluate(
    model,
    tokenizer,
    tasks: dict[str, list],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool | None = None,
    cache: bool = False,
):
    """Accuracy with its standard error per task and metric (a pandas DataFrame, see ``summarise``). With ``cache``
    the per-example predictions are remembered for this model, tokenizer and tasks (``eval.cache``)."""
    import pandas as pd

    from . import cache as eval_cache

    settings = {
        "tokenizer": [str(getattr(tokenizer, "name_or_path", "")), len(tokenizer)],
        "tasks": hashlib.blake2b(repr(sorted(tasks.items())).encode(), digest_size=20).hexdigest(),
        "max_length": max_length,
    }
    records = eval_cache.remember(
        "zeroshot",
        model if cache else None,
        settings,
        lambda: predict(model, tokenizer, tasks, batch_size, max_length, progress).to_dict("records"),
    )
    return summarise(pd.DataFrame(records))
