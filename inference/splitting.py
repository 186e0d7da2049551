"""Cut a text that is too long for the model into pieces that fit: at sentence ends first, then by token count.

Sentence ends are the Chinese 。！？； (full-width, so nothing has to follow them) and the English . ! ? ; when
whitespace or the end of the text follows (so "3.5" and "file.txt" stay whole). Closing quotes and brackets stay
with the sentence they close. A single sentence that is still over the limit is cut at the longest prefix that
fits, at its last space or comma when it has one, so that English words stay whole. Cuts are made in the text, never
in token ids, so no piece starts or ends inside a character that the tokenizer spelled in bytes.
"""

from __future__ import annotations

import re
from typing import Callable

SENTENCE_END = re.compile(r"[。！？；]+[\"'”’」』）】]*|[.!?;]+[\"'”’)\]]*(?=\s|$)")
SOFT_BREAK = re.compile(r"\s|[,，、:：]")  # where a hard cut may fall without splitting a word


def sentences(text: str) -> list[str]:
    """The sentences of text, stripped, in order; empty ones dropped."""
    pieces, start = [], 0
    for match in SENTENCE_END.finditer(text):
        pieces.append(text[start:match.end()])
        start = match.end()
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def longest_prefix(text: str, count: Callable[[str], int], limit: int) -> str:
    """The longest prefix with at most `limit` tokens, ended at its last soft break when it has one.

    At least one character, so that cutting always moves on; a piece that still does not fit (a character
    spelled in more bytes than the limit) is then refused by the caller's own length check.
    """
    low, high = 1, len(text)  # count(text[:low]) <= limit is assumed; binary search for the largest such end
    while low < high:
        middle = (low + high + 1) // 2
        if count(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    if low == len(text):
        return text
    # a space is dropped at the cut, a comma stays with the words before it
    cuts = [m.start() if m.group().isspace() else m.end() for m in SOFT_BREAK.finditer(text, 1, low + 1)]
    return text[:max([c for c in cuts if c <= low], default=low)]


def split_to_fit(text: str, count: Callable[[str], int], limit: int) -> list[str]:
    """text as pieces of at most `limit` tokens each (by `count`): sentences, long ones cut further."""
    pieces = []
    for sentence in sentences(text):
        while count(sentence) > limit:
            head = longest_prefix(sentence, count, limit)
            pieces.append(head.strip())
            sentence = sentence[len(head):].strip()
        if sentence:
            pieces.append(sentence)
    return pieces
