"""Checkpoints: safetensors + JSON only, atomic, and a resumed Trainer holds exactly the saved state."""
import random

import numpy as np
import torch

from rlpt_fast.model import load_model
from rlpt_fast.train import checkpoint as ckpt
from rlpt_fast.train.trainer import Trainer


def test_save_and_resume_restore_everything(make_config):
    cfg = make_config("--train.save_merged=true", "--lora.dropout=0")
    tr = Trainer(cfg)
    tr.step()
    random.random(), np.random.rand(), torch.rand(1)  # move every generator away from its seed
    path = tr.save()
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    assert path.name == "step-00000001"
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "trainer_state.json",
            "trainer_state.safetensors", "merged/config.json", "merged/model.safetensors"} <= files
    assert all(f.endswith((".json", ".safetensors", ".jinja")) for f in files), files

    # a crash in a later save leaves a .tmp dir: never taken for a checkpoint, removed on resume
    stale = ckpt.checkpoint_root(cfg.train.output_dir) / ".tmp-step-00000002-999"
    stale.mkdir()
    (stale / "trainer_state.json").write_text("{")
    assert ckpt.latest_checkpoint(cfg.train.output_dir) == path

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    back = Trainer(cfg, resume=True)
    assert not stale.exists()
    assert random.getstate() == rng[0] and np.array_equal(np.random.get_state()[1], rng[1])
    assert torch.equal(torch.get_rng_state(), rng[2])
    assert (back.state.step, back.state.updates, back.stream.position) == (1, 1, tr.stream.position)
    for (n, p), (n2, q) in zip(tr.model.named_parameters(), back.model.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    sa, sb = tr.optimizer.state_dict(), back.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]), (tr.param_names[i], k)

    # the merged directory is the LoRA model with the adapter folded in
    merged = load_model(path / "merged")
    p = tr.last_rollouts[0].prompt
    ids = p.input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged.logits(ids, p.pixel_values, p.image_grid_thw),
                                   tr.model.eval().logits(ids, p.pixel_values, p.image_grid_thw), atol=1e-4, rtol=1e-4)


def test_resume_without_checkpoint_starts_fresh_and_says_so(make_config, capsys):
    tr = Trainer(make_config("--train.max_steps=1"), resume=True)
    assert tr.resume_from is None and tr.state.step == 0 and tr.stream.position == 0
    tr.train()
    assert f"--resume: no checkpoint in {ckpt.checkpoint_root(tr.output_dir)}; starting from step 0" in capsys.readouterr().err


def test_resume_drops_logged_steps_past_the_checkpoint_and_torn_lines(tmp_path):
    from rlpt_fast.train.monitor import Monitor

    mon = Monitor(tmp_path, 5, progress=False, tensorboard=False, plots=False)
    mon.path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    mon.resume_at(2)
    assert mon.path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_resume_rewrites_metrics_by_rename_never_truncating_them_first(tmp_path, monkeypatch):
    import pytest

    from rlpt_fast.train import monitor

    mon = monitor.Monitor(tmp_path, 5, progress=False, tensorboard=False, plots=False)
    mon.path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')

    def killed(*args):
        raise OSError("killed mid-rewrite")
    monkeypatch.setattr(monitor.os, "replace", killed)
    with pytest.raises(OSError):
        mon.resume_at(2)
    assert mon.path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_full_fine_tuning_checkpoint_resumes_weights_and_optimizer(make_config):
    cfg = make_config("--lora.enabled=false", "--optim.lr=1e-3", "--grpo.beta=0")
    tr = Trainer(cfg)
    tr.step()
    path = tr.save()
    assert (path / "model" / "config.json").is_file() and not (path / "adapter").exists()
    back = Trainer(cfg, resume=True)
    for (n, p), (_, q) in zip(tr.model.named_parameters(), back.model.named_parameters()):
        assert torch.equal(p, q), n
    assert back.param_names == tr.param_names
    a, b = tr.optimizer.state_dict()["state"], back.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _shrink_a_moment(d):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "trainer_state.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("/exp_avg"))
    tensors[key] = tensors[key].flatten()[:1].clone()
    save_file(tensors, str(d / "trainer_state.safetensors"))


def test_corrupt_latest_checkpoint_is_named_with_the_way_out(make_config):
    import shutil

    import pytest

    cfg = make_config("--lora.dropout=0")
    tr = Trainer(cfg)
    tr.step()
    good = tr.save()
    bad = ckpt.step_dir(cfg.train.output_dir, 2)
    (good.parent / "step-00000009.bak").mkdir()  # a user's copy: never taken for a checkpoint
    cases = [
        (lambda d: (d / "trainer_state.json").write_text('{"format": 1, "st'), "trainer_state.json: unreadable"),
        (lambda d: (d / "trainer_state.json").write_text('{"format": 1}'), "trainer_state.json: missing ['step'"),
        (lambda d: (d / "adapter" / "adapter_model.safetensors").unlink(), "no adapter/adapter_model.safetensors"),
        (lambda d: _truncate(d / "trainer_state.safetensors"), "trainer_state.safetensors: cannot load it"),
        (lambda d: _truncate(d / "adapter" / "adapter_model.safetensors"), "adapter: cannot load it"),
        (_shrink_a_moment, "has shape (1,), the parameter ("),
    ]
    for corrupt, needle in cases:
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(good, bad)
        corrupt(bad)
        assert ckpt.latest_checkpoint(cfg.train.output_dir) == bad
        with pytest.raises(ckpt.CheckpointError) as e:
            Trainer(cfg, resume=True)
        assert needle in str(e.value) and f"move {bad} away to resume from step-00000001" in str(e.value), str(e.value)
    shutil.rmtree(bad)
    with pytest.raises(ckpt.CheckpointError, match="step-00000001: checkpoint was taken with train.seed=42, .* has 7"):
        Trainer(make_config("--train.seed=7"), resume=True)
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint was taken over {len(tr.rows)} training rows"):
        Trainer(make_config(), rows=tr.rows[:-1], resume=True)
    with pytest.raises(ckpt.CheckpointError, match="no model/config.json .*lora.enabled=false"):
        Trainer(make_config("--lora.enabled=false", "--grpo.beta=0"), resume=True)  # a LoRA run's checkpoint


def test_saving_a_step_again_replaces_it_whole(make_config):
    tr = Trainer(make_config())
    tr.step()
    first = tr.save()
    (first / "stale-file").write_text("from the first save")
    again = tr.save()
    assert again == first and not (again / "stale-file").exists()
    assert sorted(p.name for p in again.parent.iterdir()) == ["step-00000001"]  # no .tmp-* left behind


def test_failed_step_saves_the_steps_done_and_resume_retries_it_exactly(make_config, tmp_path):
    import json

    import pytest

    from rlpt_fast.train.metrics import numeric_part
    from rlpt_fast.train.scoring import RewardError
    from toy_rewards import length_parity

    def lines(cfg):
        path = ckpt.Path(cfg.train.output_dir) / "metrics.jsonl"
        return [numeric_part(json.loads(x)) for x in path.read_text().splitlines()]

    full_cfg = make_config("--train.max_steps=3", f"--train.output_dir={tmp_path / 'full'}")
    full = Trainer(full_cfg)
    full.train()

    cfg = make_config("--train.max_steps=3")  # lora dropout 0.05: the torch RNG matters
    holder = {}

    def fails_in_step_3(row, text, prompt):
        if holder["trainer"].state.step == 2:
            raise RuntimeError("reward server down")
        return length_parity(row, text, prompt)
    holder["trainer"] = cut = Trainer(cfg, reward_fn=fails_in_step_3)
    with pytest.raises(RewardError, match="reward server down"):
        cut.train()
    assert ckpt.latest_checkpoint(cfg.train.output_dir).name == "step-00000002"  # checkpoint_every = 0

    resumed = Trainer(cfg, resume=True)
    assert (resumed.state.step, resumed.stream.position) == (2, 2 * cfg.train.prompts_per_step)
    resumed.train()
    assert lines(cfg) == lines(full_cfg)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


def test_failure_after_an_update_saves_nothing_half_done(make_config, monkeypatch):
    from rlpt_fast.train import trainer as trainer_mod

    tr = Trainer(make_config("--train.max_steps=3", "--grpo.mu=2", "--grpo.beta=0"))
    calls = {"n": 0}
    real = trainer_mod.policy_loss

    def fails_in_second_update_of_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise MemoryError("out of memory")
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer_mod, "policy_loss", fails_in_second_update_of_step_2)
    try:
        tr.train()
    except MemoryError:
        pass
    else:
        raise AssertionError("the step did not fail")
    assert ckpt.latest_checkpoint(tr.output_dir) is None  # step 2's first update changed the weights


def test_non_finite_abort_saves_the_run_and_resume_continues_it(make_config, monkeypatch):
    import pytest

    from rlpt_fast.train import trainer as trainer_mod
    from rlpt_fast.train.trainer import NonFiniteLossError

    cfg = make_config("--train.max_steps=5", "--train.max_nonfinite=2")
    tr = Trainer(cfg)
    real = trainer_mod.policy_loss

    def nan_after_step_1(*args, **kwargs):
        out = real(*args, **kwargs)
        if tr.state.step >= 1:
            out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(trainer_mod, "policy_loss", nan_after_step_1)
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps") as e:
        tr.train()
    saved = ckpt.latest_checkpoint(cfg.train.output_dir)
    assert saved is not None and saved.name == "step-00000003"  # checkpoint_every = 0: only this save
    assert e.value.checkpoint == saved and f"saved in {saved}" in str(e.value) and "--resume" in str(e.value)

    monkeypatch.setattr(trainer_mod, "policy_loss", real)
    resumed = Trainer(make_config("--train.max_steps=5", "--optim.lr=1e-3"), resume=True)
    assert (resumed.state.step, resumed.state.updates, resumed.stream.position) == (3, 3, tr.stream.position)
    assert resumed.state.nonfinite_streak == 0  # the resumed run gets max_nonfinite tries again
    for (n, p), (_, q) in zip(tr.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    assert resumed.train()["steps"] == 5 and resumed.state.nonfinite_streak == 0


def test_non_finite_abort_under_torchrun_saves_nothing():
    from types import SimpleNamespace

    from rlpt_fast.train.guard import NonFiniteLossError, StepGuard

    def save():
        raise AssertionError("a save under torchrun is collective: the abort must not start one")
    trainer = SimpleNamespace(dist=SimpleNamespace(distributed=True), state=ckpt.TrainerState(step=3),
                              resume_from=None, save=save, params=[torch.zeros(2)])
    error = NonFiniteLossError("aborting at step 3", {"step": 3})
    StepGuard(trainer).aborted(error)
    assert str(error) == "aborting at step 3" and error.checkpoint is None
