"""Protocol-format JSONL reading/writing with line-accurate errors.

Protocol format (LaTen / SemAlign splits): one JSON object per line,
``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}], ...extra keys}``.
Lines are split on ``\\n`` only: some files hold U+2028 inside strings, which ``str.splitlines`` would break.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

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
    rows: list[dict] = []
    for lineno, obj in iter_json_lines(path):
        rows.append(validate_example(obj, f"{path}:{lineno}") if validate else obj)
    return rows


def read_text_file(path: str | Path, what: str = "data file") -> str:
    """Whole file as text: UTF-8 with an optional BOM (Windows editors), CRLF kept for the caller.

    Invalid UTF-8 and unreadable files raise a one-line error naming the file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise SemalignError(f"{what} {path} is a directory; pass a file") from None
    except OSError as exc:
        raise SemalignError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__}); "
                            "check the path and its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SemalignError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                            "re-save the file as UTF-8") from None


def iter_json_lines(path: str | Path, what: str = "data file", *, objects: bool = True,
                    allow_empty: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file.

    Lines end at ``\n`` only (``\r\n`` works: the ``\r`` is JSON whitespace), so U+2028, U+2029 and NEL inside
    strings stay inside their record. Invalid JSON, a non-object line (with ``objects``) or a file without records
    raises a one-line error naming ``file:line``.
    """
    path = Path(path)
    text = read_text_file(path, what)
    n = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SemalignError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from None
        except RecursionError:
            raise SemalignError(f"{path}:{lineno}: JSON nested too deeply; fix or remove that line") from None
        if objects and not isinstance(obj, dict):
            raise SemalignError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}; "
                                "fix or remove that line")
        n += 1
        yield lineno, obj
    if not n and not allow_empty:
        raise SemalignError(f"{path}: the file has no examples; provide at least one JSONL record")


def record_field(obj: dict, key: str, where: str, kind: type | tuple[type, ...] = str, fix: str = "") -> Any:
    """``obj[key]`` checked for presence and type, else a one-line ``file:line`` error."""
    if key not in obj or obj[key] is None:
        raise SemalignError(f"{where}: the record has no {key!r} field; {fix or 'fix or remove that line'}")
    v = obj[key]
    if not isinstance(v, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SemalignError(f"{where}: field {key!r} must be {names}, got {type(v).__name__}; "
                            f"{fix or 'fix or remove that line'}")
    return v


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
