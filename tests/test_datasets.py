"""Dataset loaders: every format on fixture files under tests/data/, and named errors on bad input."""

import builtins
import json
from pathlib import Path

import numpy as np
import pytest

from metalora import Dataset, DatasetError, load_dataset

DATA = Path(__file__).parent / "data"


def test_jsonl_skips_blank_lines_and_ignores_extra_fields():
    ds = load_dataset(DATA / "pairs.jsonl")
    assert len(ds) == 4
    assert ds.inputs[0] == "What is the capital of France?"
    assert ds.outputs[3] == "Shakespeare"
    assert ds.name == "pairs"
    assert ds.texts()[1] == "What is 2 + 2?\n4"
    assert ds.texts("input")[2] == "Name a primary colour."
    assert ds.texts("output") == ["Paris", "4", "Red", "Shakespeare"]
    assert ds.examples[0] == {"input": "What is the capital of France?", "output": "Paris"}


def test_json_list_with_custom_fields_and_template():
    ds = load_dataset(DATA / "pairs.json", input_field="prompt", output_field="completion",
                      template="Q: {input} A: {output}")
    assert ds.texts() == [
        "Q: Translate 'cat' to French. A: chat",
        "Q: Translate 'dog' to French. A: chien",
        "Q: Translate 'bird' to French. A: oiseau",
    ]


def test_csv_with_quoted_multiline_cell():
    ds = load_dataset(DATA / "pairs.csv")
    assert len(ds) == 3
    assert ds.inputs[1] == "Summarise: the cat sat on the mat, then slept."
    assert ds.inputs[2] == "A cell with\na newline"
    assert ds.outputs == ("yes", "A cat sat and slept.", "ok")


def test_tsv():
    ds = load_dataset(DATA / "pairs.tsv")
    assert ds.outputs == ("bonjour", "au revoir")


def test_parquet():
    pytest.importorskip("pyarrow", reason="pyarrow (optional dependency) not installed")
    ds = load_dataset(DATA / "pairs.parquet", input_field="instruction", output_field="response")
    assert ds.inputs == ("Add 1 and 2.", "Reverse the word abc.")
    assert ds.outputs == ("3", "cba")
    # numbers are read as their text
    ds2 = load_dataset(DATA / "pairs.parquet", input_field="instruction", output_field="n")
    assert ds2.outputs == ("1", "2")


def test_parquet_without_pyarrow_names_the_pip_command(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_dataset(DATA / "pairs.parquet", input_field="instruction", output_field="response")


def test_bigbench_task_json_target_and_target_scores():
    ds = load_dataset(DATA / "bigbench_task.json")
    assert ds.name == "tiny_multiple_choice"
    assert ds.inputs[0] == "Which animal barks?"
    # target_scores -> the highest-scoring choice; target list -> its first string
    assert ds.outputs == ("dog", "8", "hello", "goodbye")
    assert ds.task_prefix is None


def test_natural_instructions_task_dir_and_prefix():
    ds = load_dataset(DATA / "ni_subtask")  # a directory holding task.json
    assert ds.name == "subtask999_fixture_answer_generation"
    assert ds.task_prefix.startswith("Definition:")
    assert ds.outputs == ("green", "white", "black")
    # the prefix is kept aside, not embedded
    assert all("Definition" not in t for t in ds.texts())


def test_input_only():
    ds = load_dataset(DATA / "missing_field.jsonl", what="input")
    assert ds.texts() == ["ok", "second row"]
    with pytest.raises(DatasetError, match="needs outputs"):
        ds.texts("input+output")
    ds2 = load_dataset(DATA / "pairs.jsonl", output_field=None, what="input")
    assert ds2.outputs == (None,) * 4


def test_subsample_is_deterministic_and_keeps_order(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n"
                         for i in range(50)))
    a = load_dataset(p, n=10, seed=3)
    b = load_dataset(p, n=10, seed=3)
    c = load_dataset(p, n=10, seed=4)
    assert a.inputs == b.inputs and len(a) == 10
    assert a.inputs != c.inputs
    idx = [int(s[1:]) for s in a.inputs]
    assert idx == sorted(idx) and len(set(idx)) == 10
    assert all(o == "a" + i[1:] for i, o in zip(a.inputs, a.outputs))
    assert len(load_dataset(p, n=500)) == 50


def test_content_hash_tracks_the_embedded_text(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n')
    h1 = load_dataset(p).content_hash()
    assert h1 == load_dataset(p).content_hash()
    assert h1 != load_dataset(p, template="{input} {output}").content_hash()
    assert h1 != load_dataset(p, what="input").content_hash()
    p.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "D"}\n')
    assert h1 != load_dataset(p).content_hash()
    # same texts from another format -> same hash
    q = tmp_path / "d.csv"
    q.write_text("input,output\na,b\nc,D\n")
    assert load_dataset(q).content_hash() == load_dataset(p).content_hash()


def test_from_pairs():
    ds = Dataset.from_pairs(["x", "y"], ["1", "2"], template="{input}={output}")
    assert ds.texts() == ["x=1", "y=2"]
    assert Dataset.from_pairs(["x"]).texts() == ["x"]
    with pytest.raises(DatasetError, match=r"inputs\[1\]"):
        Dataset.from_pairs(["x", 3])
    with pytest.raises(DatasetError, match="empty"):
        Dataset.from_pairs([])


# -- bad input -----------------------------------------------------------------------------------

def test_missing_field_names_row_and_field():
    with pytest.raises(DatasetError, match=r"line 2 has no field 'output'.*'answer'"):
        load_dataset(DATA / "missing_field.jsonl")


def test_missing_field_csv_and_json(tmp_path):
    with pytest.raises(DatasetError, match=r"item 1 has no field 'input'"):
        load_dataset(DATA / "pairs.json")
    p = tmp_path / "x.csv"
    p.write_text("input,output\na,b\nc\n")  # short row -> output is empty (None)
    with pytest.raises(DatasetError, match=r"row 2 \(line 3\) field 'output' is empty"):
        load_dataset(p)


def test_null_and_non_string_fields(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"input": "a", "output": null}\n')
    with pytest.raises(DatasetError, match="line 1 field 'output' is empty"):
        load_dataset(p)
    p.write_text('{"input": ["a"], "output": "b"}\n')
    with pytest.raises(DatasetError, match="line 1 field 'input' is a list"):
        load_dataset(p)
    p.write_text('["a", "b"]\n')
    with pytest.raises(DatasetError, match="line 1 is a list, expected an object"):
        load_dataset(p)


def test_empty_dataset():
    with pytest.raises(DatasetError, match="empty dataset"):
        load_dataset(DATA / "empty.jsonl")


def test_empty_task_json(tmp_path):
    p = tmp_path / "task.json"
    p.write_text('{"examples": []}')
    with pytest.raises(DatasetError, match="empty dataset"):
        load_dataset(p)


def test_undecodable_text_names_byte_and_line():
    with pytest.raises(DatasetError, match=r"not UTF-8 text \(byte \d+, line 1"):
        load_dataset(DATA / "latin1.jsonl")


def test_lone_surrogate_names_row_and_field(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"input": "a", "output": "b"}\n{"input": "bad \\ud800 text", "output": "b"}\n')
    with pytest.raises(DatasetError, match="line 2 field 'input' holds undecodable text"):
        load_dataset(p)


def test_invalid_json_names_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"input": "a", "output": "b"}\n{"input": "a", "output": \n')
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        load_dataset(p)
    q = tmp_path / "x.json"
    q.write_text('[{"input": "a"')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(q)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset format '.yaml'"):
        load_dataset(DATA / "unknown.yaml")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="format="):
        load_dataset(DATA / "pairs.jsonl", format="xml")
    with pytest.raises(ValueError, match="what="):
        load_dataset(DATA / "pairs.jsonl", what="both")


def test_task_json_without_targets(tmp_path):
    p = tmp_path / "task.json"
    p.write_text('{"examples": [{"input": "a"}]}')
    with pytest.raises(DatasetError, match="example 1 has neither 'target' nor 'target_scores'"):
        load_dataset(p)


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffinput,output\nhé,ça\n".encode("utf-8"))
    ds = load_dataset(p)
    assert ds.inputs == ("hé",) and ds.outputs == ("ça",)


def test_format_override(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text('{"input": "a", "output": "b"}\n')
    assert load_dataset(p, format="jsonl").inputs == ("a",)


def test_subsample_invalid_n():
    ds = load_dataset(DATA / "pairs.jsonl")
    with pytest.raises(DatasetError, match="n must be positive"):
        ds.subsample(0)
    assert ds.subsample(None) is ds
    assert np.all(np.array(ds.subsample(2, seed=1).inputs) != None)  # noqa: E711
