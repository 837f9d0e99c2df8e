"""Rich tables that never cut what a user must copy: the first column (names) prints whole, the rest wrap."""

from __future__ import annotations

from typing import Sequence


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]):
    """A ``rich`` table of ``rows`` whose first column keeps every name on one line (``min_width`` = the longest)
    and whose other columns fold long values (paths, keys) onto more lines instead of ending them with '…'."""
    from rich.table import Table

    t = Table()
    for i, c in enumerate(columns):
        if i == 0:
            t.add_column(c, no_wrap=True, min_width=max([len(c)] + [len(str(r[0])) for r in rows]))
        else:
            t.add_column(c, overflow="fold", min_width=len(c))
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t
