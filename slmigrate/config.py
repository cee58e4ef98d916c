"""Typed configuration, one section per stage, read from ``slmigrate.toml``.

Precedence: defaults < ``slmigrate.toml`` < CLI flags. Unknown keys are errors (a typo must not silently fall
back to a default). Each stage writes the resolved section next to what it produced.

Each stage owns its section class below; add fields there with a default and a ``description``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slmigrate.errors import SlmigrateError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Keys that decide what is done with a stage's result, not the result itself (e.g. the CI gate's bar):
    # changing them must not make the stage run again.
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_dump(self) -> dict[str, Any]:
        """The settings the stage's output depends on, for its fingerprint."""
        return self.model_dump(mode="json", exclude=set(self.not_fingerprinted))


class CollectConfig(Section):
    agent: str | None = Field(None, description="Agent tag for imported or proxied calls without one.")


class PricesConfig(Section):
    """USD per million tokens, by model name prefix (longest match wins). Used to put cost on clusters."""

    per_million: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {
            # (input, output) list prices in USD per 1M tokens, from OpenAI's pricing page (2025).
            "gpt-4.1": (2.00, 8.00),
            "gpt-4.1-mini": (0.40, 1.60),
            "gpt-4.1-nano": (0.10, 0.40),
            "gpt-4o": (2.50, 10.00),
            "gpt-4o-mini": (0.15, 0.60),
            "gpt-3.5-turbo": (0.50, 1.50),
            "o3": (2.00, 8.00),
            "o4-mini": (1.10, 4.40),
        },
        description="Model name prefix -> (input, output) USD per million tokens.",
    )
    default: tuple[float, float] = Field((2.50, 10.00), description="Price for models not in the table.")
    default_model: str | None = Field(None, description=(
        "Model assumed for calls whose log names none (`audit --assume-model`), e.g. \"gpt-4o\"; without it "
        "they are priced at `default`."))
    gpu_hour_usd: float = Field(2.50, description="Hardware price per GPU hour, for the SLM's serving cost.")
    cpu_hour_usd: float = Field(0.10, description="Hardware price per CPU-core hour, for the SLM's serving cost.")

    def price(self, model: str | None) -> tuple[float, float]:
        model = model or self.default_model
        best = None
        for prefix in self.per_million:
            if model and model.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        return self.per_million[best] if best else self.default

    def cost(self, model: str | None, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        inp, out = self.price(model)
        return ((prompt_tokens or 0) * inp + (completion_tokens or 0) * out) / 1e6


class CurateConfig(Section):
    pii: Literal["placeholder", "synthetic", "off"] = Field("placeholder", description="How PII is replaced.")
    entities: list[str] | None = Field(None, description="Entity types to scrub (default: all known).")
    workers: int | None = Field(None, ge=1, description=(
        "Processes for PII analysis (default: one per CPU core this process may use, at most 8)."))
    min_outcome: float | None = Field(None, description="Drop calls whose workflow outcome is below this.")
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/validation/test shares.")
    test_calls_per_task: int = Field(50, ge=0, description=(
        "Size the test split so that each task (calls sharing a system prompt and tool set) with at least this "
        "many calls expects this many test calls (plus a margin), up to max_test_share; 0: the split shares only."))
    max_test_share: float = Field(0.5, gt=0, lt=1, description="Largest test share test_calls_per_task may set.")
    link_entities: bool = Field(True, description=(
        "Keep calls that share an entity (a scrubbed value: name, e-mail, id; or an id-like token such as an order "
        "number) on one side of the split, besides sessions."))
    link_max_share: float = Field(0.02, gt=0, le=1, description=(
        "Entity links: a token in more than this share of sessions (at least 10) is no entity and is ignored, and "
        "no linked group grows beyond this share of sessions (at least 10)."))
    seed: int = Field(0, description="Seed for synthetic replacements and split hashing.")
    score_threshold: float = Field(0.4, ge=0, le=1, description="Minimum detector score for an entity to count.")
    allow: list[str] = Field(default_factory=list, description="Values never scrubbed (besides tool names, "
                             "schema keys and enum values, which are always kept).")
    keep_metadata: list[str] = Field(default_factory=list, description=(
        "Metadata keys whose values are kept as they are (task labels, your own ids), besides the ones slmigrate "
        "knows are safe (session, agent, outcome, turn, task_id, task_tag, domain, role, mode); every other "
        "metadata string is scrubbed."))
    near_duplicates: bool = Field(True, description="Drop calls whose request equals an earlier one up to "
                                  "whitespace, ids and numbers.")
    examples: int = Field(3, ge=0, description="Scrubbed examples shown in the report.")
    engine: Literal["local", "ray"] = Field(
        "local", description="Where the PII pass runs: local (--workers processes here) or ray (--workers Ray "
        "actors; needs `pip install 'slmigrate[ray]'`).")
    ray_address: str | None = Field(None, description="Ray cluster address for engine ray (default: a local Ray "
                                    "with --workers CPUs).")

    @field_validator("split")
    @classmethod
    def _shares(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v < 0 for v in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("train/validation/test shares must be >= 0 and sum to 1, e.g. [0.8, 0.1, 0.1]")
        return value


class ClusterConfig(Section):
    min_size: int = Field(5, ge=2, description="Smallest group of calls that counts as a recurring task.")
    granularity: Literal["coarse", "fine"] = Field("coarse", description="Coarse tasks or finer sub-tasks.")
    by: Literal["none", "agent"] = Field("none", description="Cluster within each agent tag.")
    threshold: float | None = Field(
        None, gt=0, le=2,
        description="Average-linkage cut in the weighted task-view space (default: 0.6 coarse, 0.55 fine).")
    core_ratio: float = Field(
        0.7, gt=0, le=1,
        description="A call is a one-off unless it has min_size similar calls within threshold x core_ratio.")
    max_points: int = Field(4000, ge=100, description="Distinct task views clustered directly; the rest are assigned.")
    embedder: str = Field("minilm", description="Embedding model: minilm (all-MiniLM-L6-v2, the one built in).")
    task_tag_key: str | None = Field(
        "task_tag", description="Metadata key of a user's own task tag; tagged calls form their own clusters.")
    replaceable_at: float = Field(0.6, ge=0, le=1, description="Replaceability score counted as likely replaceable.")
    map: bool = Field(True, description="Draw the 2-D map (clusters/map.png).")
    engine: Literal["local", "ray"] = Field(
        "local", description="Where the embedding pass runs: local (this process, or --workers processes) or ray "
        "(--workers Ray actors; needs `pip install 'slmigrate[ray]'`).")
    ray_address: str | None = Field(None, description="Ray cluster address for engine ray (default: a local Ray).")
    workers: int | None = Field(None, ge=1, description="Embedding workers (default: local, one process per core "
                                "when there are 1,000 or more texts to embed, else this process; ray: every CPU "
                                "of the Ray cluster).")


class SelectConfig(Section):
    gpu_memory_gb: float | None = Field(None, description="GPU memory available for training and serving.")
    cpu_only: bool = Field(False, description="Only consider CPU training and serving.")
    cpu_memory_gb: float = Field(24.0, description="Host memory, for CPU-only selection.")
    license: str = Field("permissive", description="permissive | any | comma-separated SPDX ids.")
    max_params: float | None = Field(None, description="Largest model to consider, in parameters.")
    top: int = Field(3, ge=1, description="Candidates kept per cluster.")
    probe: int = Field(0, ge=0, description="Calls per cluster to probe local candidates on.")


class ProbeConfig(Section):
    """Measured replaceability per task, cheap enough for an audit (see docs/run.md)."""

    neighbour_calls: int = Field(300, ge=1, description=(
        "Held-out calls per task the nearest-neighbour baseline answers (the most similar train call's answer)."))
    fewshot_calls: int = Field(2, ge=0, description=(
        "Held-out calls per task the local small model answers few-shot (0: skip; `audit --no-fewshot`)."))
    fewshot_total: int = Field(6, ge=0, description="At most this many few-shot calls over all tasks.")
    fewshot_examples: int = Field(2, ge=0, description="Nearest train calls shown as worked examples.")
    fewshot_prompt_tokens: int = Field(1024, ge=64, description=(
        "Prompt tokens the few-shot probe keeps (older turns go first), to stay fast on a CPU."))
    fewshot_max_new_tokens: int = Field(64, ge=1, description="Longest few-shot answer generated.")
    model: str | None = Field(None, description="Small model for the few-shot probe (default SmolLM2-135M).")
    lora: Literal["auto", "on", "off"] = Field("auto", description=(
        "Budgeted LoRA probe: `auto` runs it when CUDA is present, `on` on a CPU too (minutes per task; "
        "`probe --lora`), `off` never. true/false read as auto/off."))
    lora_steps: int = Field(48, ge=1, description=(
        "Training steps of the LoRA probe ([finetune]'s settings otherwise; the demo fine-tunes 48 steps)."))
    lora_train_calls: int = Field(256, ge=1, description="Train calls per task the LoRA probe learns from.")
    lora_test_calls: int = Field(32, ge=1, description="Held-out calls per task the LoRA probe's model answers.")
    lora_tasks: int = Field(4, ge=0, description="The LoRA probe trains at most this many tasks (biggest first).")
    lora_clusters: list[str] = Field(default_factory=list, description=(
        "Only these tasks get the LoRA probe (`probe --cluster ID`); empty: the `lora_tasks` biggest."))

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_flag(cls, value: Any) -> Any:
        return {True: "auto", False: "off"}.get(value, value) if isinstance(value, bool) else value
    seed: int = Field(0, description="Seed for the samples and the bootstrap.")


class FinetuneConfig(Section):
    """Per-cluster fine-tuning. Fields left at None get a default chosen by data size (see docs/finetune.md)."""

    model: str | None = Field(None, description="Catalogue name or local folder; default: the selected model.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="Fine-tuning method.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    epochs: float | None = Field(None, gt=0, description="Epochs (default chosen by data size).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    seed: int = Field(0, description="Random seed (data order, initialisation, dropout).")
    lr: float | None = Field(None, gt=0, description="Peak learning rate (default by method and model size).")
    lora_r: int | None = Field(None, ge=1, description="LoRA rank (default by data size).")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha (default 2 x rank).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "Dropout on the LoRA path. At 0 peft feeds each adapted layer's input as it is instead of keeping a "
        "dropped-out copy per layer: on BFCL 27% less peak training memory, the same scores (docs/finetune.md)."))
    target_modules: list[str] | str = Field("all-linear", description="Modules LoRA adapts (peft names).")
    lora_layers: int | None = Field(None, ge=1, description=(
        "Adapt only the top N decoder layers (default all): the backward pass stops there and, on Llama-type "
        "models, the frozen layers below run once per example instead of once per step."))
    batch_tokens: int | None = Field(None, ge=64, description="Tokens per batch (default 4096 CPU, 16384 CUDA).")
    max_length: int = Field(2048, ge=32, description="Longest example in tokens; longer prompts lose old turns.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    eval_every: int | None = Field(None, ge=1, description="Validation loss every N steps (default half an epoch).")
    patience: int = Field(3, ge=1, description="Stop after this many evaluations without improvement.")
    stop_when_exact: bool = Field(False, description=(
        "Stop once three validations in a row find that greedy decoding would reproduce every validation answer "
        "exactly (checked from the validation pass, no generation): saves steps on easy tasks such as short "
        "labels."))
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps for learning-rate warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    prune_static_prefix: bool = Field(False, description=(
        "Train without what every call of the cluster repeats: the shared system-prompt prefix and, when all "
        "calls offer the same tools, the tool list (the specialist learns them; serving drops them the same)."))
    min_examples: int = Field(8, ge=1, description="Skip clusters with fewer training calls than this.")
    max_examples: int | None = Field(None, ge=1, description=(
        "Train on a seeded sample of at most this many of a cluster's training calls (default all): the data-size "
        "points of a learning curve (tests/benchmarks/learning_curve.py)."))


class EvaluateConfig(Section):
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset({"fail_under"})
    variants: list[str] = Field(["base", "icl", "finetuned"], description="Which model variants to evaluate.")
    limit: int | None = Field(None, description=(
        "At most this many test calls per cluster (default: the whole test split, as the decision needs)."))
    threshold: dict[str, float] = Field(
        default_factory=lambda: {"tool_call": 0.9, "json": 0.9, "label": 0.9, "text": 0.9},
        description="Primary-metric threshold per output kind for a migrate decision.",
    )
    primary: dict[str, str] = Field(default_factory=dict, description=(
        "Override the primary metric per output kind, e.g. {text = \"embedding_similarity\"}."))
    min_test_calls: int = Field(30, ge=1, description=(
        "Fewer scored test calls than this: \"not enough evidence\", never migrate (besides the calls the "
        "threshold itself needs: a perfect score's 95% lower bound reaches 0.9 only from 35 calls)."))
    max_latency_ratio: float | None = Field(None, gt=0, description=(
        "A task stays on the LLM when the fine-tuned model's p50 latency is more than this times the LLM's "
        "recorded p50 (e.g. 1.0: never slower); default: latency is shown, not checked."))
    fail_under: float | None = Field(None, ge=0, description=(
        "CI gate: `evaluate` and `run` exit with code 3 when a cluster marked for migration scores below this on "
        "its primary metric (`--fail-under` overrides)."))
    model: str | None = Field(None, description="Base model when a cluster has no adapter (default SmolLM2-135M).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the small model runs.")
    batch_size: int = Field(8, ge=1, description="Calls generated together.")
    served_latency_calls: int = Field(8, ge=0, description=(
        "With batch_size > 1, this many test calls of each fine-tuned task are also generated one at a time, "
        "as the router serves them: the latency figures and the latency check are theirs (0: the batches' "
        "wall time, which is not what a served request waits)."))
    max_new_tokens: int = Field(512, ge=1, description="Upper bound on answer length (sized per cluster from "
                                "its reference answers, up to this).")
    constrained: bool = Field(True, description=(
        "Decode tool calls inside the request's own tool schemas (offered names, argument keys and types; "
        "slmigrate.evaluate.guide). The router decodes the way the evaluation did."))
    icl_examples: int = Field(3, ge=0, description="Worked examples from the train split in the icl variant.")
    seed: int = Field(0, description="Seed for choosing the icl examples.")
    embedder: str = Field("minilm", description=(
        "Embedder for the text similarity metric: minilm, or none to skip it."))
    judge_mode: Literal["rubric", "pairwise"] = Field("rubric", description="LLM judge mode, with --judge.")


class ServeConfig(Section):
    """`slmigrate serve`: the router (docs/serve.md)."""

    upstream: str | None = Field(None, description="The LLM endpoint to fall back to.")
    port: int = Field(8788, description="Port of the router.")
    slm_endpoint: str | None = Field(None, description=(
        "OpenAI-compatible server of the migrated adapters (vLLM from `slmigrate export vllm`, or `slmigrate serve "
        "--adapters-only`), e.g. \"http://127.0.0.1:8000/v1\"; a migrated task is asked there with `model` = its "
        "LoRA module name, and falls back to the LLM when it is down, slow or wrong. Key: $SLMIGRATE_SLM_API_KEY. "
        "Default: the router runs the adapters itself."))
    guard_sample: float = Field(0.05, ge=0, le=1, description=(
        "Live guard: share of the small model's answers also sent to the LLM in the background and compared on "
        "the task's primary metric; a task whose live agreement's upper 95% bound falls below its threshold is "
        "demoted to the LLM (0: no guard)."))
    guard_min_samples: int = Field(20, ge=1, description="Comparisons a task needs before the guard may demote it.")


class RunConfig(Section):
    """`slmigrate run`: which logs to import before the stages, and where the report goes."""

    inputs: list[str] = Field(
        default_factory=list,
        description="Log files imported first, relative to the config file (re-importing adds nothing).",
    )
    format: str = Field("auto", description="Format of the inputs, as for `slmigrate collect import --format`.")
    tools: str | None = Field(None, description="Tool schemas file for `conversation` inputs without their own.")
    report: str = Field("report.html", description="Report file; relative paths land in the workspace's reports/.")
    train: Literal["likely", "all"] = Field(
        "likely", description="Clusters `run` fine-tunes and evaluates: likely = those the cluster stage estimates "
        "replaceable (the rest stay on the LLM); all = every cluster.")


class Config(Section):
    collect: CollectConfig = Field(default_factory=CollectConfig)
    prices: PricesConfig = Field(default_factory=PricesConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    run: RunConfig = Field(default_factory=RunConfig)


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read ``path`` (default ``./slmigrate.toml`` when present) and apply CLI overrides (None values ignored)."""
    data: dict[str, Any] = {}
    file = Path(path) if path else Path("slmigrate.toml")
    if path and not file.exists():
        raise SlmigrateError(f"config file {file} does not exist; pass an existing --config or drop the flag")
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SlmigrateError(f"config file {file} is not valid TOML: {exc}; fix the line it names") from exc
    for section, values in (overrides or {}).items():
        clean = {k: v for k, v in values.items() if v is not None}
        if clean:
            data.setdefault(section, {}).update(clean)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise SlmigrateError(f"invalid configuration in {file}: {problems}; see `docs/configuration.md`") from exc


# Stage manifest -> the config section it records (``Workspace.write_manifest(config=...)``).
RECORDED_SECTIONS = {"curate": "curate", "cluster": "cluster", "probe": "probe", "select": "select",
                     "finetune": "finetune", "evaluate": "evaluate"}


def workspace_config(ws: Any, path: str | Path | None = None) -> Config:
    """The config of commands that act on what a workspace already holds (``report``, ``refine``): ``path``
    (their ``--config``) when given; otherwise each section as the workspace's stages recorded it in their
    manifests when they last ran (prices as the evaluation or the cluster stage used them), and defaults for the
    rest. Never ``./slmigrate.toml``: the same workspace gives the same result from any directory."""
    if path:
        return load_config(path)
    data: dict[str, Any] = {}
    for stage, section in RECORDED_SECTIONS.items():
        found = (ws.manifest(stage) or {}).get("config")
        if isinstance(found, dict) and found:
            data[section] = _known_keys(section, found)
    evaluation = ws.evaluation() if hasattr(ws, "evaluation") else None
    prices = (evaluation or {}).get("prices") or ((ws.manifest("cluster") or {}).get("prices"))
    if isinstance(prices, dict) and prices:
        data["prices"] = _known_keys("prices", prices)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise SlmigrateError(f"the configuration recorded in the workspace {getattr(ws, 'root', '')} is no longer "
                             f"valid: {problems}; pass the config file with --config") from exc


def _known_keys(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A recorded section without keys this version no longer has (a workspace outlives upgrades)."""
    fields = Config.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
    return {k: v for k, v in values.items() if k in fields}


def _problem(error: Any) -> str:
    """One validation error as `section.key: message`, with "did you mean" for a mistyped key."""
    loc = [str(part) for part in error["loc"]]
    text = f"{'.'.join(loc)}: {error['msg']}"
    if error["type"] != "extra_forbidden":
        return text
    model: Any = Config
    for part in loc[:-1]:  # walk down to the section that holds the unknown key
        field = model.model_fields.get(part)
        model = getattr(field, "annotation", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return text
    import difflib

    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f"unknown key {'.'.join(loc)}" + (f" (did you mean {close[0]!r}?)" if close else "")
