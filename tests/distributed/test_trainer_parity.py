"""`rlpt train` under torchrun with 2 CPU ranks equals one process on the same global batch and
seeds (metrics per step, final weights), for LoRA and full fine-tuning; a resumed 2-rank run
equals an uninterrupted one."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun
from safetensors.torch import load_file

from rlpt_fast import synthetic
from rlpt_fast.train import Trainer, load_config
from rlpt_fast.train.metrics import numeric_part

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-c", "import sys; from rlpt_fast.cli import main; sys.exit(main())"]
LOOSE = ("kl", "clip_ratio")  # token means per micro-batch: averaged over ranks, close, not equal


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.write_world(synthetic.make_world(0, n_concepts=4, n_scenes=8),
                                 tmp_path_factory.mktemp("world"))


def overrides(ckpt, world, out: Path, *extra: str) -> list[str]:
    return [f"--model.path={ckpt}", f"--data.files=['{world.rows}']", f"--train.output_dir={out}",
            "--model.device=cpu", "--grpo.num_generations=4", "--grpo.max_new_tokens=8", "--lora.r=8",
            "--lora.alpha=16", "--lora.dropout=0.0", "--optim.lr=5e-3", "--train.progress=false",
            "--train.plots=false", "--train.tensorboard=false", "--grpo.reward_fn=dist_rewards:length_parity",
            "--train.prompts_per_step=2", *extra]


def env() -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def metrics(run: Path) -> list[dict]:
    return [numeric_part(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want] and got
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            rel = 0.1 if k in LOOSE else 1e-5
            assert g[k] == pytest.approx(w[k], rel=rel, abs=1e-6), (g["step"], k)


def assert_same_files(a: Path, b: Path, atol: float) -> None:
    """Equal safetensors files. fp32 sums in another order differ in the last bits, and AdamW turns
    a gradient that is almost 0 into a full-size step, so a rare element may move ~lr/200; a real
    error would move many elements by ~lr (5e-3): the mean difference tells them apart."""
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=atol, rtol=0, msg=k)
        assert (y[k] - x[k]).abs().mean() <= atol / 50, k


def one_process(ckpt, world, out: Path, *extra: str) -> Path:
    Trainer(load_config(None, overrides(ckpt, world, out, *extra))).train()
    return out


def last_step(run: Path) -> Path:
    return max((run / "checkpoints").glob("step-*"))


def test_lora_two_ranks_equal_one_process_and_resume(dist_ckpt, world, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    extra = ("--train.max_steps=4", "--train.grad_accum=2", "--train.checkpoint_every=2")
    whole = tmp_path / "two"  # through the command line, as a user launches it
    config = tmp_path / "run.toml"
    config.write_text("[train]\nmax_steps = 4\ngrad_accum = 2\ncheckpoint_every = 2\n")
    proc, _ = torchrun(["train", str(config)] + overrides(dist_ckpt, world, whole), env=env(), command=CLI)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert len(proc.stdout.strip().splitlines()[-1:]) == 1 and json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.stdout.count('"checkpoint"') == 1  # the summary line comes from rank 0 only
    out = proc.stdout + proc.stderr  # the memory plan, and its check after step 1, from rank 0
    assert out.count("memory plan per rank (replicate, 2 rank(s))") == 1
    assert out.count("memory check (as planned)") == 1
    one = one_process(dist_ckpt, world, tmp_path / "one", *extra)
    assert_same_metrics(metrics(whole), metrics(one))
    adapter = "adapter/adapter_model.safetensors"
    assert_same_files(last_step(one) / adapter, last_step(whole) / adapter, atol=1e-4)
    assert sorted(p.name for p in (last_step(whole) / "trainer_state_dcp").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]

    cut = tmp_path / "cut"  # the same run stopped after its step-2 checkpoint, then resumed
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "step-00000004").with_name(".tmp-step-00000004").mkdir()  # a save cut short
    proc, _ = torchrun(["train", str(config), "--resume"] + overrides(dist_ckpt, world, cut), env=env(), command=CLI)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "resumed from" in proc.stderr and "step 2" in proc.stderr
    assert_same_metrics(metrics(cut), metrics(whole))
    assert_same_files(last_step(whole) / adapter, last_step(cut) / adapter, atol=0)
    assert not (cut / "checkpoints" / ".tmp-step-00000004").exists()


@pytest.mark.parametrize("variant", [
    # bnpo (token mean per micro-batch) and batch-scaled advantages: the cases ranks must talk for
    ("--train.grad_accum=2", "--grpo.loss_type=bnpo", "--grpo.scale_rewards=batch"),
    # dapo (global token count) with two updates per batch: the root regathered after each step
    ("--grpo.loss_type=dapo", "--grpo.mu=2"),
], ids=["bnpo-batch", "dapo-mu2"])
def test_full_finetuning_two_ranks_equal_one_process(variant, dist_ckpt, world, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    extra = ("--lora.enabled=false", "--train.max_steps=2", "--optim.lr=1e-3", "--grpo.beta=0.04", *variant)
    two = tmp_path / "two"
    proc, _ = torchrun(["run"] + overrides(dist_ckpt, world, two, *extra), env=env(),
                       script=HERE / "train_worker.py")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    out = proc.stdout + proc.stderr
    assert out.count("memory plan per rank (fsdp, 2 rank(s))") == 1
    assert out.count("memory check (as planned)") == 1
    one = one_process(dist_ckpt, world, tmp_path / "one", *extra)
    assert_same_metrics(metrics(two), metrics(one))
    model = "model/model.safetensors"
    assert_same_files(last_step(one) / model, last_step(two) / model, atol=1e-4)
    moved = load_file(str(last_step(one) / model))
    base = load_file(str(dist_ckpt / "model.safetensors"))
    assert any((moved[k] - base[k]).abs().max() > 1e-4 for k in base if k in moved)
