"""Post-processing of an editor completion's text: where it should stop and what it may show yet.

Editors want a completion that ends at a line or block boundary and does not retype what already
follows the cursor. `CompletionTrimmer` looks at the whole generated text each time it grows and says
how much of it can be delivered now (holding back what a later rule might still remove) and whether the
completion is complete.
"""
from __future__ import annotations


class CompletionTrimmer:
    def __init__(self, suffix: str = "", n_indent: int = 0, single_line: bool = False, stop_at_suffix_line: bool = False):
        self.n_indent = n_indent
        self.single_line = single_line
        # The suffix's first line with text. A model that saw the suffix (FIM) may legitimately write the
        # same line (a closing brace of its own), so a whole line is only cut for prefix-only prompts.
        self.suffix_line = next((line.strip() for line in suffix.split("\n") if line.strip()), "")
        self.stop_at_suffix_line = stop_at_suffix_line and bool(self.suffix_line)
        # What directly follows the cursor: a completion line ending with it (`a, b)` before `)`) retypes it.
        self.suffix_head = suffix.split("\n", 1)[0].strip()

    def feed(self, text: str, is_final: bool) -> tuple[int, bool]:
        """(how many characters of `text` to deliver, whether the completion is complete).

        `text` is everything generated so far; `is_final` says the generation ended. Once complete,
        the length is the trimmed completion; before, it holds back a tail that trimming could remove.
        """
        cut = self._cut(text)
        if cut is not None:
            return self._trimmed(text[:cut]), True
        if is_final:
            return self._trimmed(text), True
        return self._held_back(text), False

    def _cut(self, text: str) -> int | None:
        """Where a line rule ends the completion, if one does."""
        line_start = 0
        has_text = False
        while True:
            newline = text.find("\n", line_start)
            line = text[line_start:] if newline == -1 else text[line_start:newline]
            is_complete = newline != -1
            if line.strip():
                if self.stop_at_suffix_line and is_complete and line.strip() == self.suffix_line:
                    return line_start
                if self.n_indent and line_start > 0 and _indent(line) < self.n_indent:
                    return line_start  # llama.cpp's n_indent: a line indented less than the block ends it
                if self.single_line and is_complete and not has_text:
                    return newline
                has_text = True
            if not is_complete:
                return None
            line_start = newline + 1

    def _trimmed(self, text: str) -> int:
        """Length of `text` without trailing whitespace and without a tail that retypes the suffix."""
        text = text.rstrip()
        last_line_start = text.rfind("\n") + 1
        last_line = text[last_line_start:].strip()
        if self.stop_at_suffix_line and last_line == self.suffix_line:
            return len(text[:last_line_start].rstrip())
        if self.suffix_head and last_line.endswith(self.suffix_head) and last_line != self.suffix_head:
            return len(text[: len(text) - len(self.suffix_head)].rstrip())
        return len(text)

    def _held_back(self, text: str) -> int:
        """Like `_trimmed`, and also without the unfinished last line's tail that may still grow into
        the suffix's first line or its head."""
        end = self._trimmed(text)
        last_line_start = text.rfind("\n") + 1
        partial = text[last_line_start:]
        if self.stop_at_suffix_line and partial.strip() and self.suffix_line.startswith(partial.strip()):
            return min(end, len(text[:last_line_start].rstrip()))
        for size in range(min(len(partial), len(self.suffix_head)), 0, -1):
            if partial.endswith(self.suffix_head[:size]):
                return min(end, len(text[: len(text) - size].rstrip()))
        return end


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))
