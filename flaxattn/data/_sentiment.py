"""A generated sentiment corpus whose sentiment-bearing tokens are known.

Each sentence has one opinion clause, built from a template with a positive or negative
word (adjective or verb), an optional negation that flips it ("not", "did not"), an optional
intensifier ("very", "truly") and neutral filler before and after ("to be honest", "we saw
it on sunday"). The label is the word's polarity, flipped by negation. Because the corpus is
generated, :func:`sentiment_batch` also returns per-token marks: 1 on the sentiment-bearing
words, so attention can be scored against them (and 2 on negations, which also matter).
"""

from __future__ import annotations

import numpy as np

from flaxattn.data._vocab import Vocab, in_test_split, pad_batch

POSITIVE_ADJ = (
    "good", "great", "excellent", "wonderful", "enjoyable", "brilliant", "delightful",
    "superb", "charming", "fun", "moving", "fantastic", "clever", "beautiful",
)  # fmt: skip
NEGATIVE_ADJ = (
    "bad", "terrible", "awful", "boring", "dull", "poor", "dreadful", "horrible",
    "disappointing", "weak", "mediocre", "annoying", "clumsy", "ugly",
)  # fmt: skip
# (past tense, base form after "did not")
POSITIVE_VERB = (("loved", "love"), ("liked", "like"), ("enjoyed", "enjoy"), ("admired", "admire"))
NEGATIVE_VERB = (("hated", "hate"), ("disliked", "dislike"), ("regretted", "regret"))
INTENSIFIERS = ("very", "really", "truly", "extremely", "quite", "so")
NOUNS = ("film", "movie", "plot", "acting", "script", "ending", "soundtrack", "cast", "story")
SUBJECTS = ("i", "we", "my friend", "the critic", "everyone")
FILLER_BEFORE = (
    "to be honest", "overall", "in my opinion", "after the first hour", "frankly",
    "as expected", "at the festival", "on sunday",
)  # fmt: skip
FILLER_AFTER = (
    "from start to finish", "we saw it on sunday", "with some friends", "at the cinema",
    "for two hours", "in the end", "this year", "on a rainy evening",
)  # fmt: skip
NEGATORS = ("not", "never", "did")  # "did not" marks both words

POSITIVE_WORDS = POSITIVE_ADJ + tuple(w for pair in POSITIVE_VERB for w in pair)
NEGATIVE_WORDS = NEGATIVE_ADJ + tuple(w for pair in NEGATIVE_VERB for w in pair)
MARK_NONE, MARK_SENTIMENT, MARK_NEGATION = 0, 1, 2
MAX_WORDS = 20


def sentiment_vocab() -> Vocab:
    """Word vocabulary of every word the generator can emit."""
    words: list[str] = []
    for group in (POSITIVE_ADJ, NEGATIVE_ADJ, INTENSIFIERS, NOUNS, SUBJECTS, FILLER_BEFORE,
                  FILLER_AFTER, NEGATORS):  # fmt: skip
        for phrase in group:
            words.extend(phrase.split())
    for past, base in POSITIVE_VERB + NEGATIVE_VERB:
        words += [past, base]
    words += ["the", "was", "is", "a", "and", "it", "did"]
    return Vocab.build(sorted(set(words)))


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def make_sentence(rng: np.random.Generator) -> tuple[list[str], list[int], int]:
    """One sentence: (words, marks, label) with label 1 positive, 0 negative."""
    positive = bool(rng.integers(2))
    negated = bool(rng.random() < 0.35)
    words: list[str] = []
    marks: list[int] = []

    def add(phrase: str, mark: int = MARK_NONE) -> None:
        for w in phrase.split():
            words.append(w)
            marks.append(mark)

    if rng.random() < 0.5:
        add(_choice(rng, FILLER_BEFORE))
    noun = _choice(rng, NOUNS)
    template = int(rng.integers(3))
    if template == 0:  # "the plot was (not) (very) good"
        add(f"the {noun} {_choice(rng, ('was', 'is'))}")
        if negated:
            add("not", MARK_NEGATION)
        if rng.random() < 0.5:
            add(_choice(rng, INTENSIFIERS))
        add(_choice(rng, POSITIVE_ADJ if positive else NEGATIVE_ADJ), MARK_SENTIMENT)
        if rng.random() < 0.3:  # a second word of the same polarity
            add("and")
            add(_choice(rng, POSITIVE_ADJ if positive else NEGATIVE_ADJ), MARK_SENTIMENT)
    elif template == 1:  # "we (really) (did not) loved/love the film"
        add(_choice(rng, SUBJECTS))
        past, base = _choice(rng, POSITIVE_VERB if positive else NEGATIVE_VERB)
        if negated:
            add("did not", MARK_NEGATION)
            add(base, MARK_SENTIMENT)
        else:
            if rng.random() < 0.5:
                add(_choice(rng, ("really", "truly")))
            add(past, MARK_SENTIMENT)
        add(f"the {noun}")
    else:  # "it was (never) a (truly) awful film"
        add("it was")
        if negated:
            add("never", MARK_NEGATION)
        add("a")
        if rng.random() < 0.5:
            add(_choice(rng, INTENSIFIERS))
        add(_choice(rng, POSITIVE_ADJ if positive else NEGATIVE_ADJ), MARK_SENTIMENT)
        add(noun)
    if rng.random() < 0.5:
        add(_choice(rng, FILLER_AFTER))
    return words, marks, int(positive != negated)


def sentiment_batch(
    batch_size: int,
    *,
    rng: np.random.Generator,
    vocab: Vocab,
    split: str = "train",
    test_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """A batch of generated sentences; held-out sentences never occur in training.

    Returns ``tokens [B, 20]``, ``lengths [B]``, ``labels [B]`` (1 positive) and ``marks
    [B, 20]`` (1 on sentiment-bearing words, 2 on negations, 0 elsewhere), all int32.
    """
    seqs, all_marks, labels = [], [], []
    while len(seqs) < batch_size:
        words, marks, label = make_sentence(rng)
        if in_test_split(" ".join(words), test_fraction) != (split == "test"):
            continue
        seqs.append(vocab.encode(words))
        all_marks.append(marks)
        labels.append(label)
    tokens, lengths = pad_batch(seqs, MAX_WORDS, vocab.pad_id)
    marks, _ = pad_batch(all_marks, MAX_WORDS, MARK_NONE)
    return dict(tokens=tokens, lengths=lengths, labels=np.asarray(labels, np.int32), marks=marks)
