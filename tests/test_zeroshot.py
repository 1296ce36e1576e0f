"""Zero-shot tasks from held-out text: how examples are built, how they are scored, what is reported."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import tiny_models
import torch
from torch import nn

from turbosparse_lib.eval import zeroshot
from turbosparse_lib.eval.zeroshot import (
    STOPWORDS,
    TASK_NAMES,
    ContinuationExample,
    LastWordExample,
    binomial_stderr,
    build_tasks,
    evaluate,
    loglikelihoods,
    predict,
    summarise,
)

N = 40  # examples per task in these tests: enough to cover many articles, a few seconds to score
N_ARTICLES = 250  # of the 787 held-out articles: about 300 lastword and 700 continuation candidates, built in < 1 s


@pytest.fixture(scope="module")
def documents(built_data):
    from turbosparse_lib.data.build import load_splits

    return zeroshot._as_documents(load_splits()["test"].select(range(N_ARTICLES)))


@pytest.fixture(scope="module")
def tasks(documents):
    return build_tasks(N, seed=0, documents=documents)


@pytest.fixture(scope="module")
def tokenizer(built_data):
    from turbosparse_lib.data.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_models.ours("drelu", seed=0, vocab_size=8192, context_length=256)


# --- building ----------------------------------------------------------------------------------


def test_building_is_deterministic_and_nested(documents, tasks):
    assert build_tasks(N, seed=0, documents=documents) == tasks
    assert build_tasks(N, seed=1, documents=documents) != tasks
    smaller = build_tasks(N // 2, seed=0, documents=documents)
    for name in TASK_NAMES:  # fewer examples: a prefix of more, with the same distractors
        assert smaller[name] == tasks[name][: N // 2]
    # one task alone: the same examples as when built beside the other
    assert build_tasks(N, ["continuation"], seed=0, documents=documents) == {"continuation": tasks["continuation"]}


def test_lastword_target_is_the_passage_last_word(documents, tasks):
    text_of = dict(documents)
    examples = tasks["lastword"]
    assert len(examples) == N and all(isinstance(ex, LastWordExample) for ex in examples)
    for ex in examples:
        assert ex.passage.split()[-1] == ex.target
        assert ex.context.split()[-1] != ex.target and ex.context == ex.context.rstrip()
        # the selection rule of the module docstring
        assert ex.target.isalpha() and len(ex.target) >= 3 and ex.target.lower() not in STOPWORDS
        assert ex.target.lower() in ex.context.lower()
        assert 50 <= len(ex.passage.split()) <= 150
        # the passage is the source text, cut just before the sentence's final punctuation
        start = text_of[ex.doc_id].index(ex.context)
        rest = text_of[ex.doc_id][start + len(ex.context) :]
        assert rest.startswith(" " + ex.target) and rest[len(ex.target) + 1] in ".!?\"'”’)"


def test_continuation_holds_the_true_ending_once(documents, tasks):
    text_of = dict(documents)
    examples = tasks["continuation"]
    assert len(examples) == N and all(isinstance(ex, ContinuationExample) for ex in examples)
    # the distractor pool: every window's true ending, binned by length
    windows = [w for doc_id, text in documents for w in zeroshot._continuation_windows(doc_id, text, 3)]
    bins = zeroshot.length_bins([len(ending) for _, _, ending in windows])
    bin_of = {ending: b for (_, _, ending), b in zip(windows, bins)}
    labels = set()
    for ex in examples:
        assert len(ex.choices) == 4 and len(set(ex.choices)) == 4
        true = ex.choices[ex.label]
        labels.add(ex.label)
        # the true ending follows the context in its article; the distractors come from elsewhere
        text = text_of[ex.doc_id]
        after = text[text.index(ex.context) + len(ex.context) :].lstrip()
        assert after.startswith(true)
        assert sum(choice in text for choice in ex.choices) == 1
        assert len({bin_of[choice] for choice in ex.choices}) == 1  # one length bin, so length tells nothing
    assert len(labels) > 1  # the true ending's position is drawn, not always the same


def test_sentence_splitting_keeps_abbreviations_whole():
    line = 'Dr. J. Smith moved to the U.S. Army in 1950. He left! "Why?" she asked. Then 3 more came.'
    sentences = [line[a:b] for a, b in zeroshot.split_sentences(line)]
    assert sentences == [
        "Dr. J. Smith moved to the U.S. Army in 1950.",
        "He left!",
        '"Why?" she asked.',
        "Then 3 more came.",
    ]


def test_headings_end_sections():
    text = (
        "One two three four five six seven eight. Nine ten eleven twelve thirteen.\nA heading.\n"
        "Fourteen fifteen sixteen seventeen eighteen nineteen twenty twentyone."
    )
    secs = zeroshot.sections(text)
    assert [[text[a:b] for a, b in s] for s in secs] == [
        ["One two three four five six seven eight.", "Nine ten eleven twelve thirteen."],
        ["Fourteen fifteen sixteen seventeen eighteen nineteen twenty twentyone."],
    ]


def test_clear_errors(documents, tiny_model, tokenizer):
    with pytest.raises(ValueError, match="valid: lastword, continuation"):
        build_tasks(5, ["lambada"], documents=documents)
    with pytest.raises(ValueError, match="give only"):
        build_tasks(10**6, ["lastword"], documents=documents)
    with pytest.raises(ValueError, match="valid: lastword, continuation"):
        predict(tiny_model, tokenizer, {"hellaswag": []})


# --- reporting ---------------------------------------------------------------------------------


def test_binomial_stderr_and_summary():
    assert binomial_stderr(0.5, 100) == pytest.approx(0.05)
    assert binomial_stderr(0.0, 10) == 0.0 and binomial_stderr(1.0, 10) == 0.0
    pred = pd.DataFrame(
        dict(
            task=["lastword"] * 4 + ["continuation"] * 5,
            acc=[1, 0, 0, 0] + [1, 1, 0, 1, 0],
            acc_norm=[math.nan] * 4 + [1, 1, 1, 1, 0],
            target_loglik=[-1, -2, -3, -4] + [-10] * 5,
            chance=[0.0] * 4 + [0.25] * 5,
        )
    )
    s = summarise(pred).set_index(["task", "metric"])
    assert list(s.index) == [("lastword", "acc"), ("continuation", "acc"), ("continuation", "acc_norm")]
    assert s.loc[("lastword", "acc"), "accuracy"] == 0.25 and s.loc[("lastword", "acc"), "n"] == 4
    assert s.loc[("lastword", "acc"), "stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert s.loc[("lastword", "acc"), "mean_loglik"] == -2.5
    assert s.loc[("continuation", "acc_norm"), "accuracy"] == 0.8
    assert s.loc[("continuation", "acc_norm"), "stderr"] == pytest.approx(math.sqrt(0.8 * 0.2 / 5))
    assert s.loc[("continuation", "acc"), "chance"] == 0.25


# --- scoring -----------------------------------------------------------------------------------


def test_loglikelihood_matches_one_unpadded_forward(tiny_model):
    torch.manual_seed(0)
    requests = [
        (torch.randint(0, 8192, (n,)).tolist(), torch.randint(0, 8192, (c,)).tolist())
        for n, c in [(7, 1), (30, 3), (12, 2), (3, 5)]
    ]
    reference = []
    for context, continuation in requests:
        full = torch.tensor(context + continuation)
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(full[None, :-1]).logits[0].double(), -1)  # (T, V)
        scored = logp[-len(continuation) :]
        target = torch.tensor(continuation)
        reference.append((scored.gather(-1, target[:, None]).sum().item(), bool((scored.argmax(-1) == target).all())))
    for batch_size in (1, 3):  # padding and batch composition do not change a request's score
        got = loglikelihoods(tiny_model, requests, batch_size=batch_size, progress=False)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got, reference):
            assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy


def test_context_is_truncated_on_the_left(tiny_model):
    context, continuation = list(range(10, 40)), [5, 6]
    short = loglikelihoods(tiny_model, [(context[-6:], continuation)], progress=False)
    truncated = loglikelihoods(tiny_model, [(context, continuation)], max_length=7, progress=False)
    assert truncated[0][0] == pytest.approx(short[0][0], abs=1e-6)  # 5 context + 2 continuation tokens, less the last
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihoods(tiny_model, [(context, continuation)], max_length=1, progress=False)


class FavouriteTokenModel(nn.Module):
    """Predicts ``favourite`` with near certainty at every position, whatever the input."""

    def __init__(self, favourite: int, vocab_size: int = 8192):
        super().__init__()
        self.favourite, self.vocab_size = favourite, vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the scorer a device to read
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab_size)
        logits[..., self.favourite] = 30.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_a_model_that_knows_the_answer_scores_it(tokenizer):
    """End to end through tokenisation, labels and option order, with a model whose answer is known."""
    favourite = tokenizer(" dog", add_special_tokens=False)["input_ids"]
    assert len(favourite) == 1  # one token in our BPE, so the model's favourite is the whole word
    model = FavouriteTokenModel(favourite[0])
    context = "The animal in the yard barked at the postman. It was a"
    tasks = {
        "lastword": [LastWordExample("a", context, "dog"), LastWordExample("b", context, "cat")],
        "continuation": [
            ContinuationExample("c", context, ("small cat.", "dog", "long sentence about nothing."), 1),
            ContinuationExample("d", context, ("dog", "cat"), 1),
        ],
    }
    pred = predict(model, tokenizer, tasks, progress=False)
    assert pred["acc"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert pred["acc_norm"].tolist()[2:] == [1.0, 0.0]
    assert pred["target_loglik"].iloc[0] == pytest.approx(0.0, abs=1e-9)  # the favourite has probability ~1
    assert pred["chance"].tolist() == [0.0, 0.0, 1 / 3, 1 / 2]


def test_random_model_on_real_tasks(tiny_model, tokenizer, tasks):
    n = 16  # of the N examples: enough to check the bookkeeping, fast enough to score twice
    tasks = {name: examples[:n] for name, examples in tasks.items()}
    table = evaluate(tiny_model, tokenizer, tasks, batch_size=16, max_length=128, progress=False)
    assert list(table.columns) == ["task", "metric", "accuracy", "stderr", "n", "chance", "mean_loglik"]
    assert table[["task", "metric"]].values.tolist() == [
        ["lastword", "acc"],
        ["continuation", "acc"],
        ["continuation", "acc_norm"],
    ]
    assert (table["n"] == n).all() and table["accuracy"].between(0, 1).all()
    assert table["chance"].tolist() == [0.0, 0.25, 0.25]
    assert (table["mean_loglik"] < 0).all()
    again = evaluate(tiny_model, tokenizer, tasks, batch_size=16, max_length=128, progress=False)
    pd.testing.assert_frame_equal(table, again)  # same examples, same numbers


@pytest.mark.slow
def test_smollm2_is_well_above_chance(built_data, documents):
    """A real model, SmolLM2-135M, on 12 examples per task (8,000 tokens: under a minute on 2 busy cores).

    On 100 examples of the full test split it scored lastword 0.46, continuation acc_norm 0.64;
    the bounds sit between those and chance (0 and 0.25), with room for 12 examples' noise.
    """
    from turbosparse_lib.models.pretrained import load_smollm2

    model, tok = load_smollm2()
    table = evaluate(model, tok, build_tasks(12, seed=0, documents=documents), progress=False)
    acc = table.set_index(["task", "metric"])["accuracy"]
    assert acc[("lastword", "acc")] >= 0.15
    assert acc[("continuation", "acc_norm")] >= 0.4
