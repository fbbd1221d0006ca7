"""GLUE tasks from a local JSON Lines directory or the Hugging Face hub (``nyu-mll/glue``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "FEDLEASE_DATA_DIR"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    f1: bool = False  # binary F1 of the positive class is reported too
    validation_split: str = "validation"


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("sst2", ("sentence",), 2),
        TaskSpec("cola", ("sentence",), 2),
        TaskSpec("qnli", ("question", "sentence"), 2),
        TaskSpec("mrpc", ("sentence1", "sentence2"), 2, f1=True),
        TaskSpec("rte", ("sentence1", "sentence2"), 2),
        TaskSpec("qqp", ("question1", "question2"), 2, f1=True),
        TaskSpec("mnli", ("premise", "hypothesis"), 3, validation_split="validation_matched"),
    ]
}


class DataError(ValueError):
    """A data file or data source that cannot be used; the message names the file and line."""


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def resolve_data_dir(
    data_dir: str | os.PathLike | None, env: str = DATA_DIR_ENV, what: str = "data directory"
) -> Path | None:
    """The local data directory: the argument, else ``$<env>``, else None (GLUE: the hub);
    ``what`` names it in the error when it is not a directory."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(env) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"{what} {str(path)!r} {state}")
    return path


def _check_example(row: object, spec: TaskSpec, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in (*spec.text_fields, "label"):
        if field not in row:
            raise DataError(f"{where}: missing field {field!r}")
    for field in spec.text_fields:
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {row[field]!r}")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < spec.num_labels:
        raise DataError(
            f"{where}: unknown label {label!r} for {spec.name} (expected 0..{spec.num_labels - 1})"
        )
    return {**{f: row[f] for f in spec.text_fields}, "label": label}


def read_json_lines(path: Path, check) -> list[dict]:
    """``check(row, where)`` of every line of a JSON Lines file (blank lines skipped); errors name
    the file and line (``where`` is ``"<file>:<line>"``)."""
    if not path.is_file():
        raise DataError(f"missing data file {str(path)!r}")
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg})") from exc
            rows.append(check(row, where))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def read_jsonl(path: Path, spec: TaskSpec) -> list[dict]:
    """Examples of one GLUE split file, each checked; errors name the file and line."""
    return read_json_lines(path, lambda row, where: _check_example(row, spec, where))


def load_split(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """``split`` is ``"train"`` or ``"validation"`` (held-out evaluation data)."""
    spec = task_spec(task)
    if split not in ("train", "validation"):
        raise DataError(f"split must be 'train' or 'validation', got {split!r}")
    local = resolve_data_dir(data_dir)
    if local is not None:
        return read_jsonl(local / task / f"{split}.jsonl", spec)
    import datasets

    hub_split = spec.validation_split if split == "validation" else split
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task, split=hub_split)
    except Exception as exc:  # network, cache or hub errors all end the same way
        raise DataError(
            f"cannot load {task}/{hub_split} from the Hugging Face hub ({exc}); "
            f"pass --data-dir or set ${DATA_DIR_ENV} to a local copy"
        ) from exc
    return [
        _check_example(r, spec, f"nyu-mll/glue/{task}/{hub_split}[{i}]") for i, r in enumerate(ds)
    ]
