"""Triton-specific tests of the gmd_ext::<op>_triton ops (run on CPU through TRITON_INTERPRET=1, see conftest.py).

The op-level tests (test_gram.py, ...) cover every backend on the common matrix; these target what is particular
to the Triton kernels: block and tile boundaries, strides, determinism, the custom-op registration, and the
ahead-of-time compile for sm_90.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from gmd_ext import testing
from gmd_ext.ops import reference
from gmd_ext.testing import assert_close_rel

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (`pip install triton`)")

from gmd_ext.ops._registry import triton_ops  # noqa: E402
from gmd_ext.triton import combine as tcombine, gram as tgram, pcgrad_coefficients as tpc  # noqa: E402

ops = triton_ops()
EPS32 = torch.finfo(torch.float32).eps
# The device axis (gmd_ext.testing): CPU through the interpreter, each GPU compiled (run there with
# TRITON_INTERPRET=0). Every device is collected everywhere and skipped where absent or not runnable. Inputs are
# drawn on the CPU and moved (the same values on every device); results are compared on the CPU.
DEVICES = [pytest.param(p.values[0], id=p.values[0], marks=p.marks)
           for p in testing.device_backends(backends=("triton",))]


def _assert_dot_bound(out, ref, abs_ref, n, what):
    """fp32 dot products of length n, elementwise: |err| <= n·eps·Σ|products| (twice the classical γ_n = n·u
    bound with u = eps/2, which leaves room for the final rounding to fp32)."""
    err = (out.double().cpu() - ref).abs()
    bound = n * EPS32 * abs_ref + 1e-30
    assert (err <= bound).all(), f"{what}: max error/bound {(err / bound).max().item():.3g} > 1"


def _rows(K, N, dtype=torch.float32, device="cpu"):
    return torch.randn(K, N, dtype=torch.float64).to(dtype).to(device)


# ---------------------------------------------------------------- gram
# N around the column blocks (512 for K <= 16, 128 for K <= 32, 64 up to K = 64), several blocks per program
# (N = 9000: 16 programs at most on CPU), K not a power of two, K = 33 / 64, and K > 64 (several row tiles, only
# the upper tile pairs computed).
@pytest.mark.parametrize("K,N", [(1, 1), (3, 511), (3, 513), (2, 9000), (15, 1000), (20, 129), (33, 200),
                                 (64, 130), (65, 70), (100, 40)])
@pytest.mark.parametrize("device", DEVICES)
def test_gram_fp32_blocks(K, N, device):
    G = _rows(K, N, device=device)
    out = ops.gram_triton(G)
    G64 = G.double().cpu()
    assert out.dtype == torch.float32 and out.shape == (K, K) and out.device == G.device
    _assert_dot_bound(out, G64 @ G64.T, G64.abs() @ G64.abs().T, N, "gram")
    assert torch.equal(out, out.T), "gram must be exactly symmetric"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N", [(7, 1000), (33, 257)])
@pytest.mark.parametrize("device", DEVICES)
def test_gram_low_precision(dtype, K, N, device):
    G = _rows(K, N, dtype, device)
    out = ops.gram_triton(G).cpu()
    G = G.cpu()
    G64 = G.double()
    # Products of 16-bit values are exact in fp32, so the fp32 dot-product bound holds as for fp32 inputs ...
    _assert_dot_bound(out, G64 @ G64.T, G64.abs() @ G64.abs().T, N, f"gram {dtype}")
    # ... and the result beats plain torch at the input precision (the project's low-precision rule).
    assert_close_rel(out, G64 @ G64.T, G @ G.T, what=f"gram {dtype}")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("device", DEVICES)
def test_gram_strided(layout, device):
    K, N = 6, 300
    if layout == "transposed":
        G = torch.randn(N, K, device=device).T  # strides (1, K)
    elif layout == "sliced":
        G = torch.randn(K + 3, 2 * N, device=device)[1:K + 1, ::2]
    else:
        G = torch.randn(1, N, device=device).expand(K, N)  # stride 0 over K
    assert not G.is_contiguous()
    G64 = G.double().cpu()
    _assert_dot_bound(ops.gram_triton(G), G64 @ G64.T, G64.abs() @ G64.abs().T, N, layout)


@pytest.mark.parametrize("device", DEVICES)
def test_gram_empty_and_deterministic(device):
    assert torch.equal(ops.gram_triton(torch.randn(3, 0, device=device)).cpu(), torch.zeros(3, 3))
    assert ops.gram_triton(torch.randn(0, 5, device=device)).shape == (0, 0)
    G = _rows(9, 3000, device=device)
    assert torch.equal(ops.gram_triton(G), ops.gram_triton(G))


# ---------------------------------------------------------------- pcgrad_coefficients
def _conflicting_gram(K, N=40):
    """Γ of rows with conflicts, a zero row, a parallel and an anti-parallel pair, scales 1e-3..1e3."""
    G = torch.randn(K, N, dtype=torch.float64) * torch.logspace(-3, 3, K, dtype=torch.float64)[:, None]
    if K >= 4:
        G[1] = 0
        G[2] = -2 * G[0]
        G[3] = 5 * G[0]
    return (G @ G.T).float()


@pytest.mark.parametrize("K,max_tile", [(1, None), (2, None), (5, None), (16, None), (33, None), (11, 32)])
@pytest.mark.parametrize("device", DEVICES)
def test_pcgrad_coefficients_matches_reference(K, max_tile, device, monkeypatch):
    if max_tile is not None:  # several programs of BLOCK_R rows, the last one partial (K = 11: 6 programs of 2 rows)
        monkeypatch.setattr(tpc, "MAX_TILE", max_tile)
        assert tpc.config(K)["BLOCK_R"] < K
    gram = _conflicting_gram(K)
    perms = torch.stack([torch.randperm(K) for _ in range(K)])
    A = ops.pcgrad_coefficients_triton(gram.to(device), perms.to(device)).cpu()
    ref = reference.pcgrad_coefficients(gram, perms)
    # Same fp64 steps as the host reference, one rounding to fp32 at the end.
    torch.testing.assert_close(A, ref, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_pcgrad_coefficients_strided_and_skips(device):
    K = 6
    gram = _conflicting_gram(K).T  # Γ is symmetric: the transpose is a strided view of the same matrix
    perms = torch.stack([torch.randperm(K) for _ in range(K)]).T
    assert not gram.is_contiguous() and not perms.is_contiguous()
    # .T after the move: the device tensors are the strided views too
    A = ops.pcgrad_coefficients_triton(gram.T.to(device).T, perms.T.to(device).T).cpu()
    torch.testing.assert_close(A, reference.pcgrad_coefficients(gram, perms), rtol=2 * EPS32, atol=0)
    assert (A[torch.arange(K) != 1, 1] == 0).all(), "the zero-norm objective must never be projected against"
    assert (A[1] == torch.eye(K)[1]).all(), "a zero gradient has no conflicts and stays itself"


def test_pcgrad_coefficients_rejects_out_of_range_order():
    perms = torch.zeros(3, 3, dtype=torch.int64)
    perms[1, 2] = 3
    with pytest.raises(ValueError, match="perms"):
        ops.pcgrad_coefficients_triton(torch.eye(3), perms)


# ---------------------------------------------------------------- combine / combine_rows
# N around the 1024-column block, K around the 16-row block.
@pytest.mark.parametrize("K,N", [(1, 1), (3, 1023), (3, 1025), (15, 1000), (16, 300), (17, 700), (33, 300)])
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_combine_blocks(K, N, with_shared, device):
    G, c = _rows(K, N), torch.randn(K)
    shared = torch.rand(N) < 0.6 if with_shared else None
    out = testing.call_on(device, ops.combine_triton, G, c, shared, 1 / K, 1.0)
    ref = reference.combine(G.double(), c.double(), shared, 1 / K, 1.0)
    abs_ref = reference.combine(G.double().abs(), c.double().abs(), shared, 1 / K, 1.0)
    _assert_dot_bound(out, ref, abs_ref, K + 1, "combine")  # K products, then the scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_combine_low_precision(dtype, device):
    K, N = 15, 1500
    G, c, shared = _rows(K, N, dtype), torch.randn(K), torch.rand(N) < 0.5
    out = testing.call_on(device, ops.combine_triton, G, c, shared, 1 / K, 1.0)
    assert out.dtype == dtype
    ref = reference.combine(G.double(), c.double(), shared, 1 / K, 1.0)
    assert_close_rel(out, ref, reference.combine(G, c, shared, 1 / K, 1.0), what=f"combine {dtype}")


@pytest.mark.parametrize("R,K,N", [(1, 1, 1), (3, 3, 257), (17, 15, 300), (40, 33, 70), (16, 16, 256)])
@pytest.mark.parametrize("device", DEVICES)
def test_combine_rows_blocks(R, K, N, device):
    G, A = _rows(K, N), torch.randn(R, K)
    out = testing.call_on(device, ops.combine_rows_triton, G, A)
    assert out.shape == (R, N) and out.dtype == torch.float32
    _assert_dot_bound(out, A.double() @ G.double(), A.double().abs() @ G.double().abs(), K + 1, "combine_rows")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_combine_rows_low_precision(dtype, device):
    G, A = _rows(15, 700, dtype), torch.randn(15, 15)
    ref = A.double() @ G.double()
    assert_close_rel(testing.call_on(device, ops.combine_rows_triton, G, A), ref, reference.combine_rows(G, A), what=f"combine_rows {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_outputs_round_to_nearest(dtype, device):
    """16-bit outputs are the fp32 result rounded to nearest, not truncated (Triton 3.9's interpreter truncates
    fp32 -> bf16 casts, so the kernels round by hand): |out - exact| <= half a 16-bit spacing + the fp32 bound."""
    K, N = 15, 2000
    G, c, A = _rows(K, N, dtype), torch.randn(K), torch.randn(4, K)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    for out, ref, abs_ref in (
            (testing.call_on(device, ops.combine_triton, G, c, None, 1.0, 1.0), c.double() @ G.double(),
             c.double().abs() @ G.double().abs()),
            (testing.call_on(device, ops.combine_rows_triton, G, A), A.double() @ G.double(),
             A.double().abs() @ G.double().abs())):
        spacing = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - mantissa_bits)
        bound = 0.5 * spacing + (K + 1) * EPS32 * abs_ref
        assert ((out.double() - ref).abs() <= bound).all(), f"{dtype} output not rounded to nearest"


@pytest.mark.parametrize("device", DEVICES)
def test_combine_strided_empty_deterministic(device):
    K, N = 5, 600
    G = torch.randn(N, K, device=device).T
    c = torch.randn(2 * K, device=device)[::2]
    A, shared = torch.randn(K, 2 * K, device=device)[:, ::2], (torch.rand(2 * N, device=device) < 0.5)[::2]
    G64, c64, A64, shared_h = G.double().cpu(), c.double().cpu(), A.double().cpu(), shared.cpu()
    ref = reference.combine(G64, c64, shared_h, 0.5, 2.0)
    out = ops.combine_triton(G, c, shared, 0.5, 2.0)
    _assert_dot_bound(out, ref, reference.combine(G64.abs(), c64.abs(), shared_h, 0.5, 2.0), K + 1,
                      "combine strided")
    assert torch.equal(out, ops.combine_triton(G, c, shared, 0.5, 2.0))
    rows = ops.combine_rows_triton(G, A)
    _assert_dot_bound(rows, A64 @ G64, A64.abs() @ G64.abs(), K + 1, "rows strided")
    assert torch.equal(rows, ops.combine_rows_triton(G, A))
    assert ops.combine_triton(torch.randn(3, 0, device=device), torch.randn(3, device=device), None, 1.0,
                              1.0).shape == (0,)
    assert ops.combine_rows_triton(torch.randn(3, 0, device=device), torch.randn(2, 3, device=device)).shape == (2, 0)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.gram_triton(torch.randn(2, 3, 4)), ValueError, "G must be a 2-D"),
    (lambda: ops.gram_triton(torch.ones(2, 3, dtype=torch.int32)), TypeError, "G must be float32"),
    (lambda: ops.gram_triton(torch.ones(2, 3, dtype=torch.float64)), TypeError, "G must be float32"),
    (lambda: ops.pcgrad_coefficients_triton(torch.eye(3), torch.zeros(3, 3, dtype=torch.int32)), TypeError,
     "perms must be int64"),
    (lambda: ops.pcgrad_coefficients_triton(torch.eye(3), torch.zeros(3, 2, dtype=torch.int64)), ValueError,
     "perms must have shape"),
    (lambda: ops.pcgrad_coefficients_triton(torch.ones(3, 2), torch.zeros(3, 3, dtype=torch.int64)), ValueError,
     "gram must be a square"),
    (lambda: ops.pcgrad_coefficients_triton(torch.eye(3).double(), torch.zeros(3, 3, dtype=torch.int64)),
     TypeError, "gram must be float32"),
    (lambda: ops.combine_triton(torch.randn(3, 5), torch.randn(4), None, 1.0, 1.0), ValueError, "c must have shape"),
    (lambda: ops.combine_triton(torch.randn(3, 5), torch.randn(3).double(), None, 1.0, 1.0), TypeError,
     "c must be float32"),
    (lambda: ops.combine_triton(torch.randn(3, 5), torch.randn(3), torch.ones(5), 1.0, 1.0), TypeError,
     "shared must be a bool"),
    (lambda: ops.combine_triton(torch.randn(3, 5), torch.randn(3), torch.ones(4, dtype=torch.bool), 1.0, 1.0),
     ValueError, "shared must have shape"),
    (lambda: ops.combine_rows_triton(torch.randn(3, 5), torch.randn(2, 4)), ValueError, "A must have shape"),
    (lambda: ops.combine_rows_triton(torch.randn(3, 5), torch.randn(2, 3).half()), TypeError, "A must be float32"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="G must be a cuda tensor"):
        ops.gram_triton(torch.randn(2, 3))


# ---------------------------------------------------------------- registration: opcheck, torch.compile
def _opcheck_cases(device):
    K, N = 5, 40
    G = torch.randn(K, N, device=device)
    perms = torch.stack([torch.randperm(K) for _ in range(K)]).to(device)
    vec = lambda *shape, **kw: torch.randn(*shape, device=device, **kw)  # noqa: E731
    return [
        (ops.gram_triton, (G,)),
        (ops.gram_triton, (G.T.contiguous().T.bfloat16().requires_grad_(),)),
        (ops.pcgrad_coefficients_triton, (G @ G.T, perms)),
        (ops.combine_triton, (G, vec(K), torch.rand(N, device=device) < 0.5, 0.2, 1.0)),
        (ops.combine_triton, (G.half().requires_grad_(), vec(K, requires_grad=True), None, 0.2, 1.0)),
        (ops.combine_rows_triton, (G.requires_grad_(), vec(3, K, requires_grad=True))),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(case, device):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.filterwarnings("ignore:Input #. requires gradient and is not a double")
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    """The autograd formulas (gram and combine_rows backward run on the Triton kernels too)."""
    # fp32 kernels, so a coarse finite-difference step and tolerance (the op-level tests check the values).
    tol = dict(eps=1e-2, atol=1e-2, rtol=1e-2)
    G32 = torch.randn(2, 5, device=device, requires_grad=True)
    c, A = torch.randn(2, device=device, requires_grad=True), torch.randn(2, 2, device=device, requires_grad=True)
    shared = torch.rand(5, device=device) < 0.5
    assert torch.autograd.gradcheck(ops.gram_triton, (G32,), **tol)
    assert torch.autograd.gradcheck(lambda g, c: ops.combine_triton(g, c, shared, 0.5, 2.0), (G32, c), **tol)
    assert torch.autograd.gradcheck(ops.combine_rows_triton, (G32, A), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def step(G, perms, shared):
        A = ops.pcgrad_coefficients_triton(ops.gram_triton(G), perms)
        return ops.combine_triton(G, A.sum(0), shared, 1.0 / G.shape[0], 1.0), ops.combine_rows_triton(G, A)

    K, N = 4, 300
    G, shared = torch.randn(K, N, device=device), torch.rand(N, device=device) < 0.5
    perms = torch.stack([torch.randperm(K) for _ in range(K)]).to(device)
    eager = step(G, perms, shared)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(G, perms, shared)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


# ---------------------------------------------------------------- ahead-of-time compile for sm_90
def _aot_cases():
    """Every kernel at the configurations its launcher picks, with the signatures the launchers pass."""
    g_sig = {"g_ptr": "*fp32", "partial_ptr": "*fp32", "K": "i32", "N": "i32", "stride_k": "i32",
             "stride_n": "i32", "cols_per_program": "i32", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr",
             "ONE_TILE": "constexpr", "PRECISION": "constexpr"}
    pc_sig = {"gram_ptr": "*fp32", "perms_ptr": "*i64", "a_ptr": "*fp32", "K": "i32", "stride_gi": "i32",
              "stride_gj": "i32", "stride_pi": "i32", "stride_pj": "i32", "BLOCK_R": "constexpr",
              "BLOCK_K": "constexpr"}
    c_sig = {"g_ptr": "*bf16", "c_ptr": "*fp32", "shared_ptr": "*u8", "out_ptr": "*u16", "K": "i32", "N": "i32",
             "stride_k": "i32", "stride_n": "i32", "stride_c": "i32", "stride_s": "i32", "shared_scale": "fp32",
             "other_scale": "fp32", "HAS_SHARED": "constexpr", "OUT_BF16": "constexpr", "BLOCK_K": "constexpr",
             "BLOCK_N": "constexpr"}
    r_sig = {"g_ptr": "*fp16", "a_ptr": "*fp32", "out_ptr": "*fp16", "R": "i32", "K": "i32", "N": "i32",
             "stride_gk": "i32", "stride_gn": "i32", "stride_ar": "i32", "stride_ak": "i32", "OUT_BF16": "constexpr",
             "BLOCK_R": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}
    cases = {}
    for K, dtype, ptr in ((15, torch.float32, "*fp32"), (15, torch.bfloat16, "*bf16"), (32, torch.float16, "*fp16"),
                          (64, torch.bfloat16, "*bf16"), (100, torch.float32, "*fp32")):
        cfg = tgram.config(K, dtype)
        warps = cfg.pop("num_warps")
        cases[f"gram_K{K}_{ptr[1:]}"] = (tgram._gram_kernel, dict(g_sig, g_ptr=ptr), cfg, warps)
    for K in (15, 64, 300):
        cfg = tpc.config(K)
        warps = cfg.pop("num_warps")
        cfg.pop("enable_fp_fusion")
        cases[f"pcgrad_coefficients_K{K}"] = (tpc._pcgrad_coefficients_kernel, pc_sig, cfg, warps)
    cases["combine"] = (tcombine._combine_kernel, c_sig, dict(HAS_SHARED=True, OUT_BF16=True,
                        BLOCK_K=tcombine.COMBINE_BLOCK_K, BLOCK_N=tcombine.COMBINE_BLOCK_N), tcombine.COMBINE_NUM_WARPS)
    cases["combine_rows"] = (tcombine._combine_rows_kernel, r_sig,
                             dict(OUT_BF16=False, BLOCK_R=tcombine.ROWS_BLOCK_R, BLOCK_K=tcombine.ROWS_BLOCK_K,
                                  BLOCK_N=tcombine.ROWS_BLOCK_N), tcombine.ROWS_NUM_WARPS)
    return cases


AOT_CASES = ["gram_K15_fp32", "gram_K15_bf16", "gram_K32_fp16", "gram_K64_bf16", "gram_K100_fp32",
             "pcgrad_coefficients_K15", "pcgrad_coefficients_K64", "pcgrad_coefficients_K300", "combine",
             "combine_rows"]

_AOT_SCRIPT = """
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
import test_triton

nvidia_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
cuobjdump = os.path.join(nvidia_bin, "cuobjdump")
results = {}
for name, (kernel, signature, constexprs, num_warps) in test_triton._aot_cases().items():
    try:
        k = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "enable_fp_fusion": not name.startswith("pcgrad")})
    except Exception as e:
        results[name] = {"error": f"{type(e).__name__}: {e}"}
        continue
    usage = None
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        usage = next((ln.strip() for ln in out.splitlines() if "REG:" in ln), None)
    results[name] = {"cubin_bytes": len(k.asm["cubin"]), "sm_90": ".target sm_90" in k.asm["ptx"], "usage": usage}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def aot_results():
    """Compile every AOT case once, in a subprocess: the interpreter (TRITON_INTERPRET=1 here) patches
    triton.language while kernels run, which breaks compiling in the same process."""
    nvidia_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(nvidia_bin, "ptxas")) and shutil.which("ptxas") is None:
        pytest.skip("no ptxas (Triton's bundled one or on PATH): cannot build an sm_90 cubin here")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, os.path.dirname(__file__)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~25 s for the ten compiles on the 2-core dev box with a cold Triton cache
@pytest.mark.parametrize("name", AOT_CASES)
def test_aot_compile_sm90(name, aot_results):
    """Each kernel compiles to an sm_90 cubin without a GPU (Triton's bundled ptxas), without register spills
    at the block sizes the launchers use (the rule those constants were chosen by)."""
    result = aot_results[name]
    assert "error" not in result, result.get("error")
    assert result["cubin_bytes"] > 0 and result["sm_90"]
    if result["usage"] is not None:  # cuobjdump is there to read the register use back
        assert "STACK:0 " in result["usage"], f"{name}: register spills at the chosen block sizes: {result['usage']}"
