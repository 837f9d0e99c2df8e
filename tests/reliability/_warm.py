"""Imported once by the forkserver of _driver.py so forked runs start warm (lazy imports already done)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401
import peft  # noqa: E402,F401
import torch  # noqa: E402
import transformers  # noqa: E402,F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402,F401
from transformers.models.qwen2 import modeling_qwen2, tokenization_qwen2  # noqa: E402,F401

import semalign.cli.main  # noqa: E402,F401
import semalign.eval.mmlu  # noqa: E402,F401
import semalign.methods.semalign.recipe  # noqa: E402,F401
import semalign.report  # noqa: E402,F401
import semalign.transfer  # noqa: E402,F401
from semalign.testing import tiny_pair  # noqa: E402

torch.set_num_threads(1)
tiny_pair()  # first-use initialisation of the model classes
