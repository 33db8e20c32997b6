"""flaxattn.data: deterministic task generators, vocabularies and tokenisers (numpy only).

Every generator takes a ``numpy.random.Generator``; :func:`make_rng` derives one from a seed
and stream labels (e.g. ``make_rng(seed, "train", step)``), so a batch is a pure function of
the seed and its step and a resumed run sees exactly the batches it would have seen.
Held-out examples are split off by content, so they never occur in training.
"""

from flaxattn.data._dates import (
    DAY,
    FIELD_NAMES,
    MAX_SOURCE_LEN,
    MONTH,
    NUM_FORMATS,
    OTHER,
    TARGET_LEN,
    YEAR,
    date_batch,
    date_vocab,
    format_date,
)
from flaxattn.data._images import (
    cluttered_batch,
    digits_batch,
    digits_split,
    digits_test_set,
)
from flaxattn.data._regression import leave_one_out, nadaraya_watson_data, regression_target
from flaxattn.data._sentiment import (
    MARK_NEGATION,
    MARK_NONE,
    MARK_SENTIMENT,
    MAX_WORDS,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    make_sentence,
    sentiment_batch,
    sentiment_vocab,
)
from flaxattn.data._sequences import (
    SEQUENCE_TASKS,
    expected_source_position,
    sequence_batch,
    symbol_vocab,
)
from flaxattn.data._text import (
    CharCorpus,
    char_windows,
    default_text_paths,
    load_text,
    sequential_windows,
)
from flaxattn.data._vocab import (
    SPECIALS,
    Vocab,
    char_tokenize,
    in_test_split,
    make_rng,
    pad_batch,
    word_tokenize,
)

__all__ = [
    "digits_test_set",
    "digits_split",
    "digits_batch",
    "cluttered_batch",
    "DAY",
    "FIELD_NAMES",
    "MARK_NEGATION",
    "MAX_SOURCE_LEN",
    "MARK_NONE",
    "MARK_SENTIMENT",
    "MAX_WORDS",
    "NEGATIVE_WORDS",
    "POSITIVE_WORDS",
    "MONTH",
    "NUM_FORMATS",
    "OTHER",
    "SEQUENCE_TASKS",
    "SPECIALS",
    "TARGET_LEN",
    "YEAR",
    "CharCorpus",
    "Vocab",
    "char_tokenize",
    "char_windows",
    "date_batch",
    "date_vocab",
    "default_text_paths",
    "expected_source_position",
    "format_date",
    "in_test_split",
    "leave_one_out",
    "load_text",
    "make_rng",
    "make_sentence",
    "nadaraya_watson_data",
    "pad_batch",
    "regression_target",
    "sentiment_batch",
    "sentiment_vocab",
    "sequence_batch",
    "sequential_windows",
    "symbol_vocab",
    "word_tokenize",
]
