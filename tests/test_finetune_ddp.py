"""finetune under ``accelerate launch``: two CPU processes (gloo) really train one adapter together.

The test launches this same file as the training script (``accelerate launch --cpu --num_processes 2``); each
rank runs the ordinary ``slmigrate.finetune.finetune`` on the tiny random Llama and records what it did: the
steps and losses of its loop, a digest of its trainable weights after training, and every adapter save. The test
then checks that both ranks trained the same number of steps on different batches, ended with identical weights
(gradients were averaged), that the loss went down and that the adapter was written exactly once (by rank 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def _rank_main(ws_dir: str, model_dir: str, record_dir: str) -> None:
    """What every rank runs: the ordinary finetune stage, with its loop and adapter saves recorded."""
    import torch

    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    from peft import PeftModel
    from test_finetune import _config

    from slmigrate.finetune import finetune, loop
    from slmigrate.workspace import Workspace

    rank = int(os.environ["RANK"])
    record = Path(record_dir)
    saves = record / "saves.log"
    original_save = PeftModel.save_pretrained

    def save_pretrained(self, *args, **kwargs):
        with open(saves, "a") as fh:
            fh.write(f"rank {rank}\n")
        return original_save(self, *args, **kwargs)

    PeftModel.save_pretrained = save_pretrained
    original_train = loop.train
    seen: list[list[int]] = []
    original_batch_at = loop.batch_at

    def batch_at(examples, s, step, cache):  # which batch index each step of this rank trained on
        seen.append([step])
        return original_batch_at(examples, s, step, cache)

    loop.batch_at = batch_at

    def train(model, *args, **kwargs):
        history, best = original_train(model, *args, **kwargs)
        (record / f"rank-{rank}.json").write_text(json.dumps({
            "world": loop.world_size(), "steps": history.steps, "train_loss": history.train_loss,
            "batches": [b[0] for b in seen], "digest": _digest(model)}))
        return history, best

    loop.train = train
    ws = Workspace.open(Path(ws_dir))
    # No validation-based best state: the weights compared are the trained ones, identical on both ranks.
    result = finetune(ws, _config(model_dir, max_steps=10, eval_every=100, checkpoint_every=4))
    assert result.adapters[0]["status"] == "trained", result


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    if exe.exists():
        return [str(exe)]
    if shutil.which("accelerate"):
        return ["accelerate"]
    pytest.skip("the accelerate launcher is not installed")


@pytest.mark.slow
def test_two_cpu_processes_train_one_adapter(tmp_path):
    from test_finetune import colour_calls, fill_workspace
    from tiny_model import tiny_model_dir

    from slmigrate.workspace import Workspace

    model_dir = tiny_model_dir(tmp_path / "model")
    ws = Workspace.open(tmp_path / "ws")
    fill_workspace(ws, colour_calls(80), lambda r: "colours")
    record = tmp_path / "record"
    record.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    # `--multi_gpu` picks accelerate's torchrun launcher; without CUDA the loop asks for CPU processes (gloo).
    # (`--cpu --num_processes 2` would start a single process unless MPI is installed.)
    cmd = _accelerate() + ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                           __file__, str(tmp_path / "ws"), str(model_dir), str(record)]
    from conftest import run_process  # here: this file is also the script each rank runs, without pytest

    done = run_process(cmd, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((record / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == list(range(1, 11))  # both ranks trained every step
    # Rank r trains batch 2t + r at step t: the two ranks never train the same batch.
    assert ranks[0]["batches"] == [2 * t for t in range(10)]
    assert ranks[1]["batches"] == [2 * t + 1 for t in range(10)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # averaged gradients: the replicas stayed identical
    assert ranks[0]["train_loss"] == ranks[1]["train_loss"]  # the logged loss is the mean over ranks
    assert (record / "saves.log").read_text().splitlines() == ["rank 0"]  # the adapter was written once

    out = ws.path("adapters", "colours", "tiny-llama")
    metrics = json.loads((out / "metrics.json").read_text())
    loss = metrics["history"]["train_loss"]
    assert loss[-1] < loss[0], loss
    assert (out / "adapter_model.safetensors").exists() and not (out / "checkpoints").exists()
    assert ws.manifest("finetune")["counts"]["trained"] == 1


if __name__ == "__main__":  # launched by the test above, once per rank
    _rank_main(*sys.argv[1:4])
