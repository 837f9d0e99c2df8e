"""Typed run configuration (pydantic). CLI flags are generated from these models (see ``cli/options.py``).

Top-level fields are common to every method; method-specific hyperparameters live in one section per method
(``semalign``, ``frontier``, ``seeking``, ``laten``, ``lora_sft``, ``logit_kd``), exposed on the CLI as
``--<section>-<field>`` (e.g. ``--semalign-top-k-layers 2``).
Defaults follow ../shared/spec/semalign.md §8 and are documented per field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SemalignError

DEFAULT_TEACHER = "qwen2.5-coder-1.5b-instruct"
DEFAULT_STUDENT = "qwen2.5-coder-0.5b-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SemAlignConfig(Section):
    """SemAlign v1 (arXiv 2510.24208v1, exact) options."""

    top_k_layers: int = Field(1, ge=1, description="number of critical teacher layers (spec §8.2)")
    aggregate: Literal["abs_of_sum", "sum", "mean", "abs"] = Field(
        "abs_of_sum", description="attribution aggregation over tokens/channels (spec §8.1)")
    interface: Literal["residual", "block_output", "mlp_output"] = Field(
        "residual", description="supervision interface: block residual contribution, block output or MLP output")
    depth_exact: bool = Field(False, description="interpolate the teacher target at the exact student depth (§2.3)")
    fold_final_norm: bool = Field(False, description="fold the final-norm gain into the LM head before pinv (§8.6)")
    rcond: float = Field(1e-6, gt=0, description="relative singular-value cutoff of the pseudo-inverse")
    trainable: Literal["lora", "full"] = Field("lora", description="LoRA on the paired layer(s) or the full layer")
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: str = Field("up_proj,down_proj,v_proj,o_proj", description="comma-separated projections")
    layer_weight: float = Field(1.0, ge=0)
    output_weight: float = Field(1.0, ge=0)
    layer_positions: Literal["all", "response"] = Field("all", description="positions averaged in the layer term (§8.11)")


class FrontierConfig(Section):
    """SemAlign v2/ACL frontier schedule — a labelled RECONSTRUCTION from the abstracts (spec §3.3)."""

    steps_per_stage: int = Field(4, ge=1)
    layer_loss: Literal["cosine", "relgeom", "fisher_logits"] = "relgeom"
    output_loss: Literal["cos_label", "kl_source"] = "kl_source"
    beta: float = Field(1.0, ge=0, description="weight of the output term")
    tau: float = Field(1.0, gt=0, description="temperature of fisher_logits / kl_source")
    kl_every_stage: bool = Field(True, description="apply the output term at every stage (else only the last)")
    fisher_variant: Literal["exact", "diagonal"] = "exact"
    interface: Literal["auto", "residual", "block_output", "mlp_output"] = Field(
        "auto", description="auto: residual for cosine/relgeom, block output (hidden state) for fisher_logits")
    trainable: Literal["lora", "full"] = Field("lora", description="per-stage LoRA on the frontier layer or the full layer")


_POST_TARGETS = "up_proj,down_proj,v_proj,o_proj"


class SeekingConfig(Section):
    """Seeking (PostPKT, arXiv 2310.11451): sensitivity extraction, SVD LoRA init, LoRA fine-tuning."""

    rank: int = Field(16, ge=1, description="LoRA rank r of the SVD initialisation")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha/r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    targets: str = Field(_POST_TARGETS, description="comma-separated matrices to extract + LoRA-tune: projections, "
                         "lm_head, embed_tokens, or 'all' (the Seeking paper's 7 projections + embed + lm_head); "
                         "default = NI's protocol (up, down, v, o)")
    seed_examples: int = Field(32, ge=1, description="train examples for sensitivity accumulation")
    seed_source: Literal["gold", "teacher"] = Field("gold", description="seed answers: gold or teacher greedy")
    seed_max_new_tokens: int = Field(128, ge=1, description="answer length when seed_source=teacher")
    window: Literal["independent", "head_aligned"] = Field(
        "independent", description="independent max-sensitivity window per matrix (faithful), or head_aligned "
        "offsets for q/k/v rows and o columns (needs equal head_dim)")
    layer_norms: bool = Field(True, description="include norm weights in the layer sensitivity sums (faithful)")
    lr: float = Field(3e-4, gt=0)
    epochs: float = Field(1.0, gt=0, description="passes over the train split (ignored when --steps is given)")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)


class LatenConfig(Section):
    """LaTen (PrePKT, arXiv 2505.14436): neuron attribution + translator hypernetwork, one injection."""

    transfer_rate: float = Field(0.1, description="fraction of neurons per layer, in (0, 1]")
    modules: str = Field("up_proj,down_proj,o_proj", description="modules to transfer (subset of up_proj, "
                         "down_proj, v_proj, o_proj); v_proj is off by default (GQA, spec §6.8)")
    lr: float = Field(3e-5, gt=0, description="translator learning rate (OneCycle peak)")
    weight_decay: float = Field(0.05, ge=0)
    samples_per_step: int = Field(16, ge=1, description="P examples per alignment step (1 extract + P-1 align)")
    norm_penalty: float = Field(1000.0, ge=0, description="weight of mean(translated^2) per module (official: 1000)")
    init_std: float = Field(1e-5, gt=0, description="std of the translator's N(0, std) initialisation")
    translator_hidden: Optional[int] = Field(None, ge=1, description="translator hidden width (default: teacher hidden)")
    locate_examples: int = Field(1, ge=1, description="train examples whose attribution picks the injected "
                                 "neurons at inference (official: 1; more averages the scores)")
    original_scaling: bool = Field(False, description="reproduce the official code's attribution scaling bug")
    lens_vocab: Optional[int] = Field(None, ge=1, description="CPU-budget approximation of the neuron scores: "
                                      "top-K base-logit tokens exact, the rest to first order (default: exact)")

    @field_validator("transfer_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("transfer rate must be in (0, 1]")
        return v


class LoraSftConfig(Section):
    """Plain LoRA fine-tuning control (random-init LoRA on the train split)."""

    rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    targets: str = Field(_POST_TARGETS, description="comma-separated projections to LoRA-tune")
    lr: float = Field(3e-4, gt=0)
    epochs: float = Field(1.0, gt=0, description="passes over the train split (ignored when --steps is given)")
    batch_size: int = Field(8, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)


class LogitKdConfig(Section):
    """Logit KD control: forward KL(teacher || student) plus optional CE, LoRA on the student."""

    lr: float = Field(3e-4, gt=0)
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0, description="weight of the gold-token CE added to the KL")
    epochs: float = Field(1.0, gt=0, description="passes over the train split (ignored when --steps is given)")
    batch_size: int = Field(8, ge=1)
    rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    targets: str = Field(_POST_TARGETS, description="comma-separated projections to LoRA-tune")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    chunk_tokens: int = Field(256, ge=1, description="positions per KL chunk (bounds vocab-sized memory)")


class RunConfig(Section):
    """Everything that determines a transfer run."""

    method: str = Field("semalign", description="transfer method (`semalign ls methods`)")
    teacher: str = Field(DEFAULT_TEACHER, description="asset name, local dir, .gguf file or hub id")
    student: str = Field(DEFAULT_STUDENT, description="asset name, local dir, .gguf file or hub id")
    task: str = Field("mmlu", description="mmlu | gsm8k | humaneval | mbpp")
    data_dir: Optional[str] = Field(None, description="folder with protocol splits (pkt-splits layout)")
    steps: Optional[int] = Field(None, ge=1, description="optimizer steps (default: the task's Table-4 value)")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step (1 extract + 15 align in v1)")
    micro_batch: int = Field(4, ge=1, description="examples per forward pass (gradient accumulation)")
    gradient_checkpointing: bool = Field(False, description="recompute the student's activations in backward during "
                                         "post-training (seeking, lora-sft, logit-kd): less memory, more compute")
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    scheduler: Literal["onecycle", "constant", "cosine"] = "onecycle"
    max_length: int = Field(768, ge=8, description="token cutoff per example")
    attribution_examples: Optional[int] = Field(None, ge=1, description="extract examples used for attribution (default: all)")
    nll_examples: int = Field(32, ge=0, description="held-out examples for the before/after gold-answer NLL")
    eval_tasks: str = Field("", description="comma-separated benchmarks evaluated before/after (empty: none)")
    eval_limit: Optional[int] = Field(None, ge=1, description="examples per benchmark")
    allow_code_execution: bool = False
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto", description="compute dtype; auto = bf16 where the hardware has native bf16, else fp32")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    seed: int = 42
    output: Optional[str] = Field(None, description="run directory (default runs/<method>-<task>-<time>)")
    semalign: SemAlignConfig = Field(default_factory=SemAlignConfig)
    frontier: FrontierConfig = Field(default_factory=FrontierConfig)
    seeking: SeekingConfig = Field(default_factory=SeekingConfig)
    laten: LatenConfig = Field(default_factory=LatenConfig)
    lora_sft: LoraSftConfig = Field(default_factory=LoraSftConfig)
    logit_kd: LogitKdConfig = Field(default_factory=LogitKdConfig)

    def eval_task_list(self) -> list[str]:
        return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    return f"invalid config value for {loc!r}: {e['msg']}"


def make_config(values: dict) -> RunConfig:
    """Build a RunConfig from (possibly nested) values; errors become one-line SemalignErrors."""
    try:
        return RunConfig.model_validate(values)
    except ValidationError as exc:
        raise SemalignError(_first_error(exc) + "; see `semalign transfer --help`") from None


def load_config(path: str | Path) -> RunConfig:
    from .data.jsonl import read_text_file

    p = Path(path)
    if not p.is_file():
        raise SemalignError(f"config file {p} does not exist")
    try:
        values = yaml.safe_load(read_text_file(p, "config file")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise SemalignError(f"{where}: invalid YAML ({type(exc).__name__}); fix the file") from None
    except RecursionError:
        raise SemalignError(f"{p}: YAML nested too deeply; fix the file") from None
    if not isinstance(values, dict):
        raise SemalignError(f"{p}: a config file must be a YAML mapping of field: value, got {type(values).__name__}")
    return make_config(values)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
