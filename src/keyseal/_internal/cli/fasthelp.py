"""`keyseal --help` without click: the group's help rendered from cli.commands, laid out as click lays it
out (tests/test_startup.py holds the two equal at every width click uses).

Importing click and building the group costs more than the rest of the process; the help is a table. This module
imports nothing beyond `os` and `sys` (no textwrap: it pulls in `re`), so it wraps text itself, following the
rules of the `textwrap` calls click makes: words at spaces and after a hyphen inside a word (`envelope-`,
`wrapped`), long words cut, and `...` where click shortens a command's help to fit its line.
"""

from __future__ import annotations

import os
import sys

from keyseal._internal.cli.commands import COMMANDS, GROUP_HELP, QUIET_HELP, SHORT_HELP, VERBOSE_HELP

__all__ = ["group_help", "help_width", "short_help"]

# The group's options as click lists them: version, -v, -q, then the help option (click adds it last).
_OPTIONS = (
    ("--version", "Show the version and exit."),
    ("-v, --verbose", VERBOSE_HELP),
    ("-q, --quiet", QUIET_HELP),
    ("-h, --help", "Show this message and exit."),
)
_MAX_WIDTH = 80  # click's default max_width
_COL_MAX = 30  # click's write_dl defaults
_COL_SPACING = 2


def help_width() -> int:
    """click's help width: the terminal's columns (COLUMNS first, as shutil.get_terminal_size reads them) capped
    at 80, less 2, and never below 50."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
        columns = columns or 80
    return max(min(columns, _MAX_WIDTH) - 2, 50)


def _is_word(char: str) -> bool:
    """`\\w`: a letter, digit or underscore."""
    return char.isalnum() or char == "_"


def _is_letter(char: str) -> bool:
    """`[^\\d\\W]` in textwrap's expressions: a word character that is not a digit."""
    return _is_word(char) and not char.isdigit()


def _is_word_punct(char: str) -> bool:
    return _is_word(char) or char in "!\"'&.,?"


def _letter_at(word: str, index: int) -> bool:
    return 0 <= index < len(word) and _is_letter(word[index])


def _dashes_then_word(word: str, index: int) -> int:
    """The length of a run of two or more hyphens at `index` followed by a word character (an em-dash), else 0."""
    end = index
    while end < len(word) and word[end] == "-":
        end += 1
    return end - index if end - index >= 2 and end < len(word) and _is_word(word[end]) else 0


def _split_word(word: str) -> list[str]:
    """A word cut into textwrap's chunks (its `wordsep_re`, within one word): after a hyphen preceded by two
    letters (or letter, hyphen, letter) and followed by a letter, an optional hyphen and a letter; and around an
    em-dash (two or more hyphens) between word characters."""
    if "-" not in word:
        return [word]
    pieces: list[str] = []
    start = 0
    while start < len(word):
        if start > 0 and _is_word_punct(word[start - 1]) and (dashes := _dashes_then_word(word, start)):
            pieces.append(word[start:start + dashes])
            start += dashes
            continue
        end = start + 1
        while end < len(word):
            if word[end] == "-" and (
                    (_letter_at(word, end - 2) and _letter_at(word, end - 1))
                    or (_letter_at(word, end - 3) and word[end - 2] == "-" and _letter_at(word, end - 1))) and (
                    _letter_at(word, end + 1) and (_letter_at(word, end + 2) or (
                        end + 2 < len(word) and word[end + 2] == "-" and _letter_at(word, end + 3)))):
                end += 1  # the hyphen ends this chunk
                break
            if _is_word_punct(word[end - 1]) and _dashes_then_word(word, end):
                break
            end += 1
        pieces.append(word[start:end])
        start = end
    return pieces


def _chunks(text: str, hyphens: bool) -> list[str]:
    """Runs of spaces and words (cut at hyphens when `hyphens`), in order."""
    chunks: list[str] = []
    index = 0
    while index < len(text):
        end = index
        space = text[index] == " "
        while end < len(text) and (text[end] == " ") == space:
            end += 1
        piece = text[index:end]
        chunks += [piece] if space or not hyphens else _split_word(piece)
        index = end
    return chunks


def wrap(text: str, width: int, initial_indent: str = "", subsequent_indent: str = "") -> list[str]:
    """click's wrap_text for one paragraph of one line: textwrap's greedy fill, spaces dropped at line ends."""
    chunks = _chunks(text.expandtabs(), hyphens=True)
    chunks.reverse()
    lines: list[str] = []
    while chunks:
        indent = subsequent_indent if lines else initial_indent
        room = width - len(indent)
        if lines and not chunks[-1].strip():
            chunks.pop()
        line: list[str] = []
        length = 0
        while chunks and length + len(chunks[-1]) <= room:
            length += len(chunks[-1])
            line.append(chunks.pop())
        if chunks and len(chunks[-1]) > room:  # a word longer than a line: cut it (click's long-word rule)
            cut = max(room - length, 1)
            line.append(chunks[-1][:cut])
            chunks[-1] = chunks[-1][cut:]
        if line and not line[-1].strip():
            line.pop()
        if line:
            lines.append(indent + "".join(line))
    return lines


def short_help(text: str, limit: int) -> str:
    """click's short help of a command whose help is `text`, for a line of `limit` characters: the first
    sentence, shortened with `...` at a word boundary if it does not fit."""
    words = text.partition("\n\n")[0].split()
    if words and words[0] == "\b":
        words = words[1:]
    if not words:
        return ""
    last = len(words) - 1
    for index, word in enumerate(words):
        if word.endswith(".") and (index == last or not words[index + 1][0].islower()):
            words = words[: index + 1]
            break
    joined = " ".join(words)
    if len(joined) <= limit:
        return joined
    if limit < 3:
        return "..."
    return _shorten(joined, limit).strip()


def _shorten(text: str, width: int) -> str:
    """textwrap.shorten(text, width, placeholder="...", break_on_hyphens=False) for text of single spaces."""
    chunks = _chunks(text, hyphens=False)
    chunks.reverse()
    line: list[str] = []
    length = 0
    while chunks and length + len(chunks[-1]) <= width:
        length += len(chunks[-1])
        line.append(chunks.pop())
    if chunks and len(chunks[-1]) > width:
        cut = width - length
        line.append(chunks[-1][:cut])
        length += cut
    if line and not line[-1].strip():
        length -= len(line.pop())
    while line:
        if line[-1].strip() and length + 3 <= width:
            return "".join(line) + "..."
        length -= len(line.pop())
    return "..."


def _definition_list(rows: list[tuple[str, str]], width: int, indent: int) -> list[str]:
    """click's write_dl: terms in a first column (at most 30 wide), text wrapped beside them."""
    first_col = min(max(len(term) for term, _ in rows), _COL_MAX) + _COL_SPACING
    out: list[str] = []
    for term, text in rows:
        head = " " * indent + term
        if not text:
            out.append(head)
            continue
        if len(term) <= first_col - _COL_SPACING:
            head += " " * (first_col - len(term))
        else:
            out.append(head)
            head = " " * (first_col + indent)
        lines = wrap(text, max(width - first_col - 2, 10))
        if not lines:
            out.append(head)
            continue
        out.append(head + lines[0])
        out += [" " * (first_col + indent) + line for line in lines[1:]]
    return out


def group_help(prog: str = "keyseal", width: int | None = None) -> str:
    """The text `keyseal --help` prints (with its final newline)."""
    width = help_width() if width is None else width
    prefix = f"Usage: {prog} "  # click puts the arguments beside it when 20 columns remain: always, at 50 or more
    usage = wrap("[OPTIONS] COMMAND [ARGS]...", width, prefix, " " * len(prefix))
    out = [*usage, "", *wrap(GROUP_HELP, width, "  ", "  "), "", "Options:"]
    out += _definition_list(list(_OPTIONS), width, 2)
    names = sorted(COMMANDS)
    limit = width - 6 - max(len(name) for name in names)
    out += ["", "Commands:"]
    out += _definition_list([(name, short_help(SHORT_HELP[name], limit)) for name in names], width, 2)
    return "\n".join(out) + "\n"
