"""What counts as visible text, for every string a user gives that others are shown."""

import unicodedata

from pydantic import AfterValidator

# Characters that show nothing or break a line: controls (Cc); format characters (Cf),
# which are invisible or reorder the text around them ("invoice\u202egnp.txt" displays as
# "invoicetxt.png", "\u200b.txt" as ".txt"); line and paragraph separators, which break
# text shown in one line; and lone surrogates, which no file system, header or database
# encoding holds.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def without_invisible(text: str) -> str:
    """``text`` without its control, invisible and line-breaking characters."""
    return "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)


def _visible(value: str) -> str:
    if not without_invisible(value).strip():
        raise ValueError("must contain a visible character")
    return value


# For a name or title: one of invisible characters only would show as blank.
Visible = AfterValidator(_visible)
