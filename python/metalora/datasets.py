"""Dataset loaders: a file of input/output pairs -> :class:`Dataset`.

First step of the data flow ``dataset -> signature -> distances -> coefficients -> combine``.
Formats: JSON Lines, a JSON list of objects, CSV/TSV, Parquet (needs ``pyarrow``), and
BIG-bench / Natural-Instructions ``task.json`` (``{"examples": [{"input", "target" |
"target_scores"}]}``). What a signature sees is chosen by ``what``: the input, the output, or both
joined by ``template``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["Dataset", "DatasetError", "load_dataset", "FORMATS", "WHAT"]

#: Formats understood by :func:`load_dataset` (``format=`` values).
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "task.json")
#: Values of ``what``: which part of each example is embedded / tokenized.
WHAT = ("input+output", "input", "output")
DEFAULT_TEMPLATE = "{input}\n{output}"

_EXT = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

PathLike = Union[str, os.PathLike]


class DatasetError(ValueError):
    """A dataset file that cannot be read as input/output pairs (names the row and field)."""


@dataclass(frozen=True)
class Dataset:
    """Input/output pairs of one task, plus how to turn them into texts.

    Attributes
    ----------
    inputs, outputs : tuple of str
        One entry per example. ``outputs`` entries are ``None`` when the dataset was loaded with
        ``what="input"`` and has no output column.
    what : {"input+output", "input", "output"}
        Default part used by :meth:`texts`.
    template : str
        ``str.format`` template with ``{input}`` and ``{output}`` used for ``"input+output"``.
    source : str or None
        Path the examples came from.
    name : str
        Task name (``task.json`` name field, else the file stem).
    task_prefix : str or None
        Natural-Instructions task definition (``task_prefix`` of ``task.json``), not embedded
        unless the caller adds it.
    """

    inputs: Tuple[str, ...]
    outputs: Tuple[Optional[str], ...]
    what: str = "input+output"
    template: str = DEFAULT_TEMPLATE
    source: Optional[str] = None
    name: str = ""
    task_prefix: Optional[str] = None
    _hash: Dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if len(self.inputs) != len(self.outputs):
            raise DatasetError(
                f"{len(self.inputs)} inputs but {len(self.outputs)} outputs"
            )
        _check_what(self.what)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_pairs(cls, inputs: Sequence[str], outputs: Optional[Sequence[str]] = None, *,
                   what: Optional[str] = None, template: str = DEFAULT_TEMPLATE,
                   name: str = "") -> "Dataset":
        """Build a dataset from in-memory lists (``outputs=None`` for input-only data)."""
        inputs = tuple(inputs)
        for i, s in enumerate(inputs):
            if not isinstance(s, str):
                raise DatasetError(f"inputs[{i}] is {type(s).__name__}, expected str")
        if outputs is None:
            outs: Tuple[Optional[str], ...] = (None,) * len(inputs)
            what = what or "input"
        else:
            outs = tuple(outputs)
            for i, s in enumerate(outs):
                if not isinstance(s, str):
                    raise DatasetError(f"outputs[{i}] is {type(s).__name__}, expected str")
            what = what or "input+output"
        if not inputs:
            raise DatasetError("empty dataset: no examples")
        return cls(inputs, outs, what=what, template=template, name=name)

    # -- views --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def examples(self) -> List[Dict[str, Optional[str]]]:
        """The examples as ``[{"input": ..., "output": ...}, ...]``."""
        return [{"input": i, "output": o} for i, o in zip(self.inputs, self.outputs)]

    def texts(self, what: Optional[str] = None, template: Optional[str] = None) -> List[str]:
        """The strings a signature is computed from, one per example."""
        what = what or self.what
        _check_what(what)
        template = self.template if template is None else template
        if what == "input":
            return list(self.inputs)
        if any(o is None for o in self.outputs):
            raise DatasetError(
                f"what={what!r} needs outputs, but this dataset was loaded without an output field"
            )
        if what == "output":
            return list(self.outputs)  # type: ignore[arg-type]
        return [template.format(input=i, output=o) for i, o in zip(self.inputs, self.outputs)]

    def content_hash(self, what: Optional[str] = None, template: Optional[str] = None) -> str:
        """sha256 of the texts :meth:`texts` returns (order-sensitive), hex.

        This is the dataset part of a signature's cache key: it changes when any embedded byte
        changes, whatever file format the examples came from.
        """
        what = what or self.what
        template = self.template if template is None else template
        key = f"{what}\0{template}"
        h = self._hash.get(key)
        if h is None:
            d = hashlib.sha256()
            for t in self.texts(what, template):
                b = t.encode("utf-8", "surrogatepass")
                d.update(len(b).to_bytes(8, "little"))
                d.update(b)
            h = d.hexdigest()
            self._hash[key] = h
        return h

    def subsample(self, n: Optional[int], seed: int = 0) -> "Dataset":
        """``n`` examples drawn without replacement (original order kept); all when ``n >= len``."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DatasetError(f"n must be positive, got {n}")
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.select(idx)

    def select(self, positions: Sequence[int]) -> "Dataset":
        """The examples at ``positions`` (in that order), with this dataset's other fields."""
        if len(positions) == 0:
            raise DatasetError("select() of no examples: a dataset cannot be empty")
        return Dataset(
            tuple(self.inputs[i] for i in positions),
            tuple(self.outputs[i] for i in positions),
            what=self.what, template=self.template, source=self.source, name=self.name,
            task_prefix=self.task_prefix,
        )



def as_texts(texts: Any, caller: str) -> List[str]:
    """A Dataset's ``texts()`` or a sequence of strings, as a list of checked strings (each a
    ``str`` and valid Unicode); ``caller`` names the function in the messages.

    Package-internal: the input check of :meth:`metalora.Embedder.embed` and
    :func:`metalora.token_signature`.
    """
    if hasattr(texts, "texts") and callable(texts.texts):
        texts = texts.texts()
    if isinstance(texts, str):
        raise TypeError(f"{caller} takes a sequence of strings, not one string; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"texts[{i}] is not valid Unicode (lone surrogate at character "
                             f"{exc.start}); the tokenizer cannot encode it") from None
    return out

def _check_what(what: str) -> None:
    if what not in WHAT:
        raise ValueError(f"what={what!r}; expected one of {WHAT}")


# -- reading ------------------------------------------------------------------------------------

#: the largest dataset file read (bytes); a task's examples are megabytes, not gigabytes.
#: ``$METALORA_MAX_DATASET_BYTES`` raises it.
MAX_DATASET_BYTES = 1 << 30
#: the longest line of a JSONL file / cell of a CSV file (characters)
MAX_LINE_CHARS = 16 << 20


def _max_bytes() -> int:
    env = os.environ.get("METALORA_MAX_DATASET_BYTES")
    try:
        return int(env) if env else MAX_DATASET_BYTES
    except ValueError:
        raise DatasetError(f"METALORA_MAX_DATASET_BYTES={env!r} is not a number of bytes") from None


def _open_regular(path: Path):
    """Open ``path`` for reading when it is a regular file of at most the size cap (a device
    such as /dev/zero, a FIFO or a huge file would be read forever or exhaust memory)."""
    import stat as _stat

    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, expected a dataset file") from None
    st = os.fstat(f.fileno())
    if not _stat.S_ISREG(st.st_mode):
        f.close()
        raise DatasetError(f"{path}: not a regular file (a device, FIFO or socket); datasets are "
                           f"read from files")
    cap = _max_bytes()
    if st.st_size > cap:
        f.close()
        raise DatasetError(f"{path}: {st.st_size} bytes exceeds the dataset size limit of {cap} "
                           f"bytes; subsample the file, or raise METALORA_MAX_DATASET_BYTES")
    return f, cap


def _read_text(path: Path) -> str:
    f, cap = _open_regular(path)
    with f:
        data = f.read(cap + 1)
    if len(data) > cap:  # grew while being read
        raise DatasetError(f"{path}: more than {cap} bytes (the dataset size limit); raise "
                           f"METALORA_MAX_DATASET_BYTES")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}: not UTF-8 text (byte {exc.start}, line {line}: {exc.reason}); "
            "re-encode the file as UTF-8"
        ) from None


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "task.json").is_file():
            return "task.json"
        raise DatasetError(f"{path}: a directory without task.json; pass a file")
    if path.name == "task.json":
        return "task.json"
    fmt = _EXT.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(
            f"{path}: unknown dataset format {path.suffix!r}; supported: "
            ".jsonl/.ndjson, .json (list or task.json), .csv, .tsv, .parquet "
            "(or pass format=...)"
        )
    return fmt


def _field(row: Any, name: str, where: str, *, path: Path) -> str:
    if not isinstance(row, dict):
        raise DatasetError(f"{path}: {where} is a {type(row).__name__}, expected an object")
    if name not in row:
        keys = ", ".join(map(repr, list(row)[:8]))
        raise DatasetError(
            f"{path}: {where} has no field {name!r} (fields: {keys}); "
            "set input_field=/output_field="
        )
    v = row[name]
    if v is None or (isinstance(v, float) and v != v):
        raise DatasetError(f"{path}: {where} field {name!r} is empty (null)")
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DatasetError(
                f"{path}: {where} field {name!r} holds undecodable text (lone surrogate "
                f"{v[exc.start]!r} at character {exc.start}, e.g. a bad \\ud800 JSON escape)"
            ) from None
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise DatasetError(
        f"{path}: {where} field {name!r} is a {type(v).__name__}, expected a string"
    )


def _rows_jsonl(path: Path):
    text = _read_text(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise DatasetError(f"{path}: line {lineno} holds {len(line)} characters, more than "
                               f"the limit of {MAX_LINE_CHARS} for one example")
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise DatasetError(f"{path}: line {lineno} nests JSON too deeply") from None


def _load_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to be a dataset") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None


def _rows_csv(path: Path, delimiter: str):
    text = _read_text(path)
    csv.field_size_limit(MAX_LINE_CHARS)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if reader.fieldnames is None:
            return
        for rowno, row in enumerate(reader, 1):
            # line number of the row's first line (header is line 1; multi-line cells shift it)
            yield f"row {rowno} (line {reader.line_num})", row
    except csv.Error as exc:
        raise DatasetError(f"{path}: line {reader.line_num}: not valid "
                           f"{'CSV' if delimiter == ',' else 'TSV'} ({exc})") from None


def _rows_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow (an optional dependency): pip install pyarrow"
        ) from None
    _open_regular(path)[0].close()
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
    for rowno, row in enumerate(table.to_pylist(), 1):
        yield f"row {rowno}", row


def _task_target(ex: dict, where: str, path: Path) -> str:
    if "target" in ex:
        t = ex["target"]
        if isinstance(t, list):
            t = next((x for x in t if isinstance(x, str)), None)
            if t is None:
                raise DatasetError(f"{path}: {where} 'target' list holds no string")
        if not isinstance(t, str):
            raise DatasetError(f"{path}: {where} 'target' is a {type(t).__name__}, expected str")
        return t
    if "target_scores" in ex:
        scores = ex["target_scores"]
        if not isinstance(scores, dict) or not scores:
            raise DatasetError(f"{path}: {where} 'target_scores' is not a non-empty object")
        # the highest-scoring choice, first one on ties
        best = max(scores, key=lambda k: (float(scores[k]), -list(scores).index(k)))
        return str(best)
    raise DatasetError(f"{path}: {where} has neither 'target' nor 'target_scores'")


def load_dataset(path: PathLike, *, input_field: str = "input",
                 output_field: Optional[str] = "output", template: str = DEFAULT_TEMPLATE,
                 what: str = "input+output", n: Optional[int] = None, seed: int = 0,
                 format: Optional[str] = None) -> Dataset:
    """Read a file of input/output examples.

    Parameters
    ----------
    path : str or path-like
        ``.jsonl``/``.ndjson`` (one object per line), ``.json`` (a list of objects, or a
        BIG-bench / Natural-Instructions ``task.json``), ``.csv``/``.tsv`` (header row),
        ``.parquet`` (needs ``pyarrow``), or a directory holding ``task.json``.
    input_field, output_field : str
        Column / key names. ``task.json`` always uses ``input`` and ``target`` (or the
        highest-scoring key of ``target_scores``). ``output_field=None`` reads inputs only.
    template : str
        ``str.format`` template joining ``{input}`` and ``{output}`` when
        ``what="input+output"``.
    what : {"input+output", "input", "output"}
        Which text a signature is computed from (see :meth:`Dataset.texts`).
    n, seed : int, optional
        Keep ``n`` examples drawn without replacement with ``numpy.random.default_rng(seed)``
        (file order kept). ``None`` keeps all.
    format : str, optional
        Force a format (one of :data:`FORMATS`) instead of detecting it from the file name.

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetError
        Unknown format, undecodable text, invalid JSON, a missing or non-string field (the
        message names the row / line and the field), or no examples at all.
    FileNotFoundError
        ``path`` does not exist.
    """
    _check_what(what)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset file not found: {p}")
    fmt = format or _detect_format(p)
    if fmt not in FORMATS:
        raise DatasetError(f"format={fmt!r}; expected one of {FORMATS}")
    need_output = what != "input"
    if output_field is None and need_output:
        raise ValueError(f"what={what!r} needs an output_field")
    name = p.parent.name if p.name == "task.json" else p.stem
    task_prefix = None

    if p.is_dir():
        p = p / "task.json"
    obj = None
    if fmt in ("json", "task.json"):
        obj = _load_json(p)
        if fmt == "json" and isinstance(obj, dict) and "examples" in obj:
            fmt = "task.json"
        if fmt == "task.json" and not (isinstance(obj, dict) and "examples" in obj):
            raise DatasetError(f"{p}: a task.json needs an 'examples' list")

    inputs: List[str] = []
    outputs: List[Optional[str]] = []
    if fmt == "task.json":
        assert isinstance(obj, dict)
        exs = obj["examples"]
        if not isinstance(exs, list):
            raise DatasetError(f"{p}: 'examples' is a {type(exs).__name__}, expected a list")
        name = str(obj.get("name", name))
        tp = obj.get("task_prefix")
        task_prefix = tp if isinstance(tp, str) and tp.strip() else None
        for i, ex in enumerate(exs, 1):
            where = f"example {i}"
            inputs.append(_field(ex, "input", where, path=p))
            outputs.append(_task_target(ex, where, p) if need_output else None)
    else:
        if fmt == "jsonl":
            rows = _rows_jsonl(p)
        elif fmt == "json":
            if not isinstance(obj, list):
                raise DatasetError(
                    f"{p}: expected a JSON list of objects or a task.json object, "
                    f"got a {type(obj).__name__}"
                )
            rows = ((f"item {i}", r) for i, r in enumerate(obj, 1))
        elif fmt in ("csv", "tsv"):
            rows = _rows_csv(p, "," if fmt == "csv" else "\t")
        else:
            rows = _rows_parquet(p)
        for where, row in rows:
            inputs.append(_field(row, input_field, where, path=p))
            if need_output:
                outputs.append(_field(row, output_field, where, path=p))  # type: ignore[arg-type]
            elif output_field is not None and isinstance(row, dict) and row.get(output_field) is not None:
                outputs.append(str(row[output_field]))
            else:
                outputs.append(None)
        if not need_output and any(o is None for o in outputs):
            outputs = [None] * len(inputs)

    if not inputs:
        raise DatasetError(f"{p}: empty dataset (no examples)")
    ds = Dataset(tuple(inputs), tuple(outputs), what=what, template=template, source=str(p),
                 name=name, task_prefix=task_prefix)
    return ds.subsample(n, seed)
