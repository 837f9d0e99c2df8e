"""Answer extraction (GSM8K numbers, code blocks) and program assembly."""

import pytest

from semalign.eval import code, gsm8k


@pytest.mark.parametrize("text,flexible,strict", [
    ("She has 3 + 4 = 7 apples. So the answer is 7.", "7", "7"),
    ("The answer is $1,234.00", "1234", "1234"),
    ("The answer is: **42**", "42", "42"),
    ("answer: 18.50", "18.5", "18.5"),
    ("First 5 then 10 - 5 = 5", "5", None),
    ("It costs -3 dollars", "-3", None),
    ("So 5-3=2", "2", None),
    ("We get \\boxed{15} and then 16", "15", None),
    ("The final answer is $\\boxed{15}$.", "15", "15"),
    ("#### 72\nthen 5 more", "72", None),
    ("Total: 1,234,567 items", "1234567", None),
    ("The answer is 7. Check: 3 + 4 = 7, and 99 bottles", "7", "7"),
    ("no digits here", None, None),
])
def test_gsm8k_extraction(text, flexible, strict):
    assert gsm8k.extract_answer(text) == {"flexible": flexible, "strict": strict}


@pytest.mark.parametrize("raw,norm", [("18", "18"), ("18.0", "18"), ("18.00", "18"), ("$18", "18"), ("1,000", "1000"),
                                      ("3.50", "3.5"), ("7.", "7"), ("-0", "0"), ("abc", None), (None, None)])
def test_normalize_number(raw, norm):
    assert gsm8k.normalize_number(raw) == norm


def test_extract_code_variants():
    fenced = "Here you go:\n```python\ndef f(x):\n    return x\n```\nThis returns x."
    assert code.extract_code(fenced) == "def f(x):\n    return x\n"
    two = "```\nprint(1)\n```\nand\n```python\ndef g():\n    pass\n```"
    assert code.extract_code(two).startswith("def g")
    other_lang = "```py3k\nimport os\n```"
    assert code.extract_code(other_lang) == "import os\n"
    unclosed = "```python\ndef h():\n    return 1\n"
    assert code.extract_code(unclosed) == "def h():\n    return 1\n"
    bare = "Sure! Here is the code.\ndef k(a):\n    return a * 2"
    assert code.extract_code(bare) == "def k(a):\n    return a * 2\n"
    opened = "    return a + b\n```\n\nExplanation: ..."
    assert code.extract_code(opened, opened=True) == "    return a + b\n"
    assert code.closed_fence("```python\nx\n```") and not code.closed_fence("```python\nx")


HE_DOC = {"task_id": "HumanEval/0", "entry_point": "add",
          "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Sum.\"\"\"\n",
          "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


def test_humaneval_program_body_and_redefinition():
    body = code.humaneval_program(HE_DOC, "    return a + b\n", opened=True)
    assert body.startswith(HE_DOC["prompt"] + "    return a + b") and body.rstrip().endswith("check(add)")
    full = code.humaneval_program(HE_DOC, "def add(a, b):\n    return a + b\n", opened=False)
    assert "\ndef add(a, b):" in full
    compile(body, "p", "exec")
    compile(full, "p", "exec")


def test_mbpp_program_has_imports_code_and_tests():
    doc = {"task_id": 12, "signature": "import math\ndef sqrt2(x)", "test_imports": ["import re"],
           "test_list": ["assert sqrt2(4) == 2.0"]}
    prog = code.mbpp_program(doc, "def sqrt2(x):\n    return round(math.sqrt(x), 2)\n")
    assert prog.index("import re") < prog.index("import math") < prog.index("def sqrt2") < prog.index("assert")
    ns: dict = {}
    exec(compile(prog, "p", "exec"), ns)  # the reference program passes (plain exec: it is our own code)


def test_prompts_match_the_training_formats():
    """The eval prompts are byte-identical to the protocol training formats in semalign.data.tasks."""
    from semalign.data import tasks as dt
    from semalign.eval import mmlu

    r = {"id": "x", "subject": "abstract_algebra", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2}
    ex = dt._mmlu_example(r)
    assert ex["messages"][0]["content"] == mmlu.user_prompt(r)
    assert ex["messages"][1]["content"].startswith(mmlu.ANSWER_PREFIX)
    g = dt._gsm_example({"id": "g", "question": "How many?", "rationale": "2+2=4", "answer": "4"})
    assert g["messages"][0]["content"] == gsm8k.PROMPT.format(question="How many?")
    assert g["messages"][1]["content"].startswith(gsm8k.ANSWER_PREFIX)
    c = dt._code_example("m", "Write f.\ndef f(x)", "def f(x):\n    return x")
    assert c["messages"][0]["content"] == code.INSTRUCTION + "Write f.\ndef f(x)"
    assert c["messages"][1]["content"].startswith(code.ANSWER_PREFIX)
