"""flaxattn.data: deterministic generators, held-out splits, known alignments and marks."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from flaxattn import data


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_vocab_round_trip_and_specials():
    vocab = data.Vocab.build("abca")
    assert vocab.tokens == (*data.SPECIALS, "a", "b", "c")
    ids = vocab.encode("cab?")
    assert ids == [6, 4, 5, vocab.unk_id]
    assert vocab.decode([vocab.bos_id, 4, 5, vocab.eos_id, 6]) == ["a", "b"]
    assert vocab.decode([4, vocab.pad_id], strip=False) == ["a", "<pad>"]
    with pytest.raises(ValueError, match="must start with"):
        data.Vocab(("a", "b"))


def test_pad_batch_and_too_long():
    ids, lengths = data.pad_batch([[1, 2], [3]], 3)
    np.testing.assert_array_equal(ids, [[1, 2, 0], [3, 0, 0]])
    np.testing.assert_array_equal(lengths, [2, 1])
    with pytest.raises(ValueError, match="width 1"):
        data.pad_batch([[1, 2]], 1)


def test_make_rng_depends_only_on_seed_and_stream():
    a = data.make_rng(3, "train", 7).integers(0, 1 << 30, 4)
    b = data.make_rng(3, "train", 7).integers(0, 1 << 30, 4)
    c = data.make_rng(3, "train", 8).integers(0, 1 << 30, 4)
    d = data.make_rng(3, "eval").integers(0, 1 << 30, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


@pytest.mark.parametrize("task", data.SEQUENCE_TASKS)
def test_sequence_batches(task):
    vocab = data.symbol_vocab(8)
    kw = dict(vocab=vocab, min_len=2, max_len=6)
    b = data.sequence_batch(task, 32, rng=data.make_rng(0, "t"), **kw)
    assert _same(b, data.sequence_batch(task, 32, rng=data.make_rng(0, "t"), **kw))
    assert b["src"].shape == (32, 6) and b["tgt_in"].shape == b["tgt_out"].shape == (32, 7)
    for i in range(32):
        n = b["src_lengths"][i]
        x = b["src"][i, :n].tolist()
        y = {"copy": x, "reverse": x[::-1], "sort": sorted(x)}[task]
        assert b["tgt_out"][i, : n + 1].tolist() == [*y, vocab.eos_id]
        assert b["tgt_in"][i, : n + 1].tolist() == [vocab.bos_id, *y]
        assert b["tgt_lengths"][i] == n + 1
        expected = data.expected_source_position(task, b["src"], b["src_lengths"])[i]
        assert [x[j] for j in expected[:n]] == y and (expected[n:] == -1).all()


def test_held_out_split_is_disjoint_by_content():
    vocab = data.symbol_vocab(4)
    kw = dict(vocab=vocab, min_len=3, max_len=3)
    train = data.sequence_batch("copy", 400, rng=data.make_rng(0, "a"), **kw)
    test = data.sequence_batch("copy", 100, rng=data.make_rng(0, "b"), split="test", **kw)
    as_set = lambda b: {tuple(r) for r in b["src"].tolist()}
    assert not as_set(train) & as_set(test)


def test_date_formats_normalise_and_mark_fields():
    d = dt.date(2026, 11, 21)
    texts = {data.format_date(d, f)[0] for f in range(data.NUM_FORMATS)}
    for expected in ("21 November 2026", "11/21/26", "Nov 21, 2026", "2026.11.21",
                     "Saturday, 21 Nov 2026"):  # fmt: skip
        assert expected in texts
    for f in range(data.NUM_FORMATS):
        text, fields = data.format_date(d, f)
        assert len(text) == len(fields) <= data.MAX_SOURCE_LEN
        year = "".join(c for c, k in zip(text, fields, strict=True) if k == data.YEAR)
        assert year in ("2026", "26")
        day = "".join(c for c, k in zip(text, fields, strict=True) if k == data.DAY)
        assert day.startswith("21")
    vocab = data.date_vocab()
    b = data.date_batch(16, rng=data.make_rng(1, "d"), vocab=vocab)
    for i in range(16):
        iso = "".join(vocab.decode(b["tgt_out"][i]))
        assert dt.date.fromisoformat(iso)
        src = "".join(vocab.decode(b["src"][i]))
        assert src == data.format_date(dt.date.fromisoformat(iso), int(b["fmt"][i]))[0]
    assert b["tgt_fields"][0, :10].tolist() == [1, 1, 1, 1, 0, 2, 2, 0, 3, 3]


def test_sentiment_labels_follow_polarity_and_negation():
    rng = data.make_rng(0, "s")
    for _ in range(300):
        words, marks, label = data.make_sentence(rng)
        polar = [w for w, m in zip(words, marks, strict=True) if m == data.MARK_SENTIMENT]
        assert polar, words
        positive = polar[0] in data.POSITIVE_WORDS
        assert all((w in data.POSITIVE_WORDS) == positive for w in polar)
        negated = data.MARK_NEGATION in marks
        assert label == int(positive != negated), words
    vocab = data.sentiment_vocab()
    b = data.sentiment_batch(64, rng=data.make_rng(0, "s"), vocab=vocab)
    assert b["tokens"].shape == b["marks"].shape == (64, data.MAX_WORDS)
    assert ((b["marks"] > 0) <= (np.arange(data.MAX_WORDS) < b["lengths"][:, None])).all()
    assert vocab.unk_id not in b["tokens"]
    assert 0.3 < b["labels"].mean() < 0.7


def test_default_text_is_stdlib_and_windows_shift_by_one(tmp_path):
    paths = data.default_text_paths()
    assert paths and all(p.suffix == ".py" for p in paths)
    corpus = data.CharCorpus.from_text(data.load_text(max_chars=5000))
    assert len(corpus.train_ids) + len(corpus.val_ids) == 5000
    w = data.char_windows(corpus.train_ids, 4, 16, rng=data.make_rng(0, "w"))
    np.testing.assert_array_equal(w["inputs"][:, 1:], w["targets"][:, :-1])
    f = tmp_path / "t.txt"
    f.write_text("hello world", encoding="utf-8")
    small = data.CharCorpus.from_text(data.load_text(f))
    v = data.sequential_windows(small.val_ids, 8, 4)
    assert v["lengths"].tolist() == [1]  # a 2-character validation split: one target
    with pytest.raises(ValueError, match="fewer than 2"):
        data.load_text(f, max_chars=1)


def test_nadaraya_watson_data_and_leave_one_out():
    d = data.nadaraya_watson_data(10, 5, rng=data.make_rng(0, "nw"))
    assert (np.diff(d["x_train"]) >= 0).all()
    np.testing.assert_allclose(d["y_test"], data.regression_target(d["x_test"]), rtol=1e-6)
    keys, values = data.leave_one_out(d["x_train"], d["y_train"])
    assert keys.shape == values.shape == (10, 9)
    for i in range(10):
        np.testing.assert_array_equal(keys[i], np.delete(d["x_train"], i))
