"""A CLIP tokenizer built without downloads: byte-level, plus whole-word tokens where asked.

transformers' ``CLIPTokenizer(vocab=dict, merges=list, model_max_length=77)`` builds one offline (the
``vocab_file=``/``merges_file=`` keyword arguments are ignored there). The base vocabulary is the 256 byte
characters, their 256 end-of-word variants and bos/eos, with no merges; ``words`` adds whole-word tokens
with the merges that build them.
"""

from __future__ import annotations

from typing import Any

_TOKENIZER_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP convention)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def byte_level_clip_tokenizer(model_max_length: int = 77, words: list[str] | None = None) -> Any:
    """A ``CLIPTokenizer`` built without downloads.

    The base vocabulary is the 256 byte characters, their 256 end-of-word variants and bos/eos, with no
    merges, so every word is spelled out character by character. ``words`` adds whole-word tokens with
    the merges that build them (every intermediate piece is added to the vocabulary too).
    """
    from transformers import CLIPTokenizer

    characters = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in characters + [c + "</w>" for c in characters]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    # Each word is first split the way BPE would split it with the merges so far, then joined left to
    # right by new merges. The new merges rank after every earlier one, so the words already added keep
    # tokenizing whole whatever the order (a plain character chain fails: "and"'s a+n, applied first,
    # split "orange"). Words are taken in the order given, which fixes the token ids.
    for word in dict.fromkeys(words or []):
        pieces = _bpe_pieces(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in ranks:
                ranks[(pieces[0], pieces[1])] = len(merges)
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for special in _TOKENIZER_SPECIALS:
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _bpe_pieces(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply byte-pair merges as BPE does: always the lowest-ranked adjacent pair, every occurrence."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), pair) for pair in zip(pieces, pieces[1:])]
        rank, (first, second) = min(pairs)
        if rank == len(ranks):
            break
        joined: list[str] = []
        index = 0
        while index < len(pieces):
            if index + 1 < len(pieces) and pieces[index] == first and pieces[index + 1] == second:
                joined.append(first + second)
                index += 2
            else:
                joined.append(pieces[index])
                index += 1
        pieces = joined
    return pieces


__all__ = ["byte_level_clip_tokenizer"]
