"""The counter-based CPU dropout (csrc/dropout.cpp, fedlease.dropout): the generator against
known answers and Triton's, its statistics, its determinism, and that every backward applies
exactly the forward's mask."""

import copy
import math
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fwd_bwd_close, leaves, make_inputs, rel_err

from fedlease import MoELoRAConfig, inject_moe_lora, use_fast_dropout
from fedlease.dropout import ATTENTION, PhiloxDropout, dropout
from fedlease.ops import available_backends, moe_lora_linear

pytestmark = pytest.mark.skipif(
    "cpp" not in available_backends("cpu"), reason="fedlease._C is not built"
)


def C():
    from fedlease import _C

    return _C


def keep_mask(n: int, p: float, seed: int) -> torch.Tensor:
    """The op's keep mask for n elements under `seed` (bool)."""
    _, keep = torch.ops.fedlease.philox_dropout(torch.ones(n), p, seed)
    return keep.bool()


def test_philox_known_answer_and_triton_agree():
    """Random123's known answer for Philox4x32-10 (zero counter, zero key), and Triton's
    tl.randint4x (the same generator, run by Triton's interpreter here) at several seeds and
    counters."""
    assert [hex(w) for w in C().philox4x32(0, 0)] == [
        "0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"
    ]  # fmt: skip
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def words(out, seed, N: tl.constexpr):
        offs = tl.arange(0, N)
        a, b, c, d = tl.randint4x(seed, offs)
        tl.store(out + offs * 4 + 0, a)
        tl.store(out + offs * 4 + 1, b)
        tl.store(out + offs * 4 + 2, c)
        tl.store(out + offs * 4 + 3, d)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in (0, 12345, 2**40 + 7):
        out = torch.empty(16 * 4, dtype=torch.int32, device=device)
        words[(1,)](out, seed, N=16)
        got = [w & 0xFFFFFFFF for w in out.cpu().tolist()]
        want = [w for counter in range(16) for w in C().philox4x32(seed, counter)]
        assert got == want, seed


def test_every_instruction_set_gives_the_same_words():
    """The AVX-512, AVX2 and portable implementations of a block agree with the per-element
    definition (those this CPU lacks are skipped)."""
    tried = 0
    for isa in ("generic", "avx2", "avx512"):
        for seed, block in ((0, 0), (987654321987, 77), (2**63 + 5, 2**40 + 3)):
            try:
                got = C().philox_block(seed, block, isa)
            except RuntimeError:
                break  # not on this CPU
            want = [C().philox4x32(seed, block * 16 + j % 16)[j // 16] for j in range(64)]
            assert got == want, (isa, seed, block)
        else:
            tried += 1
    assert tried >= 2 and C().philox_isa() in ("generic", "avx2", "avx512")


def value_of(seed: int, i: int, words: dict) -> int:
    """The 16-bit value element i draws (csrc/philox.h): of block i // 128, word i % 64 (word
    (i % 64) // 16 of counter 16 * block + i % 16), low half for i % 128 < 64, else high."""
    block, j = divmod(i, 128)
    counter = 16 * block + j % 16
    if counter not in words:
        words[counter] = C().philox4x32(seed, counter)
    return (words[counter][(j % 64) // 16] >> (0 if j < 64 else 16)) & 0xFFFF


def test_mask_is_the_per_element_definition_across_groups_and_threads():
    """The op's mask element by element: kept iff the element's 16-bit value >= round(p * 2^16),
    over a length that ends inside a group of blocks and spans several parallel chunks (the
    words of four blocks are drawn together); and the scalar path of a block's unaligned head
    (philox_value) at random elements."""
    n, p, seed = 2 * 32768 + 4 * 128 + 37, 0.3, 2**35 + 11
    threshold = round(p * 2**16)
    keep = keep_mask(n, p, seed).tolist()
    words: dict = {}
    assert keep == [value_of(seed, i, words) >= threshold for i in range(n)]
    for i in torch.randint(0, 2**40, (200,), generator=torch.Generator().manual_seed(0)).tolist():
        assert C().philox_value(seed, i) == value_of(seed, i, words), i


def test_every_instruction_set_gives_the_same_dropout():
    """FEDLEASE_PHILOX_ISA runs the narrower implementations on this CPU: the whole op (grouped
    blocks, head and tail, threads, bf16 and float32) gives the same output and mask in each."""
    script = (
        "import sys, torch, fedlease._C as C\n"
        "x = torch.randn(70001, generator=torch.Generator().manual_seed(0))\n"
        "out = {}\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    y, k = torch.ops.fedlease.philox_dropout(x.to(dt), 0.3, 2**40 + 9)\n"
        "    out[str(dt)] = (y.float(), k)\n"
        "torch.save((C.philox_isa(), out), sys.argv[1])\n"
    )
    results = {}
    for isa in ("generic", "avx2", "avx512"):
        path = f"{tempfile.mkdtemp()}/{isa}.pt"
        env = dict(os.environ, FEDLEASE_PHILOX_ISA=isa)
        subprocess.run([sys.executable, "-c", script, path], env=env, check=True)
        used, out = torch.load(path)
        results.setdefault(used, out)
    assert "generic" in results and (len(results) >= 2 or platform.machine() != "x86_64")
    first = next(iter(results.values()))
    for out in results.values():
        for dt, (y, k) in out.items():
            assert torch.equal(y, first[dt][0]) and torch.equal(k, first[dt][1]), dt


def test_an_unknown_instruction_set_override_is_reported():
    """FEDLEASE_PHILOX_ISA with a value the kernels do not know means the widest: a warning says
    so (it used to be silent)."""
    script = "import fedlease._C as C, fedlease.ops.cpp_backend; print(C.philox_isa())"
    env = dict(os.environ, FEDLEASE_PHILOX_ISA="avx3")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert "FEDLEASE_PHILOX_ISA='avx3' is not one of generic, avx2, avx512" in done.stderr
    widest = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "FEDLEASE_PHILOX_ISA"},
                            check=True)  # fmt: skip
    assert done.stdout == widest.stdout and "FEDLEASE_PHILOX_ISA" not in widest.stderr


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_within_four_sigma(p):
    n = 10_000_000
    kept = keep_mask(n, p, seed=31 + int(p * 100)).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 4 * sigma, (kept, 1 - p, sigma)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).mean() / (a.std() * b.std()))


def test_no_correlation_between_neighbours_calls_and_client_seeds():
    """Lag-1 and lag-64 neighbours within a mask, two consecutive draws of torch's generator,
    and the seeds two clients' rounds start from (seed_for): correlations within 4/sqrt(n)."""
    from fedlease.fl.client import seed_for
    from fedlease.ops.cpp_backend import draw_seed

    n, p = 4_000_000, 0.3
    bound = 4 / math.sqrt(n)
    m = keep_mask(n, p, seed=5)
    for lag in (1, 16, 64):
        assert abs(_corr(m[:-lag], m[lag:])) < bound, lag
    torch.manual_seed(0)
    first, second = draw_seed(), draw_seed()
    assert abs(_corr(keep_mask(n, p, first), keep_mask(n, p, second))) < bound
    for a, b in ((seed_for(0, 1, 0), seed_for(0, 1, 1)), (seed_for(0, 1, 0), seed_for(0, 2, 0))):
        torch.manual_seed(a)
        ma = keep_mask(n, p, draw_seed())
        torch.manual_seed(b)
        mb = keep_mask(n, p, draw_seed())
        assert abs(_corr(ma, mb)) < bound


def test_same_seed_same_mask_whatever_the_threads():
    x = torch.randn(3, 1000, 77)
    torch.manual_seed(4)
    a = dropout(x, 0.2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(4)
        b = dropout(x, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.2))  # the generator moved on: another mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)  # fmt: skip
def test_values_are_inverted_dropout_in_every_dtype(dtype):
    """Kept: x / (1 - p) rounded once from float32 (float64 for float64); dropped: 0; NaN
    stays NaN (as aten's x * mask)."""
    p = 0.25
    x = torch.randn(5000).to(dtype)
    x[7] = float("nan")
    y, keep = torch.ops.fedlease.philox_dropout(x, p, 77)
    keep = keep.bool()
    scale = 1 / (1 - p)
    want = (x.double() * scale) if dtype == torch.float64 else (x.float() * float(scale))
    want = torch.where(keep, want, torch.zeros_like(want) * x.float()).to(dtype)
    assert torch.equal(y.isnan(), want.isnan()) and y[7].isnan()
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(want))


def test_backward_applies_the_forward_mask_exactly():
    """The gradient is the incoming gradient times the forward's mask (a materialised copy),
    for a tensor whose size is no multiple of the 64-element blocks."""
    x = torch.randn(7, 33, 5, dtype=torch.float64, requires_grad=True)
    p = 0.4
    torch.manual_seed(11)
    y = dropout(x, p)
    kept = y.detach() != 0  # x has no zeros
    assert torch.equal(y.detach(), torch.where(kept, x.detach() * (1 / (1 - p)), 0.0))
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(x.grad, torch.where(kept, dy * (1 / (1 - p)), 0.0))
    fixed = lambda v: torch.ops.fedlease.philox_dropout(v, p, 123)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fixed, (x.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_lora_dropout_inside_the_op_regenerates_its_mask(dtype, tol):
    """The cpp layer op draws the experts' mask inside (never materialised) and draws it again
    in the backward (where the masked gradient is added onto dx in one pass, per dtype):
    forward and every gradient equal the float64 reference fed the same mask, gradcheck passes
    on the op with a fixed seed, and tokens are split into several blocks."""
    from fedlease.reference import reference_moe_lora

    t, d_in, d_out = 100, 24, 16  # two blocks of tokens on two threads
    x, _, a, b, router, spec = make_inputs(t, d_in, d_out, 3, 4, seed=3)
    w, bias = torch.randn(d_out, d_in) / 5, torch.randn(d_out)
    p = 0.3
    torch.manual_seed(9)
    fast = leaves(*(v.to(dtype) for v in (x, w, bias, a, b, router)))
    y = moe_lora_linear(*fast, spec, 2.0, dropout=p, training=True, backend="cpp")
    from fedlease.ops.cpp_backend import draw_seed

    torch.manual_seed(9)
    mask = torch.ops.fedlease.philox_dropout(torch.ones(t, d_in), p, draw_seed())[0].double()
    ref = leaves(*(v.detach().double() for v in fast))  # the inputs as rounded to dtype
    base = ref[0] @ ref[1].t() + ref[2]
    y_ref = reference_moe_lora(ref[0], base, *ref[3:], spec, 2.0, dropout_mask=mask)
    names = ["x", "weight", "bias", "A", "B", "router"]
    assert_fwd_bwd_close(y, y_ref, fast, ref, names, tol)
    if dtype != torch.float32:
        return

    small = [v.double().requires_grad_() for v in (x[:40], router, a, b)]

    def op(xx, rr, aa, bb):
        return torch.ops.fedlease.moe_lora_linear(
            xx, None, w.double(), bias.double(), rr, aa, bb, 3, [0], 3, 2.0, p, 4242
        )

    assert torch.autograd.gradcheck(op, small, eps=1e-6, atol=1e-6)


def _minilm():
    from fedlease.models import load

    torch.manual_seed(0)
    model, tok = load("minilm", num_labels=2, attn="eager")
    inject_moe_lora(model, MoELoRAConfig(num_experts=2, rank=4, dropout=0.1,
                                         trainable_modules=["classifier"]))  # fmt: skip
    batch = tok(["a fine film", "dull and long, very long"], return_tensors="pt", padding=True)
    return model, batch


def test_fast_dropout_in_a_model_swaps_and_restores():
    """use_fast_dropout swaps every nn.Dropout and the attention; in eval mode the model computes
    exactly what it did; in train mode the same torch seed gives the same loss, another seed
    another; use_fast_dropout(model, False) gives back the stock modules and attention."""
    model, batch = _minilm()
    stock = copy.deepcopy(model)
    labels = torch.tensor([1, 0])
    n = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert use_fast_dropout(model) == n > 0
    assert model.config._attn_implementation == ATTENTION
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    model.eval(), stock.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    model.train()
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(model(**batch, labels=labels).loss.item())
    assert losses[0] == losses[1] != losses[2]
    assert use_fast_dropout(model, False) == n
    assert model.config._attn_implementation == "eager"
    assert all(type(m) is not PhiloxDropout for m in model.modules())


def test_fast_dropout_trains_like_aten_dropout():
    """Same distribution: the mean loss of a model in train mode over many seeds is the same with
    the counter-based and with aten's dropout (within 4 standard errors of the difference)."""
    model, batch = _minilm()
    model.train()
    labels = torch.tensor([1, 0])

    def losses():
        out = []
        for seed in range(40):
            torch.manual_seed(seed)
            with torch.no_grad():
                out.append(model(**batch, labels=labels).loss.item())
        return np.array(out)

    aten = losses()
    use_fast_dropout(model)
    fast = losses()
    se = math.sqrt(aten.var(ddof=1) / len(aten) + fast.var(ddof=1) / len(fast))
    assert aten.std() > 0 and abs(aten.mean() - fast.mean()) < 4 * se


def test_dropout_off_the_cpu_or_in_eval_is_aten_or_nothing():
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    torch.manual_seed(3)
    meta = torch.empty(4, 4, device="meta")
    assert dropout(meta, 0.5).device.type == "meta"  # not a CPU tensor: F.dropout
    assert F.dropout(meta, 0.5).shape == (4, 4)


def test_a_model_with_fast_dropout_compiles_in_train_mode_without_graph_breaks():
    """A traced graph cannot draw a seed from torch's generator: inside torch.compile every
    dropout (the model's and the layer's) is F.dropout, whose random numbers the compiler makes."""
    model, batch = _minilm()
    use_fast_dropout(model)
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(**batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert torch.isfinite(loss) and model.classifier.weight.grad is not None


@pytest.mark.parametrize(
    "shape,mask_shape,dtype,tol",
    [
        ((2, 3, 64, 64), (2, 1, 64, 64), torch.float32, 1e-5),  # BERT's mask, 64 keys
        ((2, 2, 5, 128), (2, 1, 1, 128), torch.bfloat16, 2e-2),  # padding mask, 128 keys
        ((3, 7, 33), None, torch.float32, 1e-5),  # any length, no mask
        ((3, 4, 1, 40), (1, 4, 1, 40), torch.float32, 1e-5),  # one query a row (first_token)
    ],
)
def test_softmax_dropout_is_the_unfused_attention_probabilities(shape, mask_shape, dtype, tol):
    """The attention's fused op: forward equals dropout(softmax(scale * s + mask)) computed in
    float64 with the mask philox_dropout draws for the same seed (masked keys get exactly 0),
    and the gradient of the scores equals that of the float64 formula."""
    from fedlease.ops.cpp_backend import softmax_dropout

    gen = torch.Generator().manual_seed(5)
    scores = (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()
    mask = None
    if mask_shape is not None:
        mask = torch.zeros(mask_shape)
        mask[..., -5:] = torch.finfo(torch.float32).min  # padded keys
    p, scale = 0.2, 0.7
    torch.manual_seed(3)
    out = softmax_dropout(scores, mask, scale, p)
    from fedlease.ops.cpp_backend import draw_seed

    torch.manual_seed(3)
    seed = draw_seed()
    s64 = scores.detach().double().requires_grad_()
    probs = torch.softmax(s64 * scale + (0 if mask is None else mask.double()), dim=-1)
    keep = torch.ops.fedlease.philox_dropout(probs.detach().to(dtype), p, seed)[1]
    want = probs * keep.double() / (1 - p)
    assert rel_err(out, want) < tol
    if mask is not None:
        assert torch.all(out.detach()[..., -5:] == 0)
    grad = torch.randn(shape, generator=gen)
    out.backward(grad.to(dtype))
    want.backward(grad.double())
    assert rel_err(scores.grad, s64.grad) < tol


def test_attention_fuses_only_in_training(monkeypatch):
    """fedlease_eager in train mode goes through the fused op (one call per layer), in eval mode
    through eager's ops (which test_fast_dropout_in_a_model_swaps_and_restores checks are the
    stock model's exactly); test_fast_dropout_trains_like_aten_dropout checks the distribution."""
    import fedlease.ops.cpp_backend as cb

    model, batch = _minilm()
    use_fast_dropout(model)
    calls = []
    original = cb.softmax_dropout

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(cb, "softmax_dropout", counting)
    model.train()
    model(**batch)
    assert len(calls) == model.config.num_hidden_layers
    model.eval()
    model(**batch)
    assert len(calls) == model.config.num_hidden_layers
