"""What counts as visible text, for every string a user gives that others are shown."""

import unicodedata

from pydantic import AfterValidator

# Controls (Cc: tab, CR, LF, NEL …) and line and paragraph separators: what ends a line
# for str.splitlines, and so for an e-mail header, which the email package refuses.
_LINE_BREAKING_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
# Characters that show nothing or break a line: those above; format characters (Cf),
# which are invisible or reorder the text around them ("invoice\u202egnp.txt" displays as
# "invoicetxt.png", "\u200b.txt" as ".txt"); and lone surrogates, which no file system,
# header or database encoding holds.
_INVISIBLE_CATEGORIES = _LINE_BREAKING_CATEGORIES | {"Cf", "Cs"}


def without_invisible(text: str) -> str:
    """``text`` without its control, invisible and line-breaking characters."""
    return "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)


def _visible(value: str) -> str:
    if not without_invisible(value).strip():
        raise ValueError("must contain a visible character")
    return value


def _single_line(value: str) -> str:
    if any(unicodedata.category(ch) in _LINE_BREAKING_CATEGORIES for ch in value):
        raise ValueError("must be one line, without control characters")
    return value


# For a name or title: one of invisible characters only would show as blank.
Visible = AfterValidator(_visible)
# For text that becomes a header line (an e-mail subject).
SingleLine = AfterValidator(_single_line)
