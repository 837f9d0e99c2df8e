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
    attribution_positions: Literal["response", "all"] = Field(
        "response", description="positions Grad x Act sums over: supervised response positions (spec §8.1) or all")
    attribution_target: Literal["block_output", "residual"] = Field(
        "block_output", description="activation scored: block output h_l (spec) or the residual contribution "
        "h_l - h_(l-1) (the last layer's signed block-output score is identically ~0 under the final RMSNorm)")
    attribution_batch: int = Field(4, ge=1, description="at most this many examples per attribution forward/backward")
    attribution_batch_tokens: int = Field(1024, ge=8, description="at most this many padded tokens per attribution "
                                          "batch (bounds activation memory of the fp32 backward)")
    attribution_dtype: Literal["fp32", "compute"] = Field(
        "fp32", description="precision of attribution (fp32: bf16 rounding must not reorder close layers)")
    interface: Literal["residual", "block_output", "mlp_output"] = Field(
        "residual", description="supervision interface: block residual contribution, block output or MLP output")
    depth_exact: bool = Field(False, description="interpolate the teacher target at the exact student depth (§2.3)")
    fold_final_norm: bool = Field(False, description="fold the final-norm gain into the LM head before pinv (§8.6)")
    rcond: float = Field(1e-6, gt=0, description="relative singular-value cutoff of the pseudo-inverse")
    trainable: Literal["lora", "full", "lora_above", "full_above"] = Field(
        "lora", description="what trains: LoRA on the paired layer(s) (paper), the full paired layer(s), or LoRA / "
        "full weights on every layer from the lowest paired one up")
    map: Literal["closed_form", "ridge", "random_orthogonal"] = Field(
        "closed_form", description="teacher->student map: the paper's closed-form M = S_S S_T^T; ridge: a linear map "
        "fitted on paired teacher/student states of the extract split (beyond the paper); random_orthogonal: a "
        "seeded semi-orthogonal control that must not help")
    ridge_lambda: float = Field(1e-2, gt=0, allow_inf_nan=False,
                                description="ridge penalty, relative to the mean eigenvalue of the teacher Gram")
    output_loss: Literal["cos_label", "ce"] = Field(
        "cos_label", description="output term: the paper's 1 - cos(z, one-hot) or cross-entropy, on response tokens")
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
    fast_path: bool = Field(True, description="SemAlign training: run the frozen layers below the lowest trainable "
                            "one once per example and the LM head only at supervised positions (same results; "
                            "--no-fast-path runs the full model every step)")
    gradient_checkpointing: bool = Field(False, description="recompute the student's activations in backward during "
                                         "post-training (seeking, lora-sft, logit-kd): less memory, more compute")
    lr: float = Field(3e-5, ge=0, allow_inf_nan=False, description="peak learning rate (0 = a no-op control run)")
    weight_decay: float = Field(0.05, ge=0)
    scheduler: Literal["warmup_constant", "onecycle", "constant", "cosine"] = Field(
        "warmup_constant", description="LR schedule of SemAlign/frontier steps: warmup_constant (linear warm-up over "
        "10 percent of the steps when there are >= 10, then constant: every configured step gets a useful LR), onecycle "
        "(LaTen's; decays to ~0 on its last step, so it wastes short runs), constant, cosine")
    max_length: int = Field(768, ge=8, description="token cutoff per example")
    train_on_inputs: Optional[bool] = Field(
        None, description="put prompt tokens in the post-training loss (default: the task's protocol setting, "
        "MMLU yes); SemAlign's attribution and output term always use response tokens")
    train_pool: Literal["train", "extract_align"] = Field(
        "train", description="examples the post-training controls (lora-sft, logit-kd) draw from: the train split, "
        "or the extract + align pool SemAlign uses (the same data for a like-for-like comparison)")
    attribution_examples: Optional[int] = Field(None, ge=1, description="extract examples used for attribution (default: all)")
    nll_examples: int = Field(32, ge=0, description="held-out examples for the before/after gold-answer NLL")
    eval_tasks: str = Field("", description="comma-separated benchmarks evaluated before/after (empty: none)")
    eval_limit: Optional[int] = Field(None, ge=1, description="examples per benchmark")
    allow_code_execution: bool = False
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto", description="compute dtype; auto = bf16 where the hardware has native bf16, else fp32")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    seed: int = 42
    cache: bool = Field(True, description="reuse the stage cache (teacher attribution, held-out NLL, evaluations; "
                        "see docs/cache.md); --no-cache recomputes everything and stores nothing")
    output: Optional[str] = Field(None, description="run directory (default runs/<method>-<task>-<time>)")
    semalign: SemAlignConfig = Field(default_factory=SemAlignConfig)
    frontier: FrontierConfig = Field(default_factory=FrontierConfig)
    seeking: SeekingConfig = Field(default_factory=SeekingConfig)
    laten: LatenConfig = Field(default_factory=LatenConfig)
    lora_sft: LoraSftConfig = Field(default_factory=LoraSftConfig)
    logit_kd: LogitKdConfig = Field(default_factory=LogitKdConfig)

    def eval_task_list(self) -> list[str]:
        return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]


# Named bundles of config values, applied before --config and flags (which override them).
PRESETS: dict[str, dict] = {
    # The paper's v1 recipe exactly as specified (spec semalign.md §2, §8.9): Table-4 steps of 16 examples at lr 3e-5,
    # AdamW (wd 0.05) with LaTen's OneCycle, LoRA r=16 on up/down/v/o of the paired layer, the closed-form map,
    # 1 - cos layer and output terms, spec attribution. Pinned here so it stays reproducible when defaults move.
    "paper-v1": {
        "method": "semalign", "steps": None, "batch_size": 16, "lr": 3e-5, "weight_decay": 0.05,
        "scheduler": "onecycle",
        "semalign": {"top_k_layers": 1, "aggregate": "abs_of_sum", "attribution_positions": "response",
                     "attribution_target": "block_output", "interface": "residual", "depth_exact": False,
                     "fold_final_norm": False, "trainable": "lora", "map": "closed_form", "output_loss": "cos_label",
                     "lora_r": 16, "lora_alpha": 16.0, "lora_dropout": 0.05,
                     "lora_targets": "up_proj,down_proj,v_proj,o_proj", "layer_weight": 1.0, "output_weight": 1.0,
                     "layer_positions": "all"},
    },
}


def preset_values(name: str | None) -> dict:
    """The values of preset ``name`` (a deep copy), or {} for None; unknown names are a one-line error."""
    if not name:
        return {}
    if name not in PRESETS:
        raise SemalignError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    import copy

    return copy.deepcopy(PRESETS[name])


def merge_values(base: dict, over: dict) -> dict:
    """Nested merge of config value dicts (``over`` wins)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
