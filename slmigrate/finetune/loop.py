"""The training loop: AdamW over length-grouped batches, checkpoints, resume, early stopping, progress.

A compact loop rather than ``transformers.Trainer``: batches come from ``data.length_grouped_batches`` (no
training on padding), and a checkpoint holds everything the next step depends on - trainable weights,
optimiser and scheduler state, the RNG state (LoRA dropout) and the step - so a resumed run continues exactly
where the interrupted one stopped. Which batch a step trains on is a function of (seed, step) alone.

Several GPUs: under ``accelerate launch`` (``WORLD_SIZE`` > 1) the same loop runs in every process, with the
model and optimiser prepared by ``accelerate.Accelerator`` (DDP by default, FSDP when the accelerate config says
so). Step ``t`` of rank ``r`` trains on batch ``t * world + r`` of the same seeded sequence, so the ranks share
the data without overlap and one optimiser step covers ``world`` batches; gradients are averaged across ranks by
the wrapper. Only the main process writes checkpoints and draws progress (``is_main_process``). With one process
nothing of this is imported and the loop is unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from slmigrate.finetune.data import IGNORE, Example, collate, length_grouped_batches
from slmigrate.progress import NOTE, Progress, silent

CHECKPOINTS_KEPT = 2
_STOP_REASONS = {"exact": "every validation answer exact", "patience": "validation loss stopped improving"}


def world_size() -> int:
    """Processes in this training run (``accelerate launch`` / torchrun set WORLD_SIZE); 1 when run plainly."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed run: only the main process writes files."""
    import os

    return world_size() <= 1 or int(os.environ.get("RANK", "0") or 0) == 0


def distributed():
    """The ``accelerate.Accelerator`` of a multi-process run (creating it sets up the process group and this
    rank's device), or None in a plain single-process run."""
    if world_size() <= 1:
        return None
    import torch
    from accelerate import Accelerator

    # Without CUDA, several processes mean CPU data parallelism (gloo); accelerate only infers that when launched
    # with --cpu, which for several processes on one machine needs MPI.
    return Accelerator(cpu=not torch.cuda.is_available())


# stop_when_exact stops after this many validations in a row reproduce every answer, not the first: with the
# dozen validation calls of a small task one lucky pass is no evidence. The demo's label task stopped at its first
# all-exact pass (12 of 12 at step 24, the loss still falling fast) and scored 0.914 on 70 test calls; trained all
# 48 steps (all-exact at every validation from step 32) it scored 70 of 70.
EXACT_EVALS = 3


@dataclass
class LoopSettings:
    total_steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    batch_tokens: int
    checkpoint_every: int
    eval_every: int
    patience: int
    seed: int
    device: str
    pad_id: int
    bf16: bool = False  # autocast to bfloat16 (CUDA)
    stop_when_exact: bool = False  # stop once greedy decoding keeps reproducing every validation answer


@dataclass
class History:
    """What the loop did; saved into metrics.json and used for the loss curve."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_exact: list[float] = field(default_factory=list)  # share of validation answers greedy decoding reproduces
    best_step: int | None = None
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    tokens: int = 0  # real (non-padding) tokens trained on
    padded_tokens: int = 0  # positions computed, padding included
    train_seconds: float = 0.0
    stopped_early: bool = False
    stop_reason: str | None = None  # "patience" (no better validation loss) or "exact" (stop_when_exact)
    interrupted: bool = False
    resumed_from: int | None = None
    frozen_layers: int = 0  # bottom decoder layers computed once per example (FrozenBottom), not per step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


class Schedule:
    """Linear warm-up, then linear decay to zero at ``total_steps``."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def batch_at(examples: Sequence[Example], s: LoopSettings, step: int, cache: dict[int, list[list[int]]]):
    """The batch step ``step`` trains on: epochs of seeded length-grouped batches, laid end to end."""
    epoch = 0
    while True:
        if epoch not in cache:
            cache[epoch] = length_grouped_batches(examples, s.batch_tokens, seed=s.seed, epoch=epoch)
        batches = cache[epoch]
        if step < len(batches):
            return [examples[i] for i in batches[step]], epoch
        step -= len(batches)
        epoch += 1


def steps_per_epoch(examples: Sequence[Example], batch_tokens: int, seed: int) -> int:
    return len(length_grouped_batches(examples, batch_tokens, seed=seed, epoch=0))


def _trainable(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model) -> dict[str, Any]:
    return {n: p.detach().to("cpu", copy=True) for n, p in _trainable(model).items()}


def load_trainable(model, state: dict[str, Any]) -> None:
    import torch

    params = _trainable(model)
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


# Architectures whose logits are exactly ``lm_head(last hidden state)``: no soft-capping or logit scaling
# (Gemma 3 only when its config sets no final soft-capping, as the 270M's does). For Gemma's 262K-token
# vocabulary the head is most of a step's work, so computing it on answer positions only pays most there.
ANSWER_ONLY_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"}


def _body_and_head(model):
    """(decoder, output head) when the head may be applied to answer positions only, else (None, None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # A DDP/FSDP wrapper has no config: its forward must run (that is where gradients sync), so no shortcut.
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in ANSWER_ONLY_HEAD \
            or getattr(config, "final_logit_softcapping", None) is not None:
        return None, None
    return base.get_decoder(), base.get_output_embeddings()


class FrozenBottom:
    """Hidden states after the decoder's frozen bottom layers, computed once per example and reused.

    When LoRA adapts only the top layers, the layers below have nothing to learn and no dropout, so their
    output for an example is the same in every epoch: computing it once (no autograd) and running only the top
    layers per step makes each later epoch cost a fraction of a full forward and backward pass. Used for
    Llama-architecture models (SmolLM2, Llama), whose decoder layers all take the same full causal mask.
    """

    ARCHITECTURES = {"llama"}

    def __init__(self, decoder, split: int):
        self.decoder, self.split = decoder, split
        self.hidden: dict[int, Any] = {}  # id(example) -> [length, hidden] tensor

    @classmethod
    def of(cls, model) -> "FrozenBottom | None":
        """The cache for ``model`` when its bottom layers are frozen and the architecture allows it, else None."""
        body, head = _body_and_head(model)
        if body is None or getattr(body.config, "model_type", None) not in cls.ARCHITECTURES:
            return None
        layers = getattr(body, "layers", None)
        if layers is None or any(p.requires_grad for p in body.embed_tokens.parameters()):
            return None
        split = 0
        for layer in layers:
            if any(p.requires_grad for p in layer.parameters()):
                break
            split += 1
        return cls(body, split) if 0 < split < len(layers) else None

    def _run(self, hidden, attention_mask, layers):
        import torch
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.decoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  position_ids=position_ids, **_no_cache(create_causal_mask))
        rotary = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
        return hidden

    def fill(self, examples: Sequence[Example], s: LoopSettings) -> None:
        """Run the frozen layers once over every example not cached yet."""
        import torch

        todo = [e for e in examples if id(e) not in self.hidden]
        with torch.no_grad():
            for idx in length_grouped_batches(todo, s.batch_tokens, seed=s.seed, epoch=-1):
                batch = collate([todo[i] for i in idx], s.pad_id)
                ids, mask = batch["input_ids"].to(s.device), batch["attention_mask"].to(s.device)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=s.bf16):
                    out = self._run(self.decoder.embed_tokens(ids), mask, self.decoder.layers[: self.split])
                for row, i in enumerate(idx):
                    self.hidden[id(todo[i])] = out[row, : len(todo[i])].clone()

    def top(self, examples: Sequence[Example], attention_mask):
        """The final hidden states of a batch: cached bottom output, right-padded, through the top layers."""
        first = self.hidden[id(examples[0])]
        width = attention_mask.shape[1]
        hidden = first.new_zeros((len(examples), width, first.shape[-1]))
        for row, e in enumerate(examples):
            h = self.hidden[id(e)]
            hidden[row, : h.shape[0]] = h
        out = self._run(hidden, attention_mask.to(first.device), self.decoder.layers[self.split:])
        return self.decoder.norm(out)


def _forward_loss(model, batch: dict[str, Any], s: LoopSettings, frozen: FrozenBottom | None = None,
                  examples: Sequence[Example] | None = None, exact: bool = False):
    """Mean cross-entropy over the answer tokens (and, with ``exact``, how many rows are reproduced exactly).

    The output head (hidden -> vocabulary) is ~20% of a small model's forward pass and its logits the largest
    tensor in memory, yet only positions that predict an answer token need it: the decoder runs over the whole
    sequence, the head over those positions only. LoRA layers live inside the decoder's modules, so they
    are trained the same. Other architectures take the plain full-logits path. With ``frozen`` (and the batch's
    ``examples``), the decoder's frozen bottom layers are read from that cache instead of being run again.
    """
    import torch

    batch = {k: v.to(s.device) for k, v in batch.items()}
    body, head = _body_and_head(model)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE  # position t predicts token t+1
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=s.bf16):
        if body is None:
            out = model(**batch)
            loss, logits = out.loss, (out.logits[:, :-1][keep] if exact else None)
        else:
            if frozen is not None and examples is not None:
                hidden = frozen.top(examples, batch["attention_mask"])
            else:
                hidden = body(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).last_hidden_state
            logits = head(hidden[:, :-1][keep])
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
    if not exact:
        return loss
    # Greedy decoding reproduces an answer exactly iff, given the right prefix, every answer token is the
    # model's top choice: the teacher-forced argmax over the answer positions says so without generating.
    wrong = (logits.argmax(-1) != targets[keep]).long()
    rows = keep.nonzero()[:, 0]
    wrong_per_row = torch.zeros(len(targets), dtype=torch.long, device=wrong.device).index_add_(0, rows, wrong)
    return loss, int(((wrong_per_row == 0) & keep.any(1)).sum())


def validation_loss(model, examples: Sequence[Example], s: LoopSettings,
                    frozen: FrozenBottom | None = None) -> tuple[float | None, float | None]:
    """Mean answer-token loss over the validation examples, and the share of them greedy decoding would
    reproduce exactly (see ``_forward_loss``)."""
    import torch

    if not examples:
        return None, None
    model.eval()
    total, weight, exact = 0.0, 0, 0
    with torch.no_grad():
        for idx in length_grouped_batches(examples, s.batch_tokens, seed=s.seed, epoch=-1):
            group = [examples[i] for i in idx]
            batch = collate(group, s.pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # label positions the shifted loss counts
            loss, rows = _forward_loss(model, batch, s, frozen, group, exact=True)
            total += float(loss) * n
            weight += n
            exact += rows
    model.train()
    return (total / weight, exact / len(examples)) if weight else (None, None)


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, history: History,
                    best_state: dict[str, Any] | None) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "trainable": _snapshot(model), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": asdict(history), "best_state": best_state,
    }
    path = folder / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a crash while saving never leaves a truncated "latest" checkpoint
    for old in sorted(folder.glob("step-*.pt"))[:-CHECKPOINTS_KEPT]:
        old.unlink()
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def train(model, train_examples: Sequence[Example], val_examples: Sequence[Example], s: LoopSettings,
          checkpoint_dir: Path, *, resume: bool = False, progress: Progress | None = None,
          stop_after: int | None = None, label: str = "finetune") -> tuple[History, dict[str, Any] | None]:
    """Train ``model`` in place; return the history and the best weights by validation loss (or None).

    ``stop_after`` ends the run after that many steps of this call, with a checkpoint, as an interruption
    would; ``resume`` continues from the latest checkpoint in ``checkpoint_dir``. ``progress`` hears of each step
    as ``(label, step, total_steps, loss=..., tps=...)``; early stopping ends the pass with a ``note``.
    """
    import torch

    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(s.warmup_steps, s.total_steps))
    history, best_state, start = History(), None, 0
    torch.manual_seed(s.seed)

    found = latest_checkpoint(checkpoint_dir) if resume else None
    if found is not None:
        state = torch.load(found, map_location="cpu", weights_only=False)
        load_trainable(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = History(**state["history"])
        history.resumed_from, history.interrupted = state["step"], False
        best_state, start = state["best_state"], state["step"]

    accelerator = distributed()
    world, rank, unwrapped = 1, 0, model
    if accelerator is not None:
        from dataclasses import replace

        world, rank = accelerator.num_processes, accelerator.process_index
        # The scheduler stays unprepared: accelerate would step it once per process per step.
        model, optimizer = accelerator.prepare(model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        s = replace(s, device=str(accelerator.device))
        torch.manual_seed(s.seed + rank)  # different dropout masks per rank, as different batches
        if not accelerator.is_main_process:
            progress = None  # one rank reports
    main = is_main_process()

    frozen = FrozenBottom.of(model)
    if frozen is not None:
        began = time.perf_counter()
        frozen.fill(list(train_examples) + list(val_examples), s)
        history.frozen_layers = frozen.split
        history.train_seconds += time.perf_counter() - began  # part of training's cost: tokens/s stays honest
    model.train()
    epochs_cache: dict[int, list[list[int]]] = {}
    report = progress or silent
    report(label, start, s.total_steps)
    for step in range(start, s.total_steps):
        if stop_after is not None and step - start >= stop_after:
            history.interrupted = True
            if main:
                save_checkpoint(checkpoint_dir, step, unwrapped, optimizer, scheduler, history, best_state)
            break
        examples, _epoch = batch_at(train_examples, s, step * world + rank, epochs_cache)
        batch = collate(examples, s.pad_id)
        began = time.perf_counter()
        loss = _forward_loss(model, batch, s, frozen, examples)
        if accelerator is None:
            loss.backward()
            loss = loss.detach()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        else:
            accelerator.backward(loss)  # the wrapper averages the gradients across ranks here
            accelerator.clip_grad_norm_(params, 1.0)
            loss = accelerator.reduce(loss.detach(), reduction="mean")  # logged: the mean over ranks
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.train_seconds += time.perf_counter() - began
        tokens = batch["attention_mask"].sum()
        if accelerator is not None:  # every rank's tokens count: tokens/s is the whole run's
            tokens = accelerator.reduce(tokens.to(accelerator.device), reduction="sum")
        history.tokens += int(tokens)
        history.padded_tokens += batch["input_ids"].numel() * world
        history.steps.append(step + 1)
        history.train_loss.append(round(loss.item(), 5))

        done = step + 1
        if val_examples and (done % s.eval_every == 0 or done == s.total_steps):
            val, exact = validation_loss(model, val_examples, s, frozen)
            history.val_steps.append(done)
            history.val_loss.append(round(val, 5))
            history.val_exact.append(round(exact, 4))
            if s.stop_when_exact and history.val_exact[-EXACT_EVALS:] == [1.0] * EXACT_EVALS:
                # Every held-out answer keeps coming out right: more steps cost time and risk overfitting.
                # These weights are the result, even if an earlier step had a lower loss.
                history.best_val_loss, history.best_step = val, done
                best_state = _snapshot(unwrapped)
                history.stopped_early, history.stop_reason = True, "exact"
            elif history.best_val_loss is None or val < history.best_val_loss - 1e-4:
                history.best_val_loss, history.best_step = val, done
                history.evals_without_improvement = 0
                best_state = _snapshot(unwrapped)
            else:
                history.evals_without_improvement += 1
                if history.evals_without_improvement >= s.patience:
                    history.stopped_early, history.stop_reason = True, "patience"
        if done % s.checkpoint_every == 0 and done < s.total_steps and main:
            save_checkpoint(checkpoint_dir, done, unwrapped, optimizer, scheduler, history, best_state)
        if math.isfinite(float(loss)):
            report(label, done, s.total_steps, loss=f"{float(loss):.4f}",
                   tps=f"{history.tokens_per_second:,.0f}")
        if history.stopped_early:
            # End the pass where training stopped, saying why, so a bar does not look frozen part-way.
            report(label, done, done, **{NOTE: "stopped early: " + _STOP_REASONS.get(history.stop_reason or "",
                                                                                     str(history.stop_reason))})
            break
    if accelerator is not None:
        accelerator.wait_for_everyone()  # no rank moves on (to saving, or the next cluster) alone
    return history, best_state


def _no_cache(create_causal_mask) -> dict[str, None]:
    """"No KV cache" in the spelling of the installed transformers: recent releases renamed ``past_key_values``
    to ``cache`` and warn on the old name."""
    import inspect

    return {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
