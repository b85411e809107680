"""Incremental detokenisation and stop strings, with a byte-level tokenizer whose pieces can split
a UTF-8 character (as sentencepiece byte fallback does)."""

from __future__ import annotations

from tpserve.engine.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Token id = one byte value + 3; ids 0-2 are special (unk, bos, eos)."""

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


TOK = ByteTokenizer()


def stream(text, stop=(), prompt="p"):
    d = IncrementalDetokenizer(TOK, TOK.encode(prompt), list(stop))
    deltas = []
    for t in TOK.encode(text):
        d.add([t])
        deltas.append(d.delta(finished=d.stopped_by is not None))
        if d.stopped_by:
            break
    else:
        deltas.append(d.delta(finished=True))
    return d, deltas


def test_multibyte_characters_never_emit_replacement_chars():
    text = "héllo wörld 你好 🙂 done"
    d, deltas = stream(text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)


def test_stop_string_across_token_boundaries_is_trimmed():
    d, deltas = stream("value = 1\nEND of text", stop=["\nEND"])
    assert d.stopped_by == "\nEND"
    assert d.text == "value = 1"
    assert "".join(deltas) == "value = 1"


def test_streamed_text_never_contains_part_of_a_stop_string():
    d, deltas = stream("abcXYZdef", stop=["XYZ", "zzzz"])
    assert d.text == "abc" and "".join(deltas) == "abc"
    assert not any("X" in x for x in deltas)


def test_earliest_stop_string_wins():
    d, _ = stream("one two three", stop=["three", "two"])
    assert d.text == "one " and d.stopped_by == "two"


def test_stop_string_not_matched_when_checking_disabled():
    d = IncrementalDetokenizer(TOK, [], ["a"])
    d.add(TOK.encode("xa"), check_stop=False)
    assert d.stopped_by is None and d.text == "xa"
    d.add(TOK.encode("b"))
    assert d.stopped_by is None  # "a" was before this token's window
