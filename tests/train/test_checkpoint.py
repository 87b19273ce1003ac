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


def test_resume_without_checkpoint_starts_fresh(make_config):
    tr = Trainer(make_config(), resume=True)
    assert tr.resume_from is None and tr.state.step == 0 and tr.stream.position == 0


def test_resume_drops_logged_steps_past_the_checkpoint_and_torn_lines(tmp_path):
    from rlpt_fast.train.monitor import Monitor

    mon = Monitor(tmp_path, 5, progress=False, tensorboard=False, plots=False)
    mon.path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    mon.resume_at(2)
    assert mon.path.read_text() == '{"step": 1}\n{"step": 2}\n'


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
