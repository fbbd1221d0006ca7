"""The ops under ``torch.autocast``: they compute in the autocast dtype, return it, and give each
parameter its gradient in the parameter's own dtype (float32 master weights stay float32)."""

import pytest
import torch
from helpers import make_inputs, rel_err

from fedlease import MoELoRAConfig, inject_moe_lora
from fedlease.ops import available_backends, moe_lora, moe_lora_linear
from fedlease.reference import reference_moe_lora

CASES = [("cpu", torch.bfloat16, b) for b in available_backends("cpu")]
if torch.cuda.is_available():
    CASES += [("cuda", d, b) for d in (torch.bfloat16, torch.float16)
              for b in available_backends("cuda")]  # fmt: skip
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def rounded(t, dtype):
    """What autocast feeds the op: the tensor rounded to ``dtype``, as float64 for the reference."""
    return t.detach().to(dtype).double().cpu().requires_grad_(True)


@pytest.mark.parametrize("device,dtype,backend", CASES, ids=str)
@pytest.mark.parametrize("op", ["moe_lora_linear", "moe_lora"])
def test_op_under_autocast_matches_reference(device, dtype, backend, op):
    x, base, a, b, router, spec = make_inputs(45, 40, 24, 4, 8, "adaptive", None, 3,
                                              torch.float32, device)  # fmt: skip
    w = torch.randn(24, 40, device=device) * 40**-0.5
    bias = torch.randn(24, device=device)
    params = [t.clone().requires_grad_(True) for t in (x, a, b, router)]
    with torch.autocast(device, dtype=dtype):
        if op == "moe_lora_linear":
            y = moe_lora_linear(params[0], w, bias, *params[1:], spec, 2.0, backend=backend)
        else:
            y = moe_lora(params[0], base, *params[1:], spec, 2.0, backend=backend)
    assert y.dtype == dtype
    ref = [rounded(t, dtype) for t in (x, a, b, router)]
    if op == "moe_lora_linear":
        base_ref = ref[0] @ rounded(w, dtype).t() + rounded(bias, dtype)
    else:
        base_ref = rounded(base, dtype)
    y_ref = reference_moe_lora(ref[0], base_ref, *ref[1:], spec, 2.0)
    assert rel_err(y.float().cpu(), y_ref) < TOL[dtype]
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(device=device, dtype=dtype))
    y_ref.backward(dy)
    for name, p, r in zip(["x", "A", "B", "router"], params, ref):
        assert p.grad.dtype == torch.float32, name  # the parameter's own dtype
        assert rel_err(p.grad.cpu(), r.grad) < TOL[dtype], name


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_model_trains_under_cpu_autocast(backend):
    """MiniLM with injected layers: a bf16 autocast step runs, gives float32 gradients to the
    float32 adapters, and its loss is the float32 loss to bf16 accuracy."""
    from fedlease.models import load

    torch.manual_seed(0)
    model, tok = load("minilm", num_labels=2)
    config = MoELoRAConfig(num_experts=3, rank=4, target_modules=["query", "value"],
                           trainable_modules=["classifier"])  # fmt: skip
    inject_moe_lora(model, config, backend=backend)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.05)
    batch = tok(["a fine film", "the plot makes no sense at all", "so so"], return_tensors="pt",
                padding=True)  # fmt: skip
    labels = torch.tensor([1, 0, 1])
    model.eval()  # no dropout: both passes see the same network
    with torch.no_grad():
        loss32 = model(**batch, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, labels=labels)
    out.loss.backward()
    assert abs(out.loss.item() - loss32.item()) < 0.03 * max(1.0, loss32.item())
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_A") for n in grads) and any(n.endswith("router") for n in grads)
    for name, g in grads.items():
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), name
