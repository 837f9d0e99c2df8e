"""Shared fixtures: tiny random model pairs built in-process and protocol-format data written to tmp dirs.

Nothing here touches the network, real model assets or ../shared.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUBJECTS = ["abstract_algebra", "anatomy", "astronomy", "virology"]


def mmlu_like(i: int, rng: random.Random) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    choices = [str(a + b), str(a + b + 1), str(a * b + 2), str(abs(a - b) + 3)]
    order = list(range(4))
    rng.shuffle(order)
    letters = "ABCD"
    gold = letters[order.index(0)]
    subj = SUBJECTS[i % len(SUBJECTS)]
    q = "\n".join(f"{letters[j]}. {choices[order[j]]}" for j in range(4))
    return {"id": f"fx-mmlu-{i}", "category": subj, "messages": [
        {"role": "user", "content": f"The following are multiple choice questions (with answers) about "
                                    f"{subj.replace('_', ' ')}.\n\nWhat is {a} + {b}?\n{q}\nAnswer:"},
        {"role": "assistant", "content": f"The answer is: {gold}"}]}


def gsm_like(i: int, rng: random.Random) -> dict:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return {"id": f"fx-gsm-{i}", "messages": [
        {"role": "user", "content": f"Answer the following question.\n\nQuestion: Tom has {a} apples and buys {b} more. "
                                    "How many apples does he have?"},
        {"role": "assistant", "content": f"Answer: Tom has {a} + {b} = {a + b} apples. So the answer is {a + b}."}]}


def write_protocol_dir(root: Path, task_dir: str, maker, sizes=(4, 12, 16, 8), seed: int = 0) -> Path:
    rng = random.Random(seed)
    d = root / "pkt-splits" / task_dir
    d.mkdir(parents=True, exist_ok=True)
    i = 0
    for name, n in zip(("extract", "align", "train", "eval"), sizes):
        with open(d / f"{task_dir}_{name}_split.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(maker(i, rng)) + "\n")
                i += 1
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_protocol_dir(root, "mmlu", mmlu_like)
    write_protocol_dir(root, "gsm", gsm_like)
    return root


@pytest.fixture(scope="module")
def eval_data_dir(data_dir, tmp_path_factory) -> Path:
    """The protocol splits plus a local MMLU test file for the harness (no packaged data, no network)."""
    import shutil

    root = tmp_path_factory.mktemp("evaldata")
    shutil.copytree(data_dir, root, dirs_exist_ok=True)
    (root / "mmlu").mkdir(exist_ok=True)
    shutil.copy(Path(__file__).resolve().parent / "fixtures" / "eval" / "mmlu" / "test.jsonl", root / "mmlu" / "test.jsonl")
    return root


@pytest.fixture(scope="session")
def tiny_tok():
    from semalign.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen2 teacher (4 x 64) and student (2 x 32) saved as HF directories."""
    from semalign.testing import save_tiny_pair

    return save_tiny_pair(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("semalign-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(request, _session_cache, monkeypatch):
    """Keep the stage cache, semantic maps and eval results of tests out of the user's cache (tests that need
    their own cache set SEMALIGN_CACHE again; ``slow`` tests read the real assets and keep the user's)."""
    if "slow" not in request.keywords:
        monkeypatch.setenv("SEMALIGN_CACHE", str(_session_cache))
    monkeypatch.delenv("SEMALIGN_NO_CACHE", raising=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
