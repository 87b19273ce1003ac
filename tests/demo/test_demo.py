"""`rlpt demo` end to end at reduced size: the F1 rises, and the JSON it prints agrees with the
metric recomputed from the caption files it wrote. (The full-size gain is measured by running
`rlpt demo`; see the report in the demo's output directory.)"""
import json

import pytest

from rlpt_fast.cli import build_parser
from rlpt_fast.demo.base_model import BaseModelConfig
from rlpt_fast.demo.command import config_from_args
from rlpt_fast.demo.evaluate import PROTOCOL
from rlpt_fast.demo.pipeline import DemoConfig, run_demo
from rlpt_fast.demo.rl import RLConfig
from rlpt_fast.demo.world import build_world, non_name_accuracy
from rlpt_fast.metrics import score_file

SMALL = dict(n_concepts=4, n_scenes=60, eval_fraction=0.2, pretrain_scenes=30,
             base=BaseModelConfig(hidden_size=64, intermediate_size=128, steps=100, batch=8,
                                  personal_rate=0.2, lr=4e-3),
             rl=RLConfig(steps=10, prompts_per_step=4, num_generations=8, lr=3e-3, beta=0.2,
                         max_new_tokens=48))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    logs = []
    result = run_demo(DemoConfig(out_dir=out, seed=0, **SMALL), log=logs.append)
    return out, result, logs


def test_f1_rises(demo):
    _, result, _ = demo
    assert result["after"]["f1"] > result["before"]["f1"] + 10
    assert result["f1_gain"] == pytest.approx(result["after"]["f1"] - result["before"]["f1"], abs=0.02)


def test_json_schema(demo):
    out, result, _ = demo
    json.loads(json.dumps(result))  # plain JSON
    for k in ("before", "after"):
        assert set(result[k]) == {"precision", "recall", "f1"}
        assert all(0.0 <= v <= 100.0 for v in result[k].values())
    assert set(result["non_name_accuracy"]) == {"before", "after"}
    assert result["steps"] == SMALL["rl"].steps
    assert 0 < result["seconds"]
    for key in ("report", "metrics", "checkpoint"):
        assert (out / result[key]).exists() if not result[key].startswith("/") else \
            __import__("pathlib").Path(result[key]).exists()
    metrics = [json.loads(x) for x in open(result["metrics"])]
    assert [m["step"] for m in metrics] == list(range(1, SMALL["rl"].steps + 1))


def test_values_match_the_metric_on_the_caption_files(demo):
    out, result, _ = demo
    dw = build_world(out / "world_again", 0, SMALL["n_concepts"], SMALL["n_scenes"], SMALL["eval_fraction"])
    for k in ("before", "after"):
        s = score_file(result["captions"][k], PROTOCOL)
        assert result[k] == {"precision": round(s.precision, 2), "recall": round(s.recall, 2),
                             "f1": round(s.f1, 2)}
        rows = json.loads(open(result["captions"][k]).read())
        assert [r[1] for r in rows] == [list(q.concepts) for q in dw.queries]
        acc = [non_name_accuracy(r[2], dw.world, dw.scene_of(q)) for r, q in zip(rows, dw.queries)]
        assert result["non_name_accuracy"][k] == pytest.approx(100 * sum(acc) / len(acc), abs=0.01)


def test_report_states_the_numbers(demo):
    out, result, _ = demo
    text = open(result["report"]).read()
    assert f"| {result['before']['f1']:.1f} |" in text and f"| {result['after']['f1']:.1f} |" in text
    assert json.dumps(result, indent=2) in text


def test_cli_arguments_map_to_the_config():
    args = build_parser("demo").parse_args(["demo", "--out", "x", "--seed", "3", "--warm-steps", "7",
                                            "--rl-steps", "5", "--lr", "0.01", "--beta", "0.1",
                                            "--pretrain-scenes", "9"])
    cfg = config_from_args(args)
    assert (cfg.seed, cfg.base.steps, cfg.rl.steps, cfg.rl.lr, cfg.rl.beta, cfg.threads,
            cfg.pretrain_scenes) == (3, 7, 5, 0.01, 0.1, 2, 9)
    assert str(cfg.out_dir) == "x"
    with pytest.raises(ValueError, match="threads"):
        DemoConfig(threads=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        DemoConfig(eval_fraction=1.0)
    with pytest.raises(ValueError, match="pretrain_scenes"):
        DemoConfig(pretrain_scenes=-1)
