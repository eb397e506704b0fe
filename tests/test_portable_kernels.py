"""Round-off-sensitive checks re-run on torch's other CPU kernels.

torch picks its vectorised kernels by CPU (AVX-512, AVX2, or the portable "default" ones), and they sum, fuse and
approximate exp/log/sin differently; a tolerance tuned on one CPU fails on another. ATEN_CPU_CAPABILITY makes this
machine use the others, so a selection of the comparisons of two float32 (or float32 vs float64) computations runs
again here in a fresh interpreter for each kernel set. JAX's XLA compiler generates code for the host CPU unless
XLA_FLAGS=--xla_cpu_max_isa caps the instruction set (SSE4_2 gives 4-wide float vectors where AVX-512 gives 8 and
16), so the JAX side of the interop checks is run with the matching cap.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# one or two of each kind: JAX vs torch closed forms and networks, a peer (diffusers) in float32, a batched network
# call vs two calls, fused vs unfused kernels bitwise, the traced solver vs the textbook map, forward sensitivity vs
# autograd, schemes against torchsde, Brownian refinements, an estimator identity through two backward graphs
CHECKS = [
    "tests/test_interop.py::test_sde_closed_forms_in_jax_equal_torch",
    "tests/test_interop.py::test_exported_mlp_equals_torch",
    "tests/test_interop.py::test_exported_denoiser_every_prediction_type",
    "tests/test_interop.py::test_torchsde_euler_equals_native_em",
    "tests/test_interop_diffusers.py::test_sdekit_ddim_equals_diffusers_ddim",
    "tests/test_interop_diffusers.py::test_deis_log_rho_equals_diffusers_deis",
    "tests/test_guidance.py::test_scales_zero_and_one_are_exact_and_others_interpolate",
    "tests/test_trace_guards.py::test_folded_scalar_products_are_bitwise_the_unfused_ones",
    "tests/test_fast_paths.py",
    "tests/test_sensitivity_agreement.py",
    "tests/test_sde_schemes.py",
    "tests/test_brownian_paths.py",
    "tests/test_vae.py::test_dreg_training_step_keeps_iwae_decoder_gradient",
]
ORDER = ["DEFAULT", "AVX2", "AVX512"]


def _capability(env: dict) -> str:
    probe = [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]
    return subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_round_off_checks_pass_on_other_kernels(capability):
    host = torch.backends.cpu.get_cpu_capability()
    if host in ORDER and ORDER.index(host) < ORDER.index(capability.upper()):
        pytest.skip(f"this CPU's best kernels are {host}")
    xla_isa = {"default": "SSE4_2", "avx2": "AVX2"}[capability]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa={xla_isa}".strip())
    assert _capability(env) == capability.upper()     # the variable did switch torch's kernels
    # not the torch.compile variants: with ATEN_CPU_CAPABILITY=default inductor writes scalar C++ that torch 2.13's
    # own headers do not compile (at::vec::VectorizedN undeclared), a compile error and not a round-off question;
    # nor the memory-growth test (minutes of long solves, no comparison of values)
    # a test id in a module that skips itself (diffusers not installed) is "not found" (exit 4): name only what runs
    checks = [c for c in CHECKS if "diffusers" not in c or importlib.util.find_spec("diffusers") is not None]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "--tb=short", "-rf",
           "-k", "not compiled and not memory", *checks]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
