"""Property-based check of reading saved tensors: any bytes where an adapter's or a checkpoint's
safetensors file should be are read or refused with the error that names the file (``ValueError``
for adapters, ``CheckpointError`` for checkpoints), never another exception."""

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fedlease.adapter_io import WEIGHTS_NAME, load_adapter, save_adapter, saved_head_labels
from fedlease.fl import checkpoint
from fedlease.inject import MoELoRAConfig, inject_moe_lora

CONFIG = MoELoRAConfig(num_experts=2, rank=2, target_modules=["query"], routing="adaptive")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 6)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return inject_moe_lora(Tiny(), CONFIG, backend="torch")


NAMES = ["query.lora_A", "query.lora_B", "query.router", "classifier.weight", "x"]
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "XX"]) | st.integers(),
        "shape": st.lists(st.integers(-2, 10**12) | st.integers(0, 8), max_size=4),
        "data_offsets": st.lists(st.integers(-1, 10**13) | st.integers(0, 400), max_size=3),
    }
)
HEADER = st.dictionaries(st.sampled_from(NAMES), ENTRY | st.integers() | st.text(max_size=3),
                         max_size=4)  # fmt: skip


@st.composite
def files(draw) -> bytes:
    """A safetensors-like file: a (mostly honest) header length, a JSON header, some payload."""
    header = json.dumps(draw(HEADER)).encode()
    if draw(st.booleans()):
        header = draw(st.binary(max_size=64))
    length = draw(st.sampled_from([len(header), len(header) + 1, 2**63, 0]))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=400))


def honest(model: nn.Module, folder: Path) -> None:
    """A real adapter to corrupt: its config and a valid weights file."""
    save_adapter(model, folder)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files())
def test_an_adapter_file_is_read_or_refused_by_name(data):
    model = tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        honest(model, folder)
        (folder / WEIGHTS_NAME).write_bytes(data)
        for read in (lambda: saved_head_labels(folder, CONFIG, {}),
                     lambda: load_adapter(model, folder)):  # fmt: skip
            try:
                read()
            except ValueError as exc:
                assert str(folder) in str(exc) or "does not fit" in str(exc), exc


@settings(max_examples=200, deadline=None)
@given(files())
def test_a_checkpoint_file_is_read_or_refused_by_name(data):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        checkpoint.save(run, 1, {}, {"w": torch.ones(2)})
        (run / checkpoint.DIR / "state-0001.safetensors").write_bytes(data)
        try:
            checkpoint.load(run)
        except checkpoint.CheckpointError as exc:
            assert "state-0001.safetensors" in str(exc), exc


def test_the_honest_files_load():
    """The generator's starting points are valid (so the properties test corruption, not a
    setup that always fails)."""
    model = tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        honest(model, Path(tmp))
        assert saved_head_labels(tmp, CONFIG, {}) is None
        load_adapter(model, tmp)
        checkpoint.save(Path(tmp), 1, {}, {"w": torch.ones(2)})
        assert torch.equal(checkpoint.load(Path(tmp)).tensors["w"], torch.ones(2))
