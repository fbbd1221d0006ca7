"""Backend selection: auto, explicit names, the environment override, clear errors."""

import pytest
import torch
from helpers import make_inputs

from fedlease.ops import available_backends, moe_lora, resolve_backend


def test_torch_always_available_and_auto_resolves():
    assert "torch" in available_backends("cpu")
    assert resolve_backend("auto", torch.device("cpu")).name in available_backends("cpu")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="'cuda-magic'"):
        resolve_backend("cuda-magic", torch.device("cpu"))


def test_env_override(monkeypatch):
    monkeypatch.setenv("FEDLEASE_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"'nope' \(from \$FEDLEASE_BACKEND\)"):
        resolve_backend("torch", torch.device("cpu"))
    monkeypatch.setenv("FEDLEASE_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"


@pytest.mark.parametrize("name", ["triton", "cpp"])
def test_unavailable_backend_says_why(name, monkeypatch):
    monkeypatch.delenv("FEDLEASE_BACKEND", raising=False)
    if name in available_backends("cpu"):
        pytest.skip(f"{name} is available here")
    x, base, a, b, router, spec = make_inputs(4, 8, 8, 2, 2, seed=0)
    with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable on cpu: .+"):
        moe_lora(x, base, a, b, router, spec, 1.0, backend=name)


def test_auto_preferences(monkeypatch):
    monkeypatch.delenv("FEDLEASE_BACKEND", raising=False)
    # CPU: the compiled kernels when built (measured faster), else torch; never the interpreter
    cpu = torch.device("cpu")
    want = "cpp" if "cpp" in available_backends("cpu") else "torch"
    assert resolve_backend("auto", cpu).name == want
    assert resolve_backend("auto", cpu, torch.float32).name == want
    # float16 on CPU: cpp does not compute in it, auto falls back to torch
    assert resolve_backend("auto", cpu, torch.float16).name == "torch"
    # CUDA: triton when it can run there (stood in for here, where no GPU may exist)
    from fedlease.ops import dispatch

    monkeypatch.setitem(
        dispatch._REGISTRY,
        "triton",
        dispatch.Backend("triton", lambda *a: None, lambda d: None),
    )
    assert resolve_backend("auto", torch.device("cuda")).name == "triton"
    # CUDA without Triton: the compiled routing op before torch (measured faster there)
    for name, reason in (("triton", "no triton"), ("cpp", None)):
        monkeypatch.setitem(
            dispatch._REGISTRY, name, dispatch.Backend(name, lambda *a: None, lambda d, r=reason: r)
        )
    assert resolve_backend("auto", torch.device("cuda")).name == "cpp"


def test_backend_asked_for_in_a_dtype_it_lacks_says_so(monkeypatch):
    monkeypatch.delenv("FEDLEASE_BACKEND", raising=False)
    if "cpp" not in available_backends("cpu"):
        pytest.skip("cpp is not built here")
    x, base, a, b, router, spec = make_inputs(4, 8, 8, 2, 2, dtype=torch.float16, seed=0)
    with pytest.raises(RuntimeError, match="'cpp' is unavailable on cpu: .*not float16"):
        moe_lora(x, base, a, b, router, spec, 1.0, backend="cpp")
    y = moe_lora(x, base, a, b, router, spec, 1.0)  # auto: torch
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
