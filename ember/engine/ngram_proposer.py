"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of the sequence's tail.

Code edits and completions copy long spans of their prompt; matching the last n tokens against the prompt
and output so far predicts those spans for free. No model, no torch.
"""
from __future__ import annotations


def propose_ngram(token_ids: list[int], min_n: int, max_n: int, num_tokens: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the most recent earlier match of the last n tokens,
    trying n = max_n down to min_n; [] if no suffix of at least min_n tokens recurs."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = token_ids[length - n:]
        first = tail[0]
        # Latest match first: recent context predicts the continuation best.
        for start in range(length - n - 1, -1, -1):
            if token_ids[start] == first and token_ids[start:start + n] == tail:
                return token_ids[start + n:start + n + num_tokens]
    return []
