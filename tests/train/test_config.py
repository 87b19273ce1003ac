"""TrainConfig: RePIC defaults, TOML loading, overrides, and errors that name the key."""
import pytest

import rlpt_fast.train.cli  # noqa: F401  (loaded with the rest at collection; see the CLI test)
from rlpt_fast.cli import main
from rlpt_fast.train.config import ConfigError, TrainConfig, load_config
from rlpt_fast.train.config_file import parse_override


def test_defaults_are_repics_run():
    c = TrainConfig()
    assert (c.lora.enabled, c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (True, 64, 128.0, 0.05, [])
    g = c.grpo
    assert (g.num_generations, g.beta, g.kl, g.eps_low, g.eps_high, g.loss_type, g.mu) == (8, 0.04, "k3", 0.2, 0.2, "grpo", 1)
    assert (g.max_new_tokens, g.temperature, g.top_p, g.reward_compat) == (256, 1.0, 1.0, "repic")
    assert (c.optim.lr, c.optim.schedule, c.train.prompts_per_step, c.train.epochs) == (1e-5, "linear", 2, 2)


def test_toml_relative_paths_and_overrides(tmp_path):
    (tmp_path / "run.toml").write_text(
        '[model]\npath = "ckpt"\n[data]\nfiles = ["a.jsonl", "/abs/b.jsonl"]\ntask_mix = {iou = 0, yes_no = 2}\n'
        '[grpo]\nbeta = 0.0\n[train]\noutput_dir = "out"\n[engine]\nblock_size = 8\n')
    c = load_config(tmp_path / "run.toml", ["--grpo.num_generations=4", "--lr=3e-4", "--loss_type=dapo",
                                            "--train.save_merged=true", "--optim.betas=[0.9, 0.95]"])
    assert c.model.path == str(tmp_path / "ckpt")
    assert c.data.files == [str(tmp_path / "a.jsonl"), "/abs/b.jsonl"]
    assert c.data.task_mix == {"iou": 0, "yes_no": 2}
    assert c.train.output_dir == str(tmp_path / "out")
    assert (c.grpo.beta, c.grpo.num_generations, c.optim.lr, c.grpo.loss_type) == (0.0, 4, 3e-4, "dapo")
    assert c.train.save_merged is True and c.optim.betas == [0.9, 0.95] and c.engine == {"block_size": 8}
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_override_values_parse_as_toml():
    assert parse_override("--grpo.beta=0") == ("grpo.beta", 0)
    assert parse_override("--model.path=/x/y") == ("model.path", "/x/y")
    assert parse_override("--train.progress=false") == ("train.progress", False)
    assert parse_override("--max-new-tokens=12") == ("max_new_tokens", 12)


@pytest.mark.parametrize("toml, overrides, needle", [
    ("[grpo]\nbetta = 0.1\n", [], "grpo.betta"),
    ("[trainer]\nx = 1\n", [], "[trainer]"),
    ("seed = 3\n[train]\nepochs = 1\n", [], "seed is a key of [train]: write it under that table"),
    ("", ["--grpo.nope=1"], "grpo.nope"),
    ("", ["--nope=1"], "--nope"),
    ("", ["--seed=x"], "train.seed"),
    ("", ["--grpo.kl=k4"], "grpo.kl"),
    ("", ["--grpo.num_generations=1"], "grpo.num_generations"),
    ("", ["--lora.dropout=1.5"], "lora.dropout"),
    ("", ["--data.task_mix={bogus = 1}"], "bogus"),
    ("", ["--engine.block_sz=8"], "block_sz"),
    ("", ["--engine.block_size=0"], "block_size"),
    ("", ["--grpo.reward_fn=nocolon"], "grpo.reward_fn"),
    ("[grpo]\nbeta = \n", [], "not valid TOML"),
    ('[optim]\nbetas = ["a", "b"]\n', [], "optim.betas[0]: expected a number, got 'a'"),
    ("", ["--data.files=[1]"], "data.files[0]: expected a string, got 1"),
    ("", ["--lora.target_modules=['q_proj', 2]"], "lora.target_modules[1]: expected a string"),
    ("[optim]\nlr = inf\n", [], "optim.lr: expected a finite number, got inf"),
    ("", ["--grpo.beta=nan"], "grpo.beta: expected a finite number"),
    ('[model]\ndevice = "gpu"\n', [], "model.device"),
    ("", ["--model.device=cuda:x"], "model.device"),
    ("", ["--data.files="], "data.files: must be paths"),
    ("", ["--engine.max_model_len=1.5"], "engine.max_model_len: expected an integer, got 1.5"),
    ("", ["--engine.block_size=true"], "engine.block_size: expected an integer"),
    ("", ["--engine.cuda_graphs=1"], "engine.cuda_graphs: expected true or false"),
    ("", ["--engine.gpu_memory_utilization=nan"], "engine.gpu_memory_utilization: expected a finite number"),
])
def test_errors_name_the_key(tmp_path, toml, overrides, needle):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert needle in str(e.value)


def test_every_bare_key_resolves_to_its_section():
    from rlpt_fast.train.config import SECTION_TYPES
    from rlpt_fast.train.config_file import _resolve_key

    for section, kind in SECTION_TYPES.items():
        for name in kind.__dataclass_fields__:
            assert _resolve_key(name) == (section, name)
    assert load_config(None, ["--enabled=false"]).lora.enabled is False


def test_rlpt_train_reports_bad_config_and_bad_rows_in_one_line(tmp_path, capsys):
    # rlpt_fast.train.cli is imported at the top of this file, not by main(): otherwise it was the
    # one module this suite read from disk minutes after collection, and on a checkout being
    # edited meanwhile a newer cli.py met the older modules already loaded (the one-off failure)
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\npath = "nowhere"\n[data]\nfiles = ["rows.jsonl"]\n[grpo]\nbetta = 1\n')
    rc, err = main(["train", str(cfg)]), capsys.readouterr().err
    assert rc == 1 and "grpo.betta" in err, err
    (tmp_path / "rows.jsonl").write_text('{"image": "x.png", "problem": "p", "solution": "maybe", '
                                         '"accu_reward_method": "yes_no"}\n')
    cfg.write_text('[model]\npath = "nowhere"\n[data]\nfiles = ["rows.jsonl"]\n')
    rc, err = main(["train", str(cfg), "--train.progress=false"]), capsys.readouterr().err
    assert rc == 1 and "rows.jsonl: line 1" in err and "'yes' or 'no'" in err, err


@pytest.mark.parametrize("content, needle", [(None, "config file not found"),
                                             (b'[model]\npath = "\xff"\n', "cannot read the config file")])
def test_unreadable_config_file_is_a_config_error_naming_it(tmp_path, content, needle):
    path = tmp_path / "run.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"run.toml: {needle}"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path)  # a directory


def test_rlpt_train_reports_set_up_faults_in_one_line(tmp_path, capsys):
    import torch
    from PIL import Image

    from rlpt_fast.testing import write_tiny_checkpoint

    (tmp_path / "rows.jsonl").write_text("")
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\npath = "nowhere"\n[data]\nfiles = ["rows.jsonl"]\n[train]\nprogress = false\n')
    assert main(["train", str(tmp_path / "absent.toml")]) == 1
    assert "absent.toml: config file not found" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", str(cfg), "--model.device=cuda"]) == 1
        assert "no CUDA device is available" in capsys.readouterr().err
    assert main(["train", str(cfg), "--data.files=['absent.jsonl']"]) == 1
    assert "absent.jsonl: file: training rows file not found" in capsys.readouterr().err
    write_tiny_checkpoint(tmp_path / "ckpt", "qwen2_5_vl", seed=0)
    (tmp_path / "a.png").write_bytes(b"")  # every row invalid and skipped: no rows are left
    (tmp_path / "rows.jsonl").write_text('{"image": "a.png", "problem": "p", "solution": "yes", '
                                         '"accu_reward_method": "yes_no"}\n')
    assert main(["train", str(cfg), f"--model.path={tmp_path / 'ckpt'}", "--data.skip_invalid=true"]) == 1
    err = capsys.readouterr().err
    assert "no valid training rows" in err and "rows.jsonl: line 1: unreadable image" in err, err
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["train", str(cfg), f"--model.path={tmp_path / 'no_model'}"]) == 1
    assert "no_model" in capsys.readouterr().err


def test_reward_fn_that_is_not_a_function_is_a_value_error():
    from rlpt_fast.train.scoring import import_reward

    with pytest.raises(ValueError, match="grpo.reward_fn='math:pi' is not callable"):
        import_reward("math:pi")
    with pytest.raises(ValueError, match="cannot import it"):
        import_reward("no_such_module_here:f")
