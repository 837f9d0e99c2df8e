"""Protocol-format JSONL reading/writing with line-accurate errors.

Protocol format (LaTen / SemAlign splits): one JSON object per line,
``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}], ...extra keys}``.
Lines are split on ``\\n`` only: some files hold U+2028 inside strings, which ``str.splitlines`` would break.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import SemalignError
from ..paths import atomic_write_text

ROLES = {"system", "user", "assistant"}


def validate_example(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise SemalignError(f"{where}: expected an object with a non-empty 'messages' list "
                            '(protocol format {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]})')
    for m in obj["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SemalignError(f"{where}: every message needs a 'role' in {sorted(ROLES)} and a string 'content'")
    if obj["messages"][-1]["role"] != "assistant":
        raise SemalignError(f"{where}: the last message must be the assistant's answer (the supervised target)")
    return obj


def read_jsonl(path: str | Path, *, validate: bool = True) -> list[dict]:
    """Read a protocol JSONL file; malformed or empty input raises a one-line error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SemalignError(f"data file {path} does not exist; check --data-dir")
    text = path.read_text(encoding="utf-8")
    rows: list[dict] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SemalignError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from None
        rows.append(validate_example(obj, f"{path}:{lineno}") if validate else obj)
    if not rows:
        raise SemalignError(f"{path}: the file has no examples; provide at least one JSONL record")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
