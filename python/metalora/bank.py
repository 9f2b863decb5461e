r"""A bank of LoRA adapters on disk, and combining them module by module in bounded memory.

A bank is either

* a directory whose sub-directories are PEFT adapters (the sub-directory name is the adapter's
  id; sub-directories holding neither ``adapter_config.json`` nor ``adapter_model.safetensors``
  are ignored, as are names starting with ``.``), or
* a manifest in JSON Lines (``*.jsonl``; a bank directory holding ``bank.jsonl`` uses it): one
  JSON object per line, ``{"id": "task042", "adapter": "adapters/task042", "dataset":
  "data/task042.jsonl"}``. ``adapter`` (required) and ``dataset`` (optional) are paths, relative
  ones resolved against the manifest's directory; other keys are kept as ``Bank.info(id)``.
  JSON Lines because a bank grows by appending a line, and a line-numbered error points at the
  entry.

Opening a bank reads every adapter's config and safetensors header (never the tensor data),
validates them against each other once and reports every incompatibility at once: which adapter,
which module, expected (the value most adapters agree on) versus found.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from ._io import positive_int
from .adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, AdapterError,
                      AdapterFileNotFoundError, load_adapter)

__all__ = ["Bank", "BankError", "MANIFEST", "combine_adapters"]

MANIFEST = "bank.jsonl"
_MAX_LINES = 20  # problems listed in a BankError message (all are in .problems)


class BankError(ValueError):
    """A bank's adapters are incompatible or unreadable. ``problems`` lists every finding."""

    def __init__(self, where: object, problems: Sequence[str]):
        self.where = str(where)
        self.problems = list(problems)
        shown = self.problems[:_MAX_LINES]
        more = len(self.problems) - len(shown)
        text = f"{where}: {len(self.problems)} problem(s) in the bank:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more (see .problems)"
        super().__init__(text)


def _read_manifest(path: Path) -> List[dict]:
    entries, seen = [], {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AdapterFileNotFoundError(path, "manifest not found") from None
    except UnicodeDecodeError as exc:
        raise AdapterError(path, f"not UTF-8 text ({exc})") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AdapterError(path, f"line {no}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise AdapterError(path, f"line {no}: JSON nested too deeply") from None
        if not isinstance(e, dict) or "adapter" not in e or "id" not in e:
            raise AdapterError(path, f"line {no}: each line must be a JSON object with at least "
                                     f"'id' and 'adapter'")
        if not isinstance(e["id"], str) or not e["id"]:
            raise AdapterError(path, f"line {no}: 'id' must be a non-empty string")
        if e["id"] in seen:
            raise AdapterError(path, f"line {no}: id {e['id']!r} already used on line "
                                     f"{seen[e['id']]}")
        for key in ("adapter", "dataset"):
            v = e.get(key)
            if (key == "adapter" or v is not None) and (not isinstance(v, str) or not v
                                                        or "\0" in v):
                raise AdapterError(path, f"line {no}: {key!r} must be a non-empty path string "
                                         f"(relative to the manifest), got {v!r}")
        seen[e["id"]] = no
        e = dict(e)
        e["adapter"] = (path.parent / e["adapter"]).resolve()
        if e.get("dataset") is not None:
            e["dataset"] = (path.parent / e["dataset"]).resolve()
        entries.append(e)
    if not entries:
        raise AdapterError(path, "manifest lists no adapters")
    return entries


def _scan_dir(path: Path) -> List[dict]:
    entries = []
    for sub in sorted(path.iterdir(), key=lambda p: p.name):
        if sub.name.startswith(".") or not sub.is_dir():
            continue
        if (sub / ADAPTER_CONFIG).exists() or (sub / ADAPTER_WEIGHTS).exists():
            entries.append({"id": sub.name, "adapter": sub, "dataset": None})
    if not entries:
        raise AdapterError(path, f"no adapters found: expected sub-directories holding "
                                 f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, or a {MANIFEST} "
                                 f"manifest")
    return entries


def _majority(values: Mapping[str, object]):
    """The most common value and how many hold it."""
    c = Counter(json.dumps(v, sort_keys=True) for v in values.values())
    key, n = c.most_common(1)[0]
    return json.loads(key), n


class Bank:
    r"""A validated set of LoRA adapters for one base model.

    Parameters
    ----------
    path : path-like
        A directory of adapter directories, a directory holding ``bank.jsonl``, or a
        ``.jsonl`` manifest (see the module docstring).
    modules : {"strict", "intersection"}
        ``strict``: every adapter must adapt the same modules. ``intersection``: use the
        modules all adapters share (the others are listed in ``dropped_modules``).

    Notes
    -----
    A bank behaves as a read-only mapping ``id -> Adapter`` (``len``, iteration over ids,
    ``bank[id]``, ``in``); ``bank.ids`` keeps the bank's order, which is the order of weight
    vectors. Adapters are opened lazily (memory-mapped) and never modified.
    """

    def __init__(self, path: Union[str, os.PathLike], *, modules: str = "strict"):
        path = Path(path)
        if not os.path.exists(path):
            raise AdapterFileNotFoundError(path, "no such bank directory or manifest")
        if path.is_dir():
            if (path / ADAPTER_CONFIG).exists():
                raise AdapterError(path, "is a single adapter, not a bank; pass its parent "
                                         "directory or a manifest, or use load_adapter()")
            entries = _read_manifest(path / MANIFEST) if (path / MANIFEST).is_file() else _scan_dir(path)
        else:
            entries = _read_manifest(path)
        problems, adapters = [], []
        for e in entries:
            try:
                adapters.append(load_adapter(e["adapter"]))
            except AdapterError as exc:
                problems.append(f"adapter {e['id']!r}: {exc}")
                adapters.append(None)
        if problems:
            raise BankError(path, problems)
        self._init(path, entries, adapters, modules)

    @classmethod
    def from_adapters(cls, adapters: Union[Sequence[Adapter], Mapping[str, Adapter]], *,
                      modules: str = "strict") -> "Bank":
        """A bank over adapters already in memory (ids: the mapping keys, else ``"0"``, ...)."""
        if isinstance(adapters, Mapping):
            items = [(str(k), v) for k, v in adapters.items()]
        else:
            items = [(str(i), a) for i, a in enumerate(adapters)]
        if not items:
            raise ValueError("no adapters given")
        for k, a in items:
            if not isinstance(a, Adapter):
                raise TypeError(f"adapter {k!r}: expected a metalora.Adapter, got "
                                f"{type(a).__name__}")
        self = cls.__new__(cls)
        entries = [{"id": k, "adapter": a.path, "dataset": None} for k, a in items]
        self._init(None, entries, [a for _, a in items], modules)
        return self

    def _init(self, path, entries, adapters, modules):
        if modules not in ("strict", "intersection"):
            raise ValueError(f"modules={modules!r} must be 'strict' or 'intersection'")
        self.path = path
        self.policy = modules
        self.ids: List[str] = [e["id"] for e in entries]
        self._index = {k: i for i, k in enumerate(self.ids)}
        self._entries = entries
        self._adapters: List[Adapter] = adapters
        self._validate()

    # -- validation ----------------------------------------------------------------------
    def _where(self, i: int) -> str:
        a = self._adapters[i]
        return f"adapter {self.ids[i]!r}" + (f" ({a.path})" if a.path is not None else "")

    def _validate(self) -> None:
        ads, problems = self._adapters, []
        cfg_of = {i: a.config for i, a in enumerate(ads)}

        def agree(key: str, default=None, fatal: bool = True):
            vals = {i: c.get(key, default) for i, c in cfg_of.items()}
            ref, n = _majority(vals)
            for i, v in vals.items():
                if v != ref:
                    msg = (f"{self._where(i)}: {ADAPTER_CONFIG} {key} is {v!r}, expected {ref!r} "
                           f"(as {n} of {len(ads)} adapters)")
                    if fatal:
                        problems.append(msg)
                    else:
                        warnings.warn(msg, stacklevel=4)
            return ref

        self.base_model = agree("base_model_name_or_path")
        self.fan_in_fan_out = agree("fan_in_fan_out", False)
        self.task_type = agree("task_type", None, fatal=False)

        sets = [set(a.names) for a in ads]
        union = set().union(*sets)
        common = set.intersection(*sets)
        order = {}
        for a in ads:  # keep file order of first appearance
            for m in a.names:
                order.setdefault(m, len(order))
        if self.policy == "strict":
            # The module set most adapters share is the reference; report the others.
            ref, n = _majority({i: sorted(s) for i, s in enumerate(sets)})
            ref = set(ref)
            hint = " (modules='intersection' combines the shared ones)"
            for i, s in enumerate(sets):
                lack, extra = sorted(ref - s, key=order.get), sorted(s - ref, key=order.get)
                if lack:
                    problems.append(f"{self._where(i)}: lacks {len(lack)} module(s) that {n} of "
                                    f"{len(ads)} adapters have, e.g. {lack[:3]}{hint}")
                if extra:
                    problems.append(f"{self._where(i)}: has {len(extra)} module(s) that {n} of "
                                    f"{len(ads)} adapters lack, e.g. {extra[:3]}{hint}")
            use = sorted(union, key=order.get)
        else:
            use = sorted(common, key=order.get)
            if not use:
                problems.append("the adapters share no module (modules='intersection')")
        self.dropped_modules = sorted(union - set(use), key=order.get)

        self.shapes: Dict[str, tuple] = {}
        for m in use:
            have = {i: (a.shapes(m)[0][1], a.shapes(m)[1][0]) for i, a in enumerate(ads)
                    if m in a.names}
            (n_in, n_out), n = _majority(have)
            self.shapes[m] = (n_out, n_in)
            for i, (fi, fo) in have.items():
                if (fi, fo) != (n_in, n_out):
                    sa, sb = ads[i].shapes(m)
                    problems.append(f"{self._where(i)}: module {m!r}: lora_A {list(sa)} and lora_B "
                                    f"{list(sb)} give in_features={fi}, out_features={fo}; "
                                    f"expected in_features={n_in}, out_features={n_out} (as {n} "
                                    f"of {len(have)} adapters)")
        if problems:
            raise BankError(self.path if self.path is not None else "bank", problems)
        self.modules: List[str] = use

    # -- mapping interface ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __getitem__(self, key: Union[str, int]) -> Adapter:
        return self._adapters[self.index(key)]

    def index(self, key: Union[str, int]) -> int:
        """Position of an adapter (by id, or an integer position) in the bank's order."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not -len(self) <= key < len(self):
                raise IndexError(f"adapter position {key} out of range for a bank of {len(self)}")
            return int(key) % len(self)
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"no adapter with id {key!r} in the bank") from None

    def keys(self) -> List[str]:
        return list(self.ids)

    def values(self) -> List[Adapter]:
        return list(self._adapters)

    def items(self):
        return [(k, self._adapters[i]) for i, k in enumerate(self.ids)]

    def dataset_path(self, key: Union[str, int]) -> Optional[Path]:
        """The dataset the adapter was trained on, as given by the manifest (else None)."""
        return self._entries[self.index(key)].get("dataset")

    def info(self, key: Union[str, int]) -> dict:
        """The adapter's manifest entry (id, adapter, dataset and any extra keys)."""
        return dict(self._entries[self.index(key)])

    def scalings(self, key: Union[str, int]) -> Dict[str, float]:
        a = self[key]
        return {m: a.scalings[m] for m in self.modules}

    def nbytes(self, keys: Optional[Sequence] = None) -> int:
        """Bytes of the used modules' factors over the given adapters (default all)."""
        idx = range(len(self)) if keys is None else [self.index(k) for k in keys]
        return sum(self._adapters[i].module_nbytes(m) for i in idx for m in self.modules)

    def summary(self) -> dict:
        """Counts for a quick look: adapters, modules, ranks, dtypes, bytes, base model."""
        ranks = Counter(a.ranks[m] for a in self._adapters for m in self.modules)
        dtypes = Counter(d for a in self._adapters for d in a.dtypes)
        params = sum(n_out + n_in for (n_out, n_in) in self.shapes.values())
        return {
            "adapters": len(self),
            "base_model": self.base_model,
            "task_type": self.task_type,
            "modules": len(self.modules),
            "dropped_modules": len(self.dropped_modules),
            "ranks": dict(sorted(ranks.items())),
            "dtypes": dict(sorted(dtypes.items())),
            "bytes": self.nbytes(),
            "params_per_rank": params,
            "with_dataset": sum(e.get("dataset") is not None for e in self._entries),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"<metalora.Bank {self.path or '(in memory)'}: {s['adapters']} adapters, "
                f"{s['modules']} modules, ranks {list(s['ranks'])}, {list(s['dtypes'])}, "
                f"{s['bytes'] / 2**30:.2f} GiB>")


# ------------------------------------------------------------------------------------------
# combining from disk

_DEFAULT_BATCH_BYTES = 256 * 2**20
_MAX_OPEN = 256


def _weights_vector(bank: Bank, weights) -> np.ndarray:
    if isinstance(weights, Mapping):
        w = np.zeros(len(bank))
        for k, v in weights.items():
            if k not in bank:
                raise KeyError(f"weights: no adapter with id {k!r} in the bank")
            w[bank.index(k)] = v
        return w
    try:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise TypeError("weights must be a sequence of numbers (one per bank adapter, in bank "
                        "order) or a mapping id -> weight") from exc
    if w.size != len(bank):
        raise ValueError(f"weights has {w.size} values but the bank has {len(bank)} adapters")
    return w


def combine_adapters(bank_or_adapters, weights, *, mode: str = "svd", rank: Optional[int] = None,
                     top_k: Optional[int] = None, out_dtype: str = "float32", threads: int = 0,
                     provenance: Optional[Mapping] = None, batch_bytes: Optional[int] = None,
                     log: bool = False):
    r"""Combine adapters of a bank into a new adapter, reading only what the weights select.

    For every module of the bank, with :math:`s_j` the adapter's own scaling,

    .. math:: \Delta W = \sum_j w_j s_j B_j A_j \quad (\text{exact for ``cat``; best rank-r for
              ``svd``; the paper's factor-wise average for ``linear``}),

    see :func:`metalora.combine` for the modes. Modules are processed in batches of about
    ``batch_bytes`` input bytes: each batch's factors are memory-mapped views, combined in
    parallel by :func:`metalora.combine_modules`, then dropped from the process (``madvise``),
    while the next batch is prefetched. Peak memory is about one batch of inputs plus the output.

    Parameters
    ----------
    bank_or_adapters : Bank, or sequence / mapping of Adapter
    weights : sequence of ``len(bank)`` floats (bank order), or mapping ``id -> weight``
        Missing ids in a mapping weigh 0. Adapters with weight 0 are never read.
    mode : {"svd", "cat", "linear"}
    rank : int, optional
        Output rank for ``svd`` (default: the largest rank of the used adapters).
    top_k : int, optional
        Keep only the ``top_k`` weights largest in absolute value (ties: bank order); the kept
        weights are used as given (not renormalised).
    out_dtype : {"float32", "float16", "bfloat16"}
    threads : int
        Threads of the native kernels, 0 = all cores (the task pool uses fewer when other
        processes keep cores busy).
    provenance : mapping, optional
        Extra provenance (e.g. ``{"distance": "sinkhorn", "operator": "softmin"}``), stored with
        the bank ids, weights, mode and rank in ``adapter.provenance``.
    batch_bytes : int, optional
        Input bytes per batch of modules (default 256 MiB; at least one module per batch).
    log : bool
        Also return ``{module: info}`` from :func:`metalora.combine_modules`.

    Returns
    -------
    Adapter
        In-memory factors with scaling 1 (``lora_alpha = r``) and a PEFT config taken from the
        bank; write it with ``adapter.save(path)``.
    """
    from . import __version__
    from .combine import check_options, combine_modules
    from .writers.peft import combined_config

    if isinstance(bank_or_adapters, Bank):
        bank = bank_or_adapters
    else:
        bank = Bank.from_adapters(bank_or_adapters)
    check_options(mode, rank, out_dtype, threads)
    w = _weights_vector(bank, weights)
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise ValueError(f"weight of adapter {bank.ids[bad[0]]!r} is {w[bad[0]]}; weights must "
                         f"be finite")
    if positive_int(top_k, "top_k", allow_none=True) is not None:
        order = np.argsort(-np.abs(w), kind="stable")
        w = w.copy()
        w[order[int(top_k):]] = 0.0
    used = [int(i) for i in np.flatnonzero(w)]
    if not used:
        raise ValueError("all weights are zero, so the combined update is zero; give at least one "
                         "non-zero weight")
    if batch_bytes is None:
        batch_bytes = _DEFAULT_BATCH_BYTES
    ads = [bank[i] for i in used]
    wu = w[used]
    was_open = [a.is_mapped for a in ads]

    batches, cur, size = [], [], 0
    for m in bank.modules:
        nb = sum(a.module_nbytes(m) for a in ads)
        if cur and size + nb > batch_bytes:
            batches.append(cur)
            cur, size = [], 0
        cur.append(m)
        size += nb
    batches.append(cur)

    # Each open mapping holds a file descriptor; past _MAX_OPEN adapters, map them per batch.
    many = len(ads) > _MAX_OPEN
    out: Dict[str, tuple] = {}
    infos: Dict[str, dict] = {}
    try:
        for bi, batch in enumerate(batches):
            mods = _batch_views(ads, batch)
            if bi + 1 < len(batches):
                for a in ads:
                    a.advise(batches[bi + 1], "willneed")
            scal = {m: [a.scalings[m] for a in ads] for m in batch}
            try:
                res, info = combine_modules(mods, wu, scalings=scal, mode=mode, rank=rank,
                                            out_dtype=out_dtype, threads=threads, log=True)
            except ValueError as exc:
                del mods
                if "NaN or Inf" in str(exc):
                    for a in ads:  # name the file and tensor
                        a.check_finite(batch)
                raise _with_ids(exc, bank, used) from None
            del mods
            for m in batch:
                out[m] = res[m]
                infos[m] = info[m]
                infos[m]["used"] = [bank.ids[used[j]] for j in info[m]["used"]]
            for a, was in zip(ads, was_open):
                if many and not was:
                    a.release_mapping()  # unmapped: pages leave RSS, the descriptor is freed
                else:
                    a.advise(batch, "dontneed")
    finally:
        for a, was in zip(ads, was_open):
            if not was:
                a.release_mapping()

    ranks = {m: int(out[m][0].shape[0]) for m in out}
    cfg = combined_config(bank.values(), bank.modules, ranks, task_type=bank.task_type,
                          base_model=bank.base_model, fan_in_fan_out=bank.fan_in_fan_out,
                          full_set=not bank.dropped_modules)
    prov = {
        "metalora_version": __version__,
        "mode": mode,
        "rank": rank if rank is not None else (sorted(set(ranks.values()))[0]
                                               if len(set(ranks.values())) == 1 else ranks),
        "top_k": top_k,
        "out_dtype": out_dtype,
        "bank": None if bank.path is None else str(bank.path),
        "base_model_name_or_path": bank.base_model,
        "adapters": [{"id": bank.ids[i], "weight": float(w[i]),
                      "path": None if bank[i].path is None else str(bank[i].path)}
                     for i in used],
        "distance": None,
        "operator": None,
    }
    if mode == "svd":
        energy = [infos[m]["energy"] for m in out]
        prov["svd_energy"] = {"min": float(min(energy)), "mean": float(np.mean(energy))}
    if provenance:
        prov.update(dict(provenance))
    result = Adapter(out, {m: 1.0 for m in out}, cfg, provenance=prov)
    if log:
        return result, infos
    return result


def _batch_views(ads: List[Adapter], batch: List[str]) -> dict:
    """``{module: (A_list, B_list)}`` views for one batch (a function, so that no stray local
    keeps a view, and hence the mapping, alive after the batch)."""
    for a in ads:  # a file truncated under the map would be SIGBUS in the kernels: check first
        a.verify_unchanged()
    mods = {}
    for m in batch:
        pairs = [a.factors(m) for a in ads]
        mods[m] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return mods


def _with_ids(exc: ValueError, bank: Bank, used: List[int]) -> ValueError:
    ids = ", ".join(f"{j} = {bank.ids[i]!r}" for j, i in enumerate(used[:10]))
    return ValueError(f"{exc} [adapter numbers: {ids}{', ...' if len(used) > 10 else ''}]")
