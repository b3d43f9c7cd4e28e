"""The FusT masking mechanism: ``mask_patches`` and the ``masked_concat`` ops on every backend.

* The reference mask is checked against an independent computation of the documented keys
  (plain Python integers, ``sorted``), and every backend (C++, Triton, CUDA) must reproduce the
  reference bit for bit, in every dtype and layout.
* Properties of :func:`avkernels.mask_patches` (the registered ops on CPU): exact count per
  sample, whole-patch alignment, the remainder strip never masked, channels sharing patches,
  frames independent, reproducibility under ``torch.manual_seed``, different samples getting
  different patches, a uniform distribution of the masked patches (chi-square, fixed seed),
  gradients zero exactly where the input was zeroed, and the ratio-0 fast path.
"""

from __future__ import annotations

import math

import pytest
import torch

import avkernels
from avkernels.ops.masking import reference as masking
from avkernels.ops.masking.autograd import MaskedConcatFunction
from tests.helpers.batch_norm import HAS_CUDA, INTERPRETER, require_extension

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
BACKENDS = ("reference", "cpp", "triton", "cuda")
OPS = ("zero_masked_patches", "masked_concat", "masked_concat_backward")
UINT32 = 0xFFFFFFFF


# --- backends -----------------------------------------------------------------------------------


def backend_ops(name: str) -> tuple[dict, str]:
    """({op name: callable}, device) of a backend, or skip/fail where it cannot run."""
    if name == "reference":
        return {op: getattr(masking, f"{op}_reference") for op in OPS}, "cpu"
    if name == "cpp":
        require_extension()
        return {op: getattr(torch.ops.avkernels, op).default for op in OPS}, "cpu"
    if name == "triton":
        if not (INTERPRETER or HAS_CUDA):
            pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1 set before python starts")
        pytest.importorskip("triton")
        from avkernels.ops.masking import triton_launch

        return {op: getattr(triton_launch, op) for op in OPS}, "cpu" if INTERPRETER else "cuda"
    if name == "cuda":
        if not HAS_CUDA or INTERPRETER:
            pytest.skip("needs a CUDA GPU and TRITON_INTERPRET unset")
        return {op: getattr(torch.ops.avkernels, op).default for op in OPS}, "cuda"
    raise ValueError(name)


def seeds_of(*shape: int, start: int = 0) -> torch.Tensor:
    """Deterministic int64 seeds spanning the whole int64 range (negative ones included)."""
    generator = torch.Generator().manual_seed(1234 + start)
    return torch.randint(-(2**63), 2**63 - 1, shape, generator=generator)


def ratios_of(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --- the mask definition, independently ---------------------------------------------------------


def python_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & UINT32
    x ^= x >> 15
    x = (x * 0x846CA68B) & UINT32
    return x ^ (x >> 16)


def python_masked_groups(seed: int, ratio: float, num_groups: int) -> set[int]:
    """The documented mask with Python integers: k smallest keys, k = int(P * ratio)."""
    bits = seed & 0xFFFFFFFFFFFFFFFF
    low, high = bits & UINT32, bits >> 32
    k0 = python_mix32(low ^ python_mix32(high ^ 0x9E3779B9))
    k1 = python_mix32(k0 ^ 0x85EBCA6B)
    keys = [python_mix32(python_mix32(g ^ k0) ^ k1) for g in range(num_groups)]
    assert len(set(keys)) == num_groups, "keys must never tie"
    count = 0 if not ratio > 0 else min(int(ratio * num_groups), num_groups)
    return set(sorted(range(num_groups), key=keys.__getitem__)[:count])


def test_mix32_is_lowbias32():
    # Published test vector-free check: the hash is a bijection on a sample and matches the
    # Python transcription on arbitrary values, including the uint32 extremes.
    values = torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, UINT32, 0x9E3779B9, 123456789])
    assert masking.mix32(values).tolist() == [python_mix32(v) for v in values.tolist()]
    sample = torch.arange(0, 1 << 16) * 65537 & UINT32
    assert masking.mix32(sample).unique().numel() == sample.numel()


@pytest.mark.parametrize("num_groups", [1, 7, 16, 484, 512])
def test_reference_mask_matches_definition(num_groups):
    seeds = seeds_of(12)
    ratios = torch.tensor(
        [0.0, -0.5, float("nan"), 1e-9, 0.1, 0.25, 0.5, 0.75, 0.999, 1.0, 3.0, 1 / 3], dtype=F64
    )
    mask = masking.group_mask(ratios, seeds, num_groups)
    for row, (seed, ratio) in enumerate(zip(seeds.tolist(), ratios.tolist())):
        expected = python_masked_groups(seed, ratio, num_groups)
        assert set(mask[row].nonzero().flatten().tolist()) == expected, (seed, ratio)


def test_count_is_the_official_int_of_ratio_times_patches():
    # int(P * ratio) in float64 exactly, e.g. 0.3 * 512 = 153.6 -> 153; 0.29 * 100 = 28.999...
    ratios = torch.tensor([0.3, 0.29, 0.57, 1 / 3, 0.1, 0.7, 0.9999999999999999], dtype=F64)
    for patches in (100, 484, 512):
        expected = [int(patches * r) for r in ratios.tolist()]
        assert masking.masked_count(ratios, patches).tolist() == expected


# --- every backend equals the reference, bit for bit --------------------------------------------

PATCH_CASES = [
    # (shape (B, C, T, H, W), patch, ratios, layout)
    ((4, 2, 1, 9, 8), (3, 2), (0.0, 0.3, 0.999, 1.0), "contiguous"),
    ((3, 1, 2, 7, 11), (2, 3), (0.5, -1.0, float("nan")), "contiguous"),  # remainder strips
    ((2, 3, 1, 10, 10), (10, 10), (0.7, 1.0), "contiguous"),  # a single patch
    ((2, 3, 1, 12, 10), (4, 5), (0.25, 0.6), "channels_last"),
    ((3, 2, 2, 6, 8), (2, 2), (0.4, 0.0, 0.9), "strided"),
]


def _patch_input(shape, layout, dtype, device):
    generator = torch.Generator().manual_seed(0)
    b, c, t, h, w = shape
    if layout == "strided":
        return torch.randn(b, c, t, h, 2 * w, generator=generator).to(device, dtype)[..., ::2]
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    if layout == "channels_last":  # (B, C, H, W) channels_last seen as (B, C, 1, H, W)
        x = x[:, :, 0].contiguous(memory_format=torch.channels_last).unsqueeze(2)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16])
@pytest.mark.parametrize("shape,patch,ratios,layout", PATCH_CASES)
def test_zero_masked_patches_backends(backend, dtype, shape, patch, ratios, layout):
    if backend == "triton" and INTERPRETER and (dtype in (F64, F16) or layout == "strided"):
        pytest.skip("interpreter: fp32/bf16 and two layouts suffice (slow)")
    ops, device = backend_ops(backend)
    x = _patch_input(shape, layout, dtype, device)
    ratio, seeds = ratios_of(*ratios).to(device), seeds_of(shape[0], shape[2]).to(device)
    expected = x.cpu().clone()
    masking.zero_masked_patches_reference(expected, ratio.cpu(), seeds.cpu(), *patch)
    strides = x.stride()
    ops["zero_masked_patches"](x, ratio, seeds, *patch)
    assert x.stride() == strides
    assert torch.equal(x.cpu(), expected)


FUSION_CASES = [
    # (B, Fa, Fv, group_a, group_v, ratio_a or None, ratio_v or None)
    (5, 10, 7, 1, 1, (0.0, 0.1, 0.5, 0.99, 1.0), (0.3, 0.0, 0.0, 0.6, float("nan"))),
    (4, 16, 12, 3, 5, (0.5, 0.2, 0.7, 0.0), None),  # remainders, visual not masked
    (3, 8, 8, 2, 2, None, (0.5, 0.25, 0.75)),
    (2, 6, 9, 1, 4, None, None),
]


def _fusion_inputs(case, dtype, device):
    batch, fa, fv, ga, gv, ra, rv = case
    generator = torch.Generator().manual_seed(1)
    a, v, grad = (
        torch.randn(batch, n, generator=generator).to(device=device, dtype=dtype)
        for n in (fa, fv, fa + fv)
    )
    ratio_a = None if ra is None else ratios_of(*ra).to(device)
    ratio_v = None if rv is None else ratios_of(*rv).to(device)
    return a, v, grad, ratio_a, ratio_v, seeds_of(batch, 2, start=5).to(device), ga, gv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16])
@pytest.mark.parametrize("case", FUSION_CASES)
def test_masked_concat_backends(backend, dtype, case):
    if backend == "triton" and INTERPRETER and dtype in (F64, F16):
        pytest.skip("interpreter: fp32/bf16 suffice (slow)")
    ops, device = backend_ops(backend)
    a, v, grad, ratio_a, ratio_v, seeds, ga, gv = _fusion_inputs(case, dtype, device)
    cpu = [
        t.cpu() if isinstance(t, torch.Tensor) else t for t in (a, v, grad, ratio_a, ratio_v, seeds)
    ]
    out = ops["masked_concat"](a, v, ratio_a, ratio_v, seeds, ga, gv)
    expected = masking.masked_concat_reference(cpu[0], cpu[1], cpu[3], cpu[4], cpu[5], ga, gv)
    assert out.dtype == dtype and torch.equal(out.cpu(), expected)
    # backward from a non-contiguous gradient (transposed storage)
    grad = grad.t().contiguous().t()
    grad_a, grad_v = ops["masked_concat_backward"](
        grad, ratio_a, ratio_v, seeds, a.shape[1], ga, gv
    )
    expected_a, expected_v = masking.masked_concat_backward_reference(
        cpu[2], cpu[3], cpu[4], cpu[5], a.shape[1], ga, gv
    )
    assert torch.equal(grad_a.cpu(), expected_a) and torch.equal(grad_v.cpu(), expected_v)


def test_reference_masked_concat_is_masked_cat():
    a, v, grad, ratio_a, ratio_v, seeds, ga, gv = _fusion_inputs(FUSION_CASES[1], F64, "cpu")
    out = masking.masked_concat_reference(a, v, ratio_a, ratio_v, seeds, ga, gv)
    for row in range(a.shape[0]):
        groups = python_masked_groups(seeds[row, 0].item(), ratio_a[row].item(), a.shape[1] // ga)
        keep = torch.tensor([j // ga not in groups for j in range(a.shape[1])])
        assert torch.equal(out[row, : a.shape[1]], torch.where(keep, a[row], 0.0))
    assert torch.equal(out[:, a.shape[1] :], v)


def test_ops_pass_opcheck():
    x = torch.randn(2, 3, 2, 8, 6)
    ratio, seeds = ratios_of(0.5, 0.25), seeds_of(2, 2)
    torch.library.opcheck(torch.ops.avkernels.zero_masked_patches.default, (x, ratio, seeds, 2, 3))
    a, v, grad, ratio_a, ratio_v, seeds, ga, gv = _fusion_inputs(FUSION_CASES[0], F32, "cpu")
    torch.library.opcheck(
        torch.ops.avkernels.masked_concat.default, (a, v, ratio_a, ratio_v, seeds, ga, gv)
    )
    torch.library.opcheck(
        torch.ops.avkernels.masked_concat_backward.default,
        (grad, ratio_a, None, seeds, a.shape[1], ga, gv),
    )


# --- mask_patches: behaviour --------------------------------------------------------------------


def patch_view(x: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """(..., gh, gw, ph*pw): the whole patches of the last two dims (remainder dropped)."""
    h, w = x.shape[-2:]
    gh, gw = h // patch_h, w // patch_w
    cropped = x[..., : gh * patch_h, : gw * patch_w]
    tiles = cropped.reshape(*x.shape[:-2], gh, patch_h, gw, patch_w).transpose(-3, -2)
    return tiles.reshape(*x.shape[:-2], gh, gw, patch_h * patch_w)


def masked_patches(x: torch.Tensor, y: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """Bool (..., gh, gw): patches of ``y`` that are all zero where ``x`` had no zero."""
    return (patch_view(y, patch_h, patch_w) == 0).all(dim=-1)


def test_mask_patches_audio_layout_exact_count_alignment():
    # (B, 1, 1024, 128) fbank with 32x8 patches: P = 32 * 16 = 512.
    ratios = ratios_of(0.0, 0.3, 0.5, 0.999)
    x = torch.randn(4, 1, 1024, 128)
    torch.manual_seed(0)
    y = avkernels.mask_patches(x, ratios, (32, 8))
    patches = patch_view(y, 32, 8)
    zero = (patches == 0).all(dim=-1)
    untouched = (patches == patch_view(x, 32, 8)).all(dim=-1)
    assert (zero ^ untouched).all(), "every patch is either fully zeroed or fully kept"
    assert zero.flatten(1).sum(1).tolist() == [int(512 * r) for r in ratios.tolist()]


def test_mask_patches_frames_remainder_never_masked_channels_share():
    # 3x224x224 frames with 10x10 patches: a 22x22 grid, the last 4 rows/columns never masked.
    x = torch.randn(3, 3, 224, 224)
    ratios = ratios_of(0.999, 0.5, 0.0)
    y = avkernels.mask_patches(x, ratios, 10)
    assert torch.equal(y[..., 220:, :], x[..., 220:, :])
    assert torch.equal(y[..., :, 220:], x[..., :, 220:])
    masked = masked_patches(x, y, 10, 10)
    assert masked.flatten(2).sum(2).tolist() == [[int(484 * r)] * 3 for r in ratios.tolist()]
    assert (masked == masked[:, :1]).all(), "all channels share the patches"


def test_mask_patches_video_frames_independent():
    x = torch.randn(2, 3, 4, 20, 20)  # (B, C, T, H, W)
    torch.manual_seed(3)
    y = avkernels.mask_patches(x, ratios_of(0.5, 0.25), 5)
    masked = masked_patches(x, y, 5, 5)  # (B, C, T, 4, 4)
    assert masked.flatten(3).sum(3)[:, 0].tolist() == [[8] * 4, [4] * 4]
    assert (masked == masked[:, :1]).all()
    frames = masked[:, 0].flatten(2)
    assert all(not torch.equal(frames[b, 0], frames[b, t]) for b in range(2) for t in range(1, 4))


def test_mask_patches_reproducible_and_samples_differ():
    x = torch.randn(16, 1, 32, 32)
    torch.manual_seed(7)
    first = avkernels.mask_patches(x, 0.5, 4)
    torch.manual_seed(7)
    again = avkernels.mask_patches(x, 0.5, 4)
    assert torch.equal(first, again), "torch.manual_seed reproduces the mask"
    other = avkernels.mask_patches(x, 0.5, 4)  # next draw of the generator
    assert not torch.equal(first, other), "masks are re-drawn every call"
    assert torch.equal(
        avkernels.mask_patches(x, 0.5, 4, seed=11), avkernels.mask_patches(x, 0.5, 4, seed=11)
    )
    masks = masked_patches(x, first, 4, 4).flatten(1)
    assert masks.unique(dim=0).shape[0] == 16, "different samples get different patches"
    # explicit per-sample seeds: same seed -> same patches, whatever the sample's content
    seeds = torch.tensor([5, 5, 6, 6] * 4)
    masks = masked_patches(x, avkernels.mask_patches(x, 0.5, 4, seed=seeds), 4, 4).flatten(1)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_mask_patches_uniform_distribution():
    # 4000 rows, P = 16 patches, k = 4: each patch is masked k/P of the time. Chi-square with
    # 15 degrees of freedom: 37.7 is its 99.9% quantile (fixed seed: deterministic outcome).
    rows, patches, count = 4000, 16, 4
    x = torch.ones(rows, 8, 8)
    torch.manual_seed(2024)
    masked = masked_patches(x, avkernels.mask_patches(x, count / patches, 2), 2, 2).flatten(1)
    assert (masked.sum(1) == count).all()
    frequency = masked.sum(0).double()
    expected = rows * count / patches
    chi_square = ((frequency - expected) ** 2 / expected).sum().item()
    assert chi_square < 37.7, f"per-patch frequencies {frequency.tolist()}"
    # pairs: P(both masked) = k(k-1) / (P(P-1)); every pair within 5 standard deviations
    both = (masked.double().T @ masked.double())[torch.triu_indices(patches, patches, 1).unbind()]
    p_pair = count * (count - 1) / (patches * (patches - 1))
    sigma = math.sqrt(rows * p_pair * (1 - p_pair))
    assert ((both - rows * p_pair).abs() < 5 * sigma).all()


def test_mask_patches_ratio_zero_fast_path_and_inplace():
    x = torch.randn(3, 2, 12, 12)
    original = x.clone()
    y = avkernels.mask_patches(x, ratios_of(0.0, 0.5, 0.0), 3)
    assert torch.equal(x, original), "out of place leaves x alone"
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    torch.manual_seed(1)
    expected = avkernels.mask_patches(x, ratios_of(0.0, 0.5, 0.0), 3)
    torch.manual_seed(1)
    result = avkernels.mask_patches(x, ratios_of(0.0, 0.5, 0.0), 3, inplace=True)
    assert result is x and torch.equal(x, expected)
    with pytest.raises(RuntimeError, match="requires grad"):
        avkernels.mask_patches(torch.randn(2, 4, 4, requires_grad=True), 0.5, 2, inplace=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mask_patches_gradient(layout):
    x = torch.randn(3, 2, 12, 15, dtype=F64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    torch.manual_seed(4)
    y = avkernels.mask_patches(x, ratios_of(0.5, 0.0, 0.9), (3, 5))
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    kept = y.detach() != 0
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y, retain_graph=True)
    assert torch.equal(grad_x, torch.where(kept, grad_y, 0.0)), "zero exactly where x was zeroed"
    # expanded (stride-0) gradient from .sum()
    (grad_sum,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad_sum, kept.double())


def test_mask_patches_gradcheck():
    x = torch.randn(2, 1, 4, 6, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda t: avkernels.mask_patches(t, ratios_of(0.5, 0.9), 2, seed=9), (x,)
    )


def test_mask_patches_double_backward():
    """Second derivatives (docs/DESIGN.md, "Double backward"): gradgradcheck, and the Hessian of
    sum(y**2), 2 * mask, exactly."""
    x = torch.randn(2, 1, 4, 6, dtype=F64, requires_grad=True)

    def masked(t):
        return avkernels.mask_patches(t, ratios_of(0.5, 0.9), 2, seed=9)

    assert torch.autograd.gradgradcheck(masked, (x,))
    kept = masked(x).detach() != 0
    (grad,) = torch.autograd.grad(masked(x).square().sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert torch.equal(second, 2 * kept.double()) and not kept.all()


def test_masked_concat_double_backward():
    a, v, _, ratio_a, ratio_v, seeds, ga, gv = _fusion_inputs(FUSION_CASES[1], F64, "cpu")
    a, v = a.requires_grad_(), v.requires_grad_()

    def fused(a, v):
        return MaskedConcatFunction.apply(a, v, ratio_a, ratio_v, seeds, ga, gv)

    assert torch.autograd.gradgradcheck(fused, (a, v))
    grads = torch.autograd.grad(fused(a, v).square().sum(), (a, v), create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in grads), (a, v))
    ones = [torch.ones_like(t) for t in (a, v)]
    mask = masking.masked_concat_reference(*ones, ratio_a, ratio_v, seeds, ga, gv)
    assert torch.equal(torch.cat(second, 1), 2 * mask) and not mask.all()


def test_mask_patches_compiles_fullgraph():
    x = torch.randn(2, 1, 16, 8, requires_grad=True)
    ratio, seeds = ratios_of(0.5, 0.75), seeds_of(2)

    def step(t):
        return avkernels.mask_patches(t, ratio, (4, 2), seed=seeds) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert torch.equal(y, step(x))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.where(y != 0, 2.0, 0.0))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: avkernels.mask_patches(torch.randn(4, 4), 0.5, 2), "shape"),
        (lambda: avkernels.mask_patches(torch.randn(2, 4, 4), 0.5, 5), "larger than"),
        (lambda: avkernels.mask_patches(torch.randn(2, 4, 4), 0.5, (2, 0)), "positive"),
        (lambda: avkernels.mask_patches(torch.randn(2, 4, 4), torch.ones(3), 2), r"\(2,\)"),
        (
            lambda: avkernels.mask_patches(
                torch.randn(2, 1, 3, 4, 4), 0.5, 2, seed=torch.tensor([1, 2])
            ),
            "one seed per frame",
        ),
        (lambda: avkernels.mask_patches(torch.randn(2, 4, 4), 0.5, 2, seed=torch.ones(2)), "int64"),
    ],
)
def test_mask_patches_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
