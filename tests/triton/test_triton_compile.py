"""The kernels as a GPU gets them: compiled (not interpreted) for real targets, and the dot precision.

The interpreter accepts code that the compiler rejects and never checks layouts, so
these tests compile the kernels with every feature on (causal, documents, dropout, GQA)
through `triton.compile` for an NVIDIA sm80 target down to a cubin (LLVM and the ptxas
shipped in the triton wheel; no GPU needed) and, for the one AMD-specific failure seen,
for gfx942. Compiling is not running: numerics on a GPU are left to
benchmarks/bench_triton_attention.py. Runtime: 4 compiles, about 10 s of CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton.conftest import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.fixture(scope="module")
def fa():
    from megatron.model.triton_kernels import flash_attention

    if flash_attention.interpreted():
        pytest.skip("TRITON_INTERPRET is set in this process: the kernels are interpreted, not compiled")
    return flash_attention


@pytest.fixture(scope="module")
def compiler(fa):
    """triton.compile and GPUTarget, as of triton 3.9 (older releases spell the signature differently)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"the compile checks are written against triton 3.9's triton.compile; {triton.__version__}")
    return GPUTarget


def test_dot_precision_on_gpu(fa):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fa.dot_precision(torch.float32, None, cuda) == ("tf32" if torch.version.hip is None else "ieee")
    assert fa.dot_precision(torch.float32, False, cuda) == "ieee"
    assert fa.dot_precision(torch.float32, True, cuda) == "tf32"
    assert fa.dot_precision(torch.float32, None, cpu) == "ieee"
    for dt in (torch.float16, torch.bfloat16):  # ignored for 16-bit operands; "ieee" compiles everywhere
        assert fa.dot_precision(dt, None, cuda) == fa.dot_precision(dt, True, cuda) == "ieee"


def test_dot_precision_under_the_interpreter(interpreted):
    """The interpreter multiplies in full fp32 whatever is asked, so the kernels ask for "ieee"."""
    header = interpreted["header"]
    assert header["fp32_dot_precision"] == header["fp32_tf32_asked"] == "ieee"


FLOATS = ("qk_scale", "sm_scale", "dropout_p", "dropout_scale")


def _compile(fn, pointers: dict, constexprs: dict, target, **options):
    """triton.compile of one kernel with the launch options the module uses; arguments not named
    are int32 scalars (sizes and strides)."""
    import triton
    from triton.compiler import ASTSource

    from megatron.model.triton_kernels.flash_attention import LAUNCH

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    return triton.compile(ASTSource(fn, signature, constexprs), target=target, options=dict(LAUNCH, **options))


def _attention_kernels(fa, dt: str, precision: str):
    """(kernel, pointer dtypes, constexprs) of the three attention kernels, everything on."""
    aux = dict(LSE="fp32", DELTA="fp32", RUN_START="i32", RUN_END="i32", SEED="i64")
    # small tiles compile faster; the code paths (tensor-core dots, Philox, masks) are the same
    common = dict(HEAD_DIM=32, BLOCK_D=32, CAUSAL=True, HAS_RUNS=True, DROPOUT=True, PRECISION=precision,
                  BIG=False, BLOCK_M=32, BLOCK_N=32, HQ=4, GROUP=2)
    return {
        "fwd": (fa._fwd_kernel, dict(aux, **dict.fromkeys(("Q", "K", "V", "Out"), dt)), common),
        "dkdv": (fa._bwd_dkdv_kernel, dict(aux, **dict.fromkeys(("Q", "K", "V", "DO", "DK", "DV"), dt)),
                 dict(common, HKV=2)),
        "dq": (fa._bwd_dq_kernel, dict(aux, **dict.fromkeys(("Q", "K", "V", "DO", "DQ"), dt)), common),
    }


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_compiles_for_sm80_bf16(fa, compiler, kernel):
    fn, pointers, constexprs = _attention_kernels(fa, "bf16", fa.dot_precision(torch.bfloat16, None,
                                                                               torch.device("cuda")))[kernel]
    compiled = _compile(fn, pointers, constexprs, compiler("cuda", 80, 32), num_warps=4, num_stages=2)
    assert compiled.asm["cubin"] and "mma.sync" in compiled.asm["ptx"]  # tensor-core dots


def test_dkdv_with_dropout_compiles_for_amd(fa, compiler):
    """An i1 keep mask moved between layouts broke the AMD pipeline (see `_dropout_z`)."""
    fn, pointers, constexprs = _attention_kernels(fa, "bf16", "ieee")["dkdv"]
    compiled = _compile(fn, pointers, constexprs, compiler("hip", "gfx942", 64), num_warps=4, num_stages=2)
    assert compiled.asm["hsaco"]
