"""Markdown table of ``bench_layer.py --json`` reports, one row per shape, with the GPU targets.

    python benchmarks/layer_table.py OUT/layer_*.json > OUT/layer.md

Targets (forward+backward, all rows of one run): the ``auto`` backend at most 0.85x PEFT's time
(0.8x with one expert: plain LoRA through the op); at in = out >= 4096 its added time over the
frozen base at most 0.6x PEFT's; at least 20x the naive loop at M = 4; peak memory at most
PEFT's + 5 %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    "base",
    "peft_lora",
    "fedlease_torch",
    "fedlease_triton",
    "fedlease_triton_base_first",
    "fedlease_triton_lora_first",
    "fedlease_triton_int_pointers",
    "fedlease_triton_tensors",
    "fedlease_cpp",
    "naive_loop",
)


def checks(report: dict) -> dict[str, tuple[float, float, bool]]:
    """``{target: (value, bound, met)}`` for the ``auto`` row of one report."""
    res, shape = report["results"], report["shape"]
    auto = res[f"fedlease_{report['auto_backend']}"]
    base, peft = res["base"]["fwd_bwd_ms"], res["peft_lora"]["fwd_bwd_ms"]
    out = {"auto / PEFT": (auto["fwd_bwd_ms"] / peft, 0.8 if shape["experts"] == 1 else 0.85)}
    if min(shape["d_in"], shape["d_out"]) >= 4096:
        added = (auto["fwd_bwd_ms"] - base) / max(peft - base, 1e-9)
        out["added over base / PEFT's"] = (added, 0.6)
    if shape["experts"] == 4:
        speedup = res["naive_loop"]["fwd_bwd_ms"] / auto["fwd_bwd_ms"]
        out["naive loop / auto"] = (speedup, 20.0)
    out["peak MB / PEFT's"] = (auto["peak_mb"] / res["peft_lora"]["peak_mb"], 1.05)
    return {k: (v, b, v >= b if k == "naive loop / auto" else v <= b) for k, (v, b) in out.items()}


def table(reports: list[dict]) -> str:
    first = reports[0]
    columns = [c for c in COLUMNS if any(c in rep["results"] for rep in reports)]
    lines = [
        f"device: {first['device']}; dtype {first['dtype']}; versions "
        + ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items()),
        "",
        "forward+backward ms (median), `auto` = the backend `auto` picks",
        "",
        "| shape | " + " | ".join(columns) + " | auto | auto / PEFT | targets |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for rep in reports:
        s = rep["shape"]
        name = f"{s['d_in']}x{s['d_out']}, M={s['experts']}, r={s['rank']}, {s['tokens']} tok"
        name += f", dropout {rep['dropout']:g}" if rep.get("dropout") else ""
        cells = []
        for col in columns:
            r = rep["results"].get(col)
            cells.append("—" if r is None else f"{r['fwd_bwd_ms']:.3f}")
        result = checks(rep)
        marks = "; ".join(f"{k} {v:.2f} ({'met' if ok else 'MISSED'}, bound {b:g})"
                          for k, (v, b, ok) in result.items())  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rep['auto_backend']} | "
                     f"{result['auto / PEFT'][0]:.2f}x | {marks} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print("usage: layer_table.py REPORT.json [...]", file=sys.stderr)
        return 2
    print(table([json.loads(p.read_text()) for p in paths]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
