"""One GRPO step, phase by phase: our Trainer against TRL's GRPOTrainer on the same model and data.

Workload (RePIC-like): B = 2 prompts per step, G = 8 completions each, every completion runs to
N new tokens (EOS ignored, so both sides do the same work), beta = 0.04 (reference log-probs on),
LoRA on every Linear outside the vision tower (lm_head included), one policy update per batch.
Prompts are RePIC training prompts from the synthetic world: reference images, a scene, the
concepts' names and info, several times longer than the completions. Same checkpoint, same rows,
same reward function (a cheap deterministic one: rewards are not what is measured).

Phases: rollout (generation), reward, reference log-probs, training forward + backward,
optimizer. Ours: the engine (prompt prefilled once, G forks), group-packed training forward (the
prompt once per group) and the fused loss from hidden states. TRL: HF generate over B*G rows,
B*G unpacked forwards; its phases are read by timing its own methods and Trainer callbacks.
Each of our phases also stands beside its floor (phase_floors: FLOPs / measured matmul rate,
weight bytes / measured copy bandwidth, from the model's own cost accounting).

    python benchmarks/bench_train_step.py                    # CPU: tiny model; GPU: 3B-shaped, random weights
    python benchmarks/bench_train_step.py --memory-7b        # GPU: RePIC's 7B LoRA recipe, peak memory (ours)
                                                             # CPU: the same recipe on the tiny model (a dry run)
Goals: >= 3x TRL per step on CPU, >= 5x on a GPU (3B shape); the 7B recipe fits one 80 GB GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Ceilings, Report, measure_ceilings

PHASES = ("rollout", "reward", "reference", "train", "optimizer")
# TRL refuses a LoRA lm_head (its loss reads lm_head.weight), so neither side puts one there here;
# RePIC's recipe (and our default) does.
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = r"^(?!(?:.*\.)?visual\.)(?:.*\.)?(?:" + "|".join(LEAVES) + ")$"
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
QWEN25_VL_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_position_embeddings=128000)
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
QWEN25_VL_7B = dict(QWEN25_VL_3B, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
QWEN25_VL_7B_VISION = dict(QWEN25_VL_3B_VISION, out_hidden_size=3584)


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    w = p.add_argument_group("workload")
    w.add_argument("--prompts", type=int, default=2, help="prompts per step (B); RePIC: 2")
    w.add_argument("--group", type=int, default=8, help="completions per prompt (G); RePIC: 8")
    w.add_argument("--new-tokens", type=int, default=256 if gpu else 32, help="tokens per completion (N)")
    w.add_argument("--scene-size", type=int, default=952 if gpu else 224, help="query image side (pixels)")
    w.add_argument("--ref-size", type=int, default=224 if gpu else 112, help="reference image side (pixels)")
    w.add_argument("--rows", choices=["pair", "single"], default="single" if gpu else "pair",
                   help="pair: [reference, scene] rows (RePIC's 512 rule); single: scene-only rows (its "
                        "1024 rule: a 952-px scene gives RePIC's ~1,300-token prompts)")
    w.add_argument("--steps", type=int, default=2, help="timed steps of ours (and of TRL unless --trl-steps)")
    w.add_argument("--warmup", type=int, default=2 if gpu else 1,
                   help="our untimed steps first: on a GPU the first compiles FlexAttention for its packed "
                        "length and the second recompiles it for any length (their times go in the card)")
    w.add_argument("--trl-steps", type=int, default=None,
                   help="TRL's timed steps (default --steps), after its one warm-up step (it compiles nothing)")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=["auto", "tiny", "3b", "7b"], default="auto",
                   help="auto: 3b on GPU (7b with --memory-7b), tiny on CPU")
    m.add_argument("--lora-r", type=int, default=64 if gpu else 16)
    m.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadiest on a shared machine)")
    m.add_argument("--skip-trl", action="store_true", help="ours only")
    m.add_argument("--memory-7b", action="store_true",
                   help="RePIC's recipe (LoRA on lm_head too), ours only, peak memory against 80 GB; on the "
                        "7B shape on a GPU, on the tiny model on the CPU (a dry run of the GPU stage)")
    args = p.parse_args()
    args.trl_steps = args.steps if args.trl_steps is None else args.trl_steps
    if min(args.warmup, args.steps, args.trl_steps) < 1:
        p.error("--warmup, --steps and --trl-steps must be at least 1")
    if args.memory_7b and args.model == "3b":
        p.error("--memory-7b runs the 7B shape (or tiny): drop --model 3b")
    if args.model == "7b" and not args.memory_7b:
        p.error("--model 7b is only measured with --memory-7b (TRL's side would not fit beside it)")
    return args


def model_kind(args, device: str) -> str:
    """tiny | 3b | 7b: the shape this run builds."""
    if args.model != "auto":
        return args.model
    if device != "cuda":
        return "tiny"
    return "7b" if args.memory_7b else "3b"


def toy_reward(row, text: str, prompt) -> float:
    return (len(text) % 3) / 2


def trl_reward(completions, **kwargs) -> list[float]:
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [(len(t) % 3) / 2 for t in texts]


# ---------------------------------------------------------------------------------- model, data
def build_checkpoint(kind: str, tmp: Path, device: str, args):
    """(checkpoint dir, factory of our model or None, TRL's model or None). tiny: a real small
    checkpoint both sides load. 3b / 7b: random weights built on the GPU (the directory then only
    carries tokenizer, processor and config); ours copies TRL's weights, so both train the same."""
    from rlpt_fast.testing import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp / "ckpt", "qwen2_5_vl", seed=0, **TINY)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre["max_pixels"] = max(args.scene_size, args.ref_size) ** 2 + 28 * 28  # no down-scaling
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    if kind == "tiny":
        return path, None, None
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(QWEN25_VL_3B if kind == "3b" else QWEN25_VL_7B)
    cfg["vision_config"].update(QWEN25_VL_3B_VISION if kind == "3b" else QWEN25_VL_7B_VISION)
    (path / "config.json").write_text(json.dumps(cfg))
    from rlpt_fast.model import QwenVLModel
    from rlpt_fast.model.config import load_config as load_model_config

    if kind == "7b":
        def ours_7b():
            torch.set_default_dtype(torch.bfloat16)
            try:
                with torch.device(device):
                    return QwenVLModel(load_model_config(path))
            finally:
                torch.set_default_dtype(torch.float32)
        return path, ours_7b, None
    from transformers import AutoConfig, AutoModelForImageTextToText
    with torch.device(device):
        theirs = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)

    def ours_3b():
        with torch.device("meta"):
            ours = QwenVLModel(load_model_config(path))
        ours.to(dtype=torch.bfloat16).to_empty(device=device)
        ours.tie_weights()
        result = ours.load_state_dict(theirs.state_dict(), strict=False)  # a tied head is shared, not loaded
        missing = set(result.missing_keys) - ({"lm_head.weight"} if ours.config.tie_word_embeddings else set())
        if missing or result.unexpected_keys:
            raise RuntimeError(f"weights do not line up: missing {sorted(missing)[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        return ours
    return path, ours_3b, theirs


class World:
    """n training rows of the synthetic world, all with --rows' image count, in a JSONL file."""

    def __init__(self, root: Path, args, n_rows: int):
        from rlpt_fast import synthetic

        files = synthetic.write_world(synthetic.make_world(0, n_concepts=6, n_scenes=12, ref_size=args.ref_size,
                                                           scene_size=args.scene_size), root)
        rows = [json.loads(line) for line in files.rows.read_text().splitlines()]
        # one image count for all rows: transformers' Qwen2.5-VL rope index fails on a left-padded
        # batch whose prompts hold different numbers of images (TRL's generate would crash)
        want = 1 if args.rows == "single" else 2
        rows = [r for r in rows if (1 if isinstance(r["image"], str) else len(r["image"])) == want]
        self.root, self.rows = root, [rows[i % len(rows)] for i in range(n_rows)]
        self.rows_file = root / "bench_rows.jsonl"
        self.rows_file.write_text("".join(json.dumps(r) + "\n" for r in self.rows))


def training_prompts(ckpt: Path, world: World) -> list:
    """The world's rows as our trainer renders them (token counts for the card and the floors)."""
    import random

    from rlpt_fast.data import load_rows
    from rlpt_fast.prompts import PromptBuilder

    builder = PromptBuilder(ckpt)
    return [builder.training_prompt(r, random.Random(0)) for r in load_rows(world.rows_file).rows]


def model_card(kind: str, prompts: list, args, model) -> dict:
    image_id = model.config.image_token_id
    c = model.config
    return {"model": f"{kind}: Qwen2.5-VL architecture, random weights, {c.num_hidden_layers} layers, hidden "
                     f"{c.hidden_size}, vocab {c.vocab_size}; decoder+head {model.weight_bytes() / 2**20:.1f} MiB, "
                     f"vision {model.vision_weight_bytes() / 2**20:.1f} MiB ({model.dtype})",
            "workload": f"B={args.prompts} prompts x G={args.group}, N={args.new_tokens} new tokens (EOS ignored), "
                        f"beta 0.04 k3, LoRA r={args.lora_r} on the decoder's Linears"
                        + (" and lm_head (RePIC)" if args.memory_7b else " (no lm_head: TRL refuses it)") + ", mu=1",
            "prompt_tokens": f"mean {statistics.fmean(p.input_ids.numel() for p in prompts):.0f} (image tokens "
                             f"{statistics.fmean(int((p.input_ids == image_id).sum()) for p in prompts):.0f}), "
                             f"{statistics.fmean(p.input_ids.numel() for p in prompts) / args.new_tokens:.1f}x N",
            "forward_tokens": _forward_tokens(prompts, args),
            "threads": torch.get_num_threads()}


def phase_floors(model, prompts, args, ceil: Ceilings) -> dict[str, float]:
    """Lower bounds (ms) of our phases, from the model's cost accounting and the measured ceilings
    (attention, norms and the vision tower left out; no recomputation of checkpointed blocks):
      rollout    N decode steps each read the decoder + head weights once; prefill and decode
                 matmuls over every prompt (once per group) and sampled token: the larger term
      reference  one forward of the packed tokens (lm_head only at the completion tokens)
      train      forward + the input-gradient half of backward (2x forward: frozen base weights
                 get no weight gradient; LoRA's own matmuls are left out)"""
    c = model.config
    head = 2 * c.hidden_size * c.vocab_size  # lm_head FLOPs per token
    body = model.flops_per_token(0, False) - head  # the decoder's matmuls per token
    b, g, n = len(prompts[:args.prompts]), args.group, args.new_tokens
    prompt = sum(x.input_ids.numel() for x in prompts[:args.prompts])
    rate, bandwidth = ceil.matmul_tflops * 1e12, ceil.copy_gbps * 1e9
    forward = (prompt + b * g * (n - 1)) * body + b * g * n * head
    rollout = max(n * model.weight_bytes() / bandwidth, (prompt * body + b * g * n * (body + head)) / rate)
    floors = {"rollout": rollout, "reference": forward / rate, "train": 2 * forward / rate}
    return {k: 1e3 * v for k, v in floors.items()}


def _forward_tokens(prompts, args) -> str:
    """Tokens one training (or reference) forward processes per step: ours packs each group's
    prompt once; TRL runs B*G rows of prompt + completion."""
    b, g, n = len(prompts[:args.prompts]), args.group, args.new_tokens
    p = sum(x.input_ids.numel() for x in prompts[:args.prompts])
    ours, theirs = p + b * g * (n - 1), g * p + b * g * n
    return f"ours {ours} (packed), TRL {theirs} ({theirs / ours:.1f}x)"


# ------------------------------------------------------------------------------------------ ours
def run_ours(ckpt: Path, rows_file: Path, args, out: Path, model=None) -> tuple[list[dict], dict]:
    from rlpt_fast.train import Trainer, load_config

    r = args.lora_r
    cfg = load_config(None, [
        f"--model.path={ckpt}", f"--data.files=['{rows_file}']", f"--train.output_dir={out}",
        f"--grpo.num_generations={args.group}", f"--grpo.max_new_tokens={args.new_tokens}",
        f"--train.prompts_per_step={args.prompts}", f"--lora.r={r}", f"--lora.alpha={2 * r}",
    ] + ([] if args.memory_7b else [f"--lora.target_modules={json.dumps(list(LEAVES))}"]) + [
        "--data.shuffle=false", "--train.progress=false", "--train.plots=false", "--train.tensorboard=false"])
    trainer = Trainer(cfg, reward_fn=toy_reward, model=model() if model else None)
    progress("ours: trainer built")
    trainer.sampling_overrides = {"ignore_eos": True}
    steps, warmup = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        m = trainer.step()
        m["time_total"] = time.perf_counter() - t0
        phases = ", ".join(f"{ph} {m['time_' + ph]:.2f}" for ph in PHASES)
        progress(f"ours: step {i} in {m['time_total']:.1f} s ({phases})")
        if i < args.warmup:  # compiles, warms caches and allocators
            warmup.append(round(m["time_total"], 2))
            if i == args.warmup - 1:
                print_compile_times()
        else:
            steps.append({"total": m["time_total"], **{ph: m[f"time_{ph}"] for ph in PHASES},
                          "tokens": m["completion_length_mean"], "peak_mb": m["peak_memory_mb"]})
    return steps, {**model_card_args(trainer), "warmup_s": warmup}


def model_card_args(trainer) -> dict:
    return {"model": trainer.model}


_T0 = time.perf_counter()


def print_compile_times() -> None:
    """Where the warm-up steps' compile time went (dynamo's own per-phase table), when anything
    was compiled: on a GPU FlexAttention and its block mask are."""
    from torch._dynamo import utils

    if getattr(utils, "compilation_time_metrics", None):  # empty: nothing compiled (the CPU)
        progress("compile times (torch._dynamo.utils.compile_times):\n" + utils.compile_times(repr="str"))


def progress(what: str) -> None:
    """A line on stderr with the seconds since start: where the time went if the run is cut short."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {what}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- TRL
class _Phases:
    """Wraps TRL's methods and Trainer callbacks to split each step's wall time into phases."""

    def __init__(self, device: str):
        self.device, self.cur, self.steps = device, {}, []

    def clock(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, obj, name: str, phase) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = self.clock()
            try:
                return fn(*a, **k)
            finally:
                ph = phase() if callable(phase) else phase
                self.cur[ph] = self.cur.get(ph, 0.0) + self.clock() - t0
        setattr(obj, name, timed)


def run_trl(ckpt: Path, rows: list[dict], root: Path, args, device: str, model=None) -> list[dict]:
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def example(r):
        imgs = [r["image"]] if isinstance(r["image"], str) else r["image"]
        return {"prompt": [{"role": "user", "content": [{"type": "image"} for _ in imgs] +
                            [{"type": "text", "text": r["problem"]}]}],
                "images": [Image.open(root / p).convert("RGB") for p in imgs]}
    gpu = device.startswith("cuda")
    if model is None:
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32, local_files_only=True)
    n = args.trl_steps + 1
    cfg = GRPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, max_completion_length=args.new_tokens, beta=0.04, learning_rate=1e-5,
        max_steps=n, use_cpu=not gpu, bf16=gpu, gradient_checkpointing=gpu, report_to="none", logging_strategy="no",
        disable_tqdm=True,
        save_strategy="no", generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0,
        remove_unused_columns=False, shuffle_dataset=False, loss_type="grpo", scale_rewards="group")
    ph = _Phases(device)

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            ph.cur, ph.t0 = {}, ph.clock()

        def on_pre_optimizer_step(self, *a, **k):
            ph.t_opt = ph.clock()

        def on_optimizer_step(self, *a, **k):
            ph.cur["optimizer"] = ph.clock() - ph.t_opt

        def on_step_end(self, *a, **k):
            ph.steps.append({**ph.cur, "total": ph.clock() - ph.t0})
            progress(f"trl: step {len(ph.steps) - 1} in {ph.steps[-1]['total']:.1f} s")
    r = args.lora_r
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=cfg, processing_class=AutoProcessor.from_pretrained(ckpt),
                          train_dataset=Dataset.from_list([example(x) for x in rows[:n * args.prompts]]),
                          peft_config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=LORA_TARGETS),
                          callbacks=[Steps()])
    ph.wrap(trainer, "_generate_single_turn", "rollout")
    ph.wrap(trainer, "_calculate_rewards", "reward")
    ph.wrap(trainer, "_get_per_token_logps_and_entropies",
            lambda: "train_logps" if torch.is_grad_enabled() else "reference")
    ph.wrap(trainer, "_prepare_inputs", "prepare")
    ph.wrap(trainer, "training_step", "step_fb")
    trainer.train()
    out = []
    for s in ph.steps[1:]:
        # training_step = _prepare_inputs (generation, rewards, reference) + forward/backward
        s["train"] = s.get("step_fb", 0.0) - s.get("prepare", 0.0)
        out.append({k: s.get(k, 0.0) for k in ("total",) + PHASES})
    return out


# ---------------------------------------------------------------------------------------- report
def median(steps: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in steps) if steps else float("nan")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = model_kind(args, device)
    ceil = measure_ceilings(device)  # first: its buffers are gone before any model is built
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    ckpt, ours_model, trl_model = build_checkpoint(kind, tmp, device, args)
    progress(f"{kind} checkpoint built")
    world = World(tmp / "world", args, n_rows=max(args.warmup + args.steps, args.trl_steps + 1) * args.prompts)
    # the recipe's record has its own subject: the sweep table shows the newest record per subject,
    # and the memory run (no TRL) would hide the speedup of the train stage before it
    report = Report("memory7b" if args.memory_7b else "train_step", device)
    ours, built = run_ours(ckpt, world.rows_file, args, tmp / "ours", model=ours_model)
    prompts = training_prompts(ckpt, world)
    report.card.update(model_card(kind, prompts, args, built["model"]))
    report.card.update(ours_warmup_steps_s=built["warmup_s"], ours_timed_steps=len(ours),
                       trl_timed_steps=0 if args.skip_trl or args.memory_7b else args.trl_steps)
    report.card.update(copy_GBps=round(ceil.copy_gbps, 1), matmul_TFLOPs=round(ceil.matmul_tflops, 2),
                       floor="phase lower bounds from the model's FLOPs and weight bytes (phase_floors)")
    floors = phase_floors(built["model"], prompts, args, ceil)
    floors["total"] = sum(floors.values())
    report.print_card()
    del built
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the engine's KV cache and our optimizer state: TRL gets the memory
    theirs = [] if args.skip_trl or args.memory_7b else run_trl(ckpt, world.rows, world.root, args, device, trl_model)
    for phase in ("total",) + PHASES:
        a, b = median(ours, phase), median(theirs, phase)
        floor = floors.get(phase)
        report.rows.append({"phase": phase, "ours_ms": a * 1e3, "trl_ms": b * 1e3 if theirs else None,
                            "speedup": b / a if theirs and a > 0 else None, "floor_ms": floor,
                            "ours_x_floor": a * 1e3 / floor if floor else None})
    report.print_table(["phase", "ours_ms", "trl_ms", "speedup", "floor_ms", "ours_x_floor"])
    report.finish({**summarize(kind, args, device, ours, theirs),
                   "ours_x_floor": median(ours, "total") * 1e3 / floors["total"]})


def summarize(kind: str, args, device: str, ours: list[dict], theirs: list[dict]) -> dict:
    """The goal of the run: the speedup over TRL, or (--memory-7b) the peak against 80 GB."""
    peak = max(s["peak_mb"] for s in ours)
    out = {"kind": kind, "ours_step_ms": median(ours, "total") * 1e3, "peak_memory_mb": peak}
    if args.memory_7b:
        return {**out, "goal": "peak < 80 GiB (RePIC's 7B LoRA recipe on one GPU)", "meets_goal": peak < 80 * 1024}
    speedup = median(theirs, "total") / median(ours, "total") if theirs else None
    goal = 5.0 if device == "cuda" else 3.0
    return {**out, "speedup_per_step": speedup, "goal": f">= {goal:g}x TRL per step",
            "meets_goal": None if speedup is None else speedup >= goal}


if __name__ == "__main__":
    main()
