"""The generation setting's pieces: FLAN files checked line by line, response-only labels,
left-padded batched greedy decoding equal to one prompt at a time, ROUGE on known pairs."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

from fedlease.data import DataError
from fedlease.data.flan import flan_tasks, load_flan_split
from fedlease.generation import (
    IGNORE_INDEX,
    encode_example,
    greedy_generate_ids,
    prompt_text,
    rouge_scores,
)

FLAN = os.environ.get("FEDLEASE_FLAN_DIR") or (
    str(p) if (p := Path(__file__).resolve().parents[2] / "shared" / "data" / "flan").is_dir()
    else None
)  # fmt: skip


def write_task(root: Path, task: str, lines: list[str], split: str = "train") -> Path:
    (root / task).mkdir(parents=True, exist_ok=True)
    path = root / task / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"instruction": "Fix: hello world", "input": "", "output": "Hello, world.",
                   "task": "fix_punct", "category": "text_editing"})  # fmt: skip


def test_flan_lines_are_checked_and_errors_name_the_file_and_line(tmp_path):
    write_task(tmp_path, "fix_punct", [GOOD, GOOD])
    rows = load_flan_split("fix_punct", "train", tmp_path)
    assert rows[0]["output"] == "Hello, world." and rows[0]["category"] == "text_editing"
    cases = {
        "no_output": (json.dumps({"instruction": "x"}), "missing key 'output'"),
        "no_instruction": (json.dumps({"output": "x"}), "missing key 'instruction'"),
        "not_text": (json.dumps({"instruction": 3, "output": "x"}), "key 'instruction' must be"),
        "bad_json": ("{not json", "malformed JSON"),
    }
    for task, (line, message) in cases.items():
        path = write_task(tmp_path, task, [GOOD, line])
        with pytest.raises(DataError, match=message) as err:
            load_flan_split(task, "train", tmp_path)
        assert f"{path}:2" in str(err.value)
    write_task(tmp_path, "empty", [])
    with pytest.raises(DataError, match="no examples"):
        load_flan_split("empty", "train", tmp_path)
    with pytest.raises(DataError, match="unknown FLAN task 'nope'.*fix_punct"):
        load_flan_split("nope", "train", tmp_path)
    with pytest.raises(DataError, match="missing data file"):
        load_flan_split("fix_punct", "test", tmp_path)
    with pytest.raises(DataError, match="split must be"):
        load_flan_split("fix_punct", "validation", tmp_path)


@pytest.mark.skipif(FLAN is None, reason="no FLAN copy (set FEDLEASE_FLAN_DIR)")
def test_the_shared_flan_copy_loads():
    tasks = flan_tasks(FLAN)
    assert {"fix_punct_wiki", "common_gen", "sst2", "piqa"} <= set(tasks)
    rows = load_flan_split("common_gen", "test", FLAN)
    assert len(rows) == 300 and all(r["output"] for r in rows)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fedlease.models import model_path

    return AutoTokenizer.from_pretrained(model_path("minilm"))


def test_labels_cover_only_the_response(tokenizer):
    row = {"instruction": "What is the sentiment?\nI loved it", "output": "positive"}
    ex = encode_example(tokenizer, row, max_len=128)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    n_prompt = len(tokenizer(prompt_text(row["instruction"]))["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer = labels[n_prompt:]
    assert IGNORE_INDEX not in answer and answer == ids[n_prompt:]
    if tokenizer.eos_token_id is not None:
        assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer, skip_special_tokens=True) == "positive"
    # too long: the response survives, the prompt keeps its end
    long_row = {"instruction": "word " * 300, "output": "the answer is here"}
    cut = encode_example(tokenizer, long_row, max_len=64)
    assert len(cut["input_ids"]) == 64
    kept = [t for t in cut["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(kept, skip_special_tokens=True) == "the answer is here"


def test_the_output_embedding_gets_a_contiguous_input_while_decoding():
    """generate's first step slices the prompts' last positions: given to the output embedding as
    that slice, torch's matmul copied the weight once per sequence (0.52 of 1.45 s for SmolLM2)."""
    model = tiny_llama()
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids = greedy_generate_ids(model, prompts, max_new_tokens=4, pad_id=0, eos_id=None)
    assert len(seen) == 4 and all(seen) and [len(r) for r in ids] == [4, 4, 4]
    assert not model.lm_head._forward_pre_hooks  # the hook goes with the decoding
    seen.clear()
    model(torch.tensor([[5, 6, 7, 8]]))
    assert seen == [True]


@pytest.mark.parametrize("seed", [0, 1])
def test_left_padded_batches_decode_as_one_prompt_at_a_time(seed):
    model = tiny_llama(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 97, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 15, (7,), generator=g)]  # fmt: skip
    batched = greedy_generate_ids(model, prompts, max_new_tokens=12, pad_id=0, eos_id=1,
                                  batch_size=4)  # fmt: skip
    alone = [greedy_generate_ids(model, [p], 12, 0, 1, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(0 < len(r) <= 12 or r == [] for r in batched)
    # greedy: each new token is the argmax of the model's next-token logits given all before it
    p, r = prompts[0], batched[0]
    seq = list(p)
    for tok in r:
        logits = model(torch.tensor([seq])).logits[0, -1]
        assert int(logits.argmax()) == tok
        seq.append(tok)


class Scripted(torch.nn.Module):
    """A stand-in whose ``generate`` appends fixed tokens: EOS handling and order in isolation."""

    def __init__(self, tail):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tail = tail

    def generate(self, input_ids, **kw):
        tail = torch.tensor(self.tail).expand(len(input_ids), -1)
        return torch.cat([input_ids, tail], dim=1)


def test_decoding_stops_at_eos_and_keeps_prompt_order():
    out = greedy_generate_ids(Scripted([7, 8, 1, 9]), [[5], [5, 6, 7]], 4, 0, 1, batch_size=1)
    assert out == [[7, 8], [7, 8]]
    assert greedy_generate_ids(Scripted([1, 4]), [[5]], 2, 0, 1) == [[]]
    assert greedy_generate_ids(Scripted([3, 4]), [[5]], 2, 0, None) == [[3, 4]]


def test_bad_decoding_settings_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_new_tokens must be > 0, got 0"):
        greedy_generate_ids(model, [[5, 6]], 0, 0, 1)


def test_rouge_on_known_pairs():
    # "the cat sat" against "the cat sat on the mat": ROUGE-1 P 1, R 3/6; ROUGE-2 P 1, R 2/5
    got = rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    assert got["rouge1"] == pytest.approx(2 * 0.5 / 1.5)
    assert got["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    assert got["rougeL"] == pytest.approx(2 * 0.5 / 1.5)
    both = rouge_scores(["a b c", "x y"], ["a b c", "p q"])  # identical, then disjoint
    assert both == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5}
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_scores(["a", "b"], ["a"])
