"""Compiles every Triton kernel launch the CPU test-suite makes for an H100 (sm_90), without a GPU.

The interpreter (TRITON_INTERPRET=1) is lenient where the real compiler is not (block shapes of
tl.dot, dtype mixing, scalar types), so a kernel tested only on CPU can still fail to build on the
device. This records every launch of the given test files under the interpreter (kernel, argument
dtypes, constexpr values), then builds each distinct specialization with `triton.compile` for
GPUTarget("cuda", 90, 32) through the wheel's own ptxas, and prints one line per build.

    python tools/hopper_compile_check.py [pytest args...]   # default: tests/kernels tests/rollout
    RLPT_RECORD_PYTHON=/other/venv/bin/python python tools/hopper_compile_check.py  # record there
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100/H200

RECORDER = '''
import atexit, inspect, json, os
import torch
from triton.runtime import interpreter

_seen = {}
_orig = interpreter.InterpretedFunction.run

def _describe(v):
    if isinstance(v, torch.Tensor):
        return ["tensor", str(v.dtype).removeprefix("torch.")]
    if isinstance(v, bool) or v is None or isinstance(v, (int, float, str)):
        return ["value", v]
    return ["value", repr(v)]

def _run(self, *args, grid, warmup, **kwargs):
    sig = inspect.signature(self.fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    desc = {k: _describe(v) for k, v in bound.arguments.items()}
    if "num_warps" in kwargs:  # a launch option, not a parameter: built with it too
        desc["num_warps"] = ["value", kwargs["num_warps"]]
    key = json.dumps([self.fn.__module__, self.fn.__name__, desc], sort_keys=True)
    _seen[key] = 1
    return _orig(self, *args, grid=grid, warmup=warmup, **kwargs)

interpreter.InterpretedFunction.run = _run
atexit.register(lambda: open(os.environ["RLPT_LAUNCH_LOG"], "w").write(json.dumps(list(_seen))))
'''


def record(pytest_args: list[str], log: Path) -> list:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "rlpt_launch_recorder.py").write_text(RECORDER)
        env = dict(os.environ, TRITON_INTERPRET="1", RLPT_LAUNCH_LOG=str(log),
                   PYTHONPATH=os.pathsep.join([d, os.environ.get("PYTHONPATH", "")]))
        # RLPT_RECORD_PYTHON: a test environment other than the building one (e.g. a newer Triton
        # records, the device's Triton version builds).
        cmd = [os.environ.get("RLPT_RECORD_PYTHON", sys.executable), "-m", "pytest", "-q", "-x", "-p", "rlpt_launch_recorder",
               "-p", "no:cacheprovider", *pytest_args]
        subprocess.run(cmd, env=env, check=False, cwd=Path(__file__).resolve().parents[1])
    return [json.loads(k) for k in json.loads(log.read_text())]


# The device runs the rollout kernels in bf16 at Qwen2.5-VL's shapes (head_dim 128; 3B: 16 query
# heads over 2 KV heads, 7B: 28 over 4; 16-token pages) and the loss kernels on bf16 logits. The
# CPU tests launch them in fp32 at small shapes, so each launch is also built at those shapes.
BF16_ARGS = {"Q", "K", "V", "K_cache", "V_cache", "Out", "logits_ptr", "Logits",
             # the decoder's fused inference ops (kernels/decode_ops.py)
             "X", "Res", "W", "ResOut", "Gate", "Up", "Cos", "Sin", "QOut", "KOut"}
HOPPER_CONSTEXPRS = [{"HEAD_DIM": 128, "BLOCK_D": 128, "GROUP": 8, "BLOCK_G": 16, "PAGE": 16, "IEEE": False},
                     {"HEAD_DIM": 128, "BLOCK_D": 128, "GROUP": 7, "BLOCK_G": 16, "PAGE": 16, "IEEE": False}]


# The decoder's fused ops at Qwen2.5-VL 3B / 7B: hidden 2048 / 3584 (rows of 2048 / 4096),
# intermediate 11008 / 18944 (blocks of 2048), 16 / 28 query heads over 2 / 4 KV heads of 128.
DECODE_OP_CONSTEXPRS = {
    "_rms_norm_kernel": [{"BLOCK_H": 2048, "HAS_RES": r, "num_warps": 8} for r in (False, True)]
                        + [{"BLOCK_H": 4096, "HAS_RES": r, "num_warps": 16} for r in (False, True)],
    "_silu_mul_kernel": [{"BLOCK": 2048}],
    "_rotary_kernel": [{"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_HQ": 16, "BLOCK_HK": 2},
                       {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_HQ": 32, "BLOCK_HK": 4}],
}
DECODE_OP_CONSTEXPRS["_rotary_store_kv_kernel"] = DECODE_OP_CONSTEXPRS["_rotary_kernel"]  # rollout/kv_store.py
DECODE_OP_CONSTEXPRS["_sample_kernel"] = [{"BLOCK_V": 4096, "num_warps": 8}]  # rollout/sampler_triton.py, V 151936


def hopper_variants(name: str, desc: dict) -> list[dict]:
    """`desc` again with bf16 inputs, and at each of Qwen's shapes where it has them (attention
    kernels by their HEAD_DIM, the decoder's fused ops by name)."""
    bf16 = {k: ["tensor", "bfloat16"] if k in BF16_ARGS and v[0] == "tensor" else v for k, v in desc.items()}
    if "IEEE" in bf16:  # fp32-exact dots are asked for fp32 caches only
        bf16["IEEE"] = ["value", False]
    configs = DECODE_OP_CONSTEXPRS.get(name) or (HOPPER_CONSTEXPRS if "HEAD_DIM" in desc else [])
    shaped = [{**bf16, **{k: ["value", c] for k, c in cfg.items() if k in desc}} for cfg in configs]
    return [bf16, *shaped]


def build(launches: list) -> int:
    import importlib

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import mangle_type

    target = GPUTarget("cuda", 90, 32)
    failures, done = 0, set()
    launches = [(m, n, v) for m, n, d in launches for v in (d, *hopper_variants(n, d))]
    for module, name, desc in launches:
        fn = getattr(importlib.import_module(module), name)
        signature, constexprs = {}, {}
        for p in fn.params:
            kind, v = desc[p.name]
            value = torch.empty(1, dtype=getattr(torch, v)) if kind == "tensor" else v
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
            else:
                signature[p.name] = mangle_type(value)
                if signature[p.name] == "constexpr":
                    constexprs[p.name] = value
        options = {"num_warps": desc["num_warps"][1]} if "num_warps" in desc else {}
        label = f"{module}.{name} " + ",".join(f"{k}={v}" for k, v in signature.items() if v != "constexpr")
        label += "".join(f" {k}={v}" for k, v in options.items())
        if (label, repr(constexprs)) in done:
            continue
        done.add((label, repr(constexprs)))
        try:
            kernel = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=target,
                                    options=options)
            smem = kernel.metadata.shared
            status = "ok  " if smem <= SMEM_LIMIT else "FAIL"
            failures += smem > SMEM_LIMIT
            print(status, label, {k: v for k, v in constexprs.items()}, f"shared={smem}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failures += 1
            print("FAIL", label, {k: v for k, v in constexprs.items()})
            print("     ", str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))
    return failures


def main() -> int:
    args = sys.argv[1:] or ["tests/kernels", "tests/rollout"]
    with tempfile.TemporaryDirectory() as d:
        launches = record(args, Path(d, "launches.json"))
    print(f"{len(launches)} distinct launches recorded; building each for sm_90")
    os.environ.pop("TRITON_INTERPRET", None)
    failures = build(launches)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
