"""Packaging for rlpt-fast.

Two import packages come from this one distribution:
  rlpt_kernels  (folder kernels/)   Triton kernels for the GRPO loss path; needs torch and triton only.
  rlpt_fast     (folder rlpt_fast/) the trainer: model, rollout engine, recipe, CLI `rlpt`.
The kernels live in kernels/ but install as `rlpt_kernels`: the name `kernels` belongs to another
package that transformers imports.
"""
from setuptools import Extension, find_packages, setup

KERNEL_DEPS = [
    "torch>=2.11,<2.15",
    # Triton ships inside CUDA builds of torch; the CPU build needs it from PyPI (tests run it in
    # the interpreter there).
    "triton>=3.6,<3.10",
]
TRAINER_DEPS = [
    "numpy",
    "pillow",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "jinja2",
    "tqdm",
]

rlpt_fast_packages = find_packages(include=["rlpt_fast", "rlpt_fast.*"])
kernel_packages = ["rlpt_kernels"] + [
    "rlpt_kernels." + p for p in find_packages(where="kernels")
]

# The scheduler's decode-step bookkeeping in C++ (plain CPython C API: no pybind11, no torch
# headers). optional=True: without a compiler the install still succeeds and the engine uses the
# Python path (rlpt_fast/rollout/host_path.py picks).
host_extension = Extension(
    "rlpt_fast._host",
    sources=["csrc/host_path.cpp"],
    depends=["csrc/block_pool.h", "csrc/py_ref.h"],
    language="c++",
    extra_compile_args=["-O2", "-std=c++17"],
    optional=True,
)

setup(
    name="rlpt-fast",
    version="0.1.0",
    description="Fast single-node GRPO post-training of Qwen2-VL / Qwen2.5-VL for personalized captioning",
    python_requires=">=3.10",
    packages=kernel_packages + rlpt_fast_packages,
    package_dir={"rlpt_kernels": "kernels", "rlpt_fast": "rlpt_fast"},
    install_requires=KERNEL_DEPS + TRAINER_DEPS,
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "hypothesis>=6",
            # transformers' Qwen-VL processors import torchvision; 0.29.1 pins torch 2.14.1, the
            # pair that exists for this workplace's Python (see README).
            "torchvision==0.29.1",
            "transformers>=5.17,<6",
            "peft>=0.17",
            "trl>=1.0,<2",
            "matplotlib",  # the trainer's PNG curves are part of what the tests check
        ],
        "bench": [
            "liger-kernel>=0.6",
            "trl>=1.0,<2",
            "transformers>=5.17,<6",
        ],
        "plots": ["matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["rlpt=rlpt_fast.cli:main"]},
    ext_modules=[host_extension],
)
