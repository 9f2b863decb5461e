r"""Read and write PEFT LoRA adapters, without torch.

A PEFT LoRA adapter is a directory holding ``adapter_config.json`` and
``adapter_model.safetensors``. Each adapted module ``m`` has two tensors,
``base_model.model.<m>.lora_A.weight`` of shape ``[r, in]`` and
``base_model.model.<m>.lora_B.weight`` of shape ``[out, r]``; its weight update is

.. math:: \Delta W_m = s_m B_m A_m, \qquad s_m = \alpha_m / r_m
   \quad (\text{or } \alpha_m / \sqrt{r_m} \text{ with rsLoRA}),

where ``r_m`` and ``alpha_m`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern
matches the module, else from the global ``r`` / ``lora_alpha``.

Reading maps the safetensors file into memory (``mmap``) and returns numpy views of it: nothing
is read from disk until a kernel touches the bytes, and nothing is copied. The safetensors
library's own numpy API copies every tensor into a fresh buffer, so this module parses the
(documented, 8-byte length + JSON) safetensors header itself and validates it as strictly as the
library does: offsets in bounds, tensors exactly covering the data area, sizes matching shapes.
bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays, which the combine kernels read as
raw 16-bit words.

Adapters these rules cannot combine are refused with the reason: DoRA (a learned magnitude
rescales each column after the update), LoRA biases and ``bias != "none"`` (a bias term is not a
``B A`` product), ``modules_to_save`` (full trained copies of whole modules), embedding LoRAs
(``lora_embedding_A/B``), trainable tokens and parameter-targeted LoRA.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._arrays import BFLOAT16, all_finite

__all__ = [
    "Adapter",
    "AdapterError",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PROVENANCE_FILE",
    "load_adapter",
    "module_scaling",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE_FILE = "metalora.json"
PREFIX = "base_model.model."
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit

# safetensors dtype code -> numpy dtype, for the dtypes the combine kernels read.
_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}
if BFLOAT16 is not None:
    _DTYPES["BF16"] = BFLOAT16
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_CODES = {v: k for k, v in _DTYPES.items()}


class AdapterError(ValueError):
    """An adapter file is missing, corrupt, or holds something these rules cannot combine.

    ``path`` is the offending file (or directory) and ``problem`` the reason; ``str(err)`` is
    ``"<path>: <problem>"``.
    """

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class AdapterFileNotFoundError(AdapterError, FileNotFoundError):
    """A path or file that an adapter needs does not exist."""

    def __init__(self, path: object, problem: str):
        AdapterError.__init__(self, path, problem)

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return f"{self.path}: {self.problem}"


# --------------------------------------------------------------------------------------------
# safetensors


class _TensorInfo:
    __slots__ = ("name", "code", "shape", "start", "end")

    def __init__(self, name: str, code: str, shape: tuple, start: int, end: int):
        self.name, self.code, self.shape, self.start, self.end = name, code, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> Tuple[Dict[str, _TensorInfo], Dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns ``(tensors, metadata, file_size)`` where each tensor's ``start``/``end`` are absolute
    byte offsets in the file. Raises :class:`AdapterError` naming the file for any defect.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise AdapterError(path, f"file is {size} bytes, too short for a safetensors "
                                         f"header (truncated or empty)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise AdapterError(path, f"header claims {n} bytes but the file holds {size - 8} "
                                         f"after the length field: truncated, or not a "
                                         f"safetensors file")
            if n > _MAX_HEADER:
                raise AdapterError(path, f"header of {n} bytes exceeds the safetensors limit "
                                         f"({_MAX_HEADER}); not a safetensors file?")
            raw = f.read(n)
    except FileNotFoundError:
        raise AdapterFileNotFoundError(path, "file not found") from None
    except IsADirectoryError:
        raise AdapterError(path, "is a directory, expected a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise AdapterError(path, "header nests JSON too deeply; corrupt safetensors file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(path, f"header is not valid JSON ({exc}); the file is corrupt or not "
                                 f"a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterError(path, "header is not a JSON object; corrupt safetensors file")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise AdapterError(path, "__metadata__ must map strings to strings")
    base = 8 + n
    data_size = size - base
    tensors: Dict[str, _TensorInfo] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise AdapterError(path, f"tensor {name!r}: header entry needs dtype, shape and "
                                     f"data_offsets; corrupt safetensors file")
        code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str) or code not in _ITEMSIZE:
            raise AdapterError(path, f"tensor {name!r}: unknown dtype {code!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1]):
            raise AdapterError(path, f"tensor {name!r}: malformed shape {shape!r} or "
                                     f"data_offsets {offs!r}")
        need = math.prod(shape) * _ITEMSIZE[code]
        if offs[1] - offs[0] != need:
            raise AdapterError(path, f"tensor {name!r}: {code} {shape} needs {need} bytes but "
                                     f"data_offsets span {offs[1] - offs[0]}")
        tensors[name] = _TensorInfo(name, code, tuple(shape), base + offs[0], base + offs[1])
    # The data area must be covered exactly, in order, without holes or overlaps.
    pos = base
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != pos:
            raise AdapterError(path, f"tensor {t.name!r}: data starts at byte {t.start - base} "
                                     f"of the data area, expected {pos - base} (overlap or hole); "
                                     f"corrupt safetensors file")
        pos = t.end
    if pos > size:
        raise AdapterError(path, f"truncated: the tensors need {pos - base} data bytes but the "
                                 f"file holds {data_size}")
    if pos < size:
        raise AdapterError(path, f"{size - pos} trailing bytes after the last tensor; corrupt "
                                 f"safetensors file")
    return tensors, meta, size


def write_safetensors(f, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (float32/float16/bfloat16, C order) in the safetensors format to ``f``."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian targets
        raise RuntimeError("writing safetensors needs a little-endian machine")
    header: dict = {"__metadata__": dict(metadata)}
    pos = 0
    order = sorted(tensors)
    for name in order:
        a = tensors[name]
        code = "BF16" if a.dtype == np.uint16 else _CODES.get(a.dtype)  # uint16: bf16 bits
        if code is None:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} cannot be written (float32, "
                            f"float16 or bfloat16)")
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-(8 + len(hb)) % 8)  # 8-byte aligned data area, as the library writes it
    f.write(len(hb).to_bytes(8, "little"))
    f.write(hb)
    for name in order:
        a = np.ascontiguousarray(tensors[name])
        f.write(a.reshape(-1).view(np.uint8).data)


# --------------------------------------------------------------------------------------------
# config


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    r"""PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\.)?({k})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: Mapping, module: str) -> Tuple[int, float]:
    """``(r, scaling)`` that PEFT gives ``module`` under ``config``."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if config.get("use_rslora"):
        return r, alpha / math.sqrt(r)
    return r, alpha / r


def _nonempty(v) -> bool:
    return v not in (None, False, "", [], {}, ())


def _check_config(cfg: object, path: Path) -> dict:
    if not isinstance(cfg, dict):
        raise AdapterError(path, "expected a JSON object")
    missing = [k for k in ("peft_type", "r", "lora_alpha") if k not in cfg]
    if missing:
        raise AdapterError(path, f"missing key(s) {missing}: a PEFT LoRA config needs peft_type, "
                                 f"r and lora_alpha")
    if str(cfg["peft_type"]).upper() != "LORA":
        raise AdapterError(path, f"peft_type is {cfg['peft_type']!r}; only LoRA adapters "
                                 f"(peft_type 'LORA') can be combined")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(path, f"r must be a positive integer, got {r!r}")
    a = cfg["lora_alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
        raise AdapterError(path, f"lora_alpha must be a finite number, got {a!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, dict):
            raise AdapterError(path, f"{key} must be an object mapping module patterns to "
                                     f"numbers, got {v!r}")
        for k, x in (v or {}).items():
            try:
                re.compile(rf"(.*\.)?({k})$")
            except (re.error, RecursionError, OverflowError) as exc:
                raise AdapterError(path, f"{key} key {k!r} is not a valid regular expression "
                                         f"({exc}); PEFT matches these keys as regexes against "
                                         f"module names") from None
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (
                    key == "rank_pattern" and (not isinstance(x, int) or x <= 0)):
                raise AdapterError(path, f"{key}[{k!r}] = {x!r} is not a valid "
                                         f"{'rank' if key == 'rank_pattern' else 'alpha'}")
    refusals = [
        ("use_dora", "DoRA rescales every column of W + ΔW by a learned magnitude, so its update "
                     "is not a sum of B A products"),
        ("lora_bias", "a LoRA bias adds a trained bias vector that is not a B A product"),
        ("modules_to_save", "modules_to_save stores full trained copies of modules, which cannot "
                            "be combined as low-rank factors"),
        ("trainable_token_indices", "trainable tokens store embedding rows, not low-rank "
                                    "factors"),
        ("target_parameters", "LoRA on nn.Parameter targets (target_parameters) is not "
                              "supported"),
        ("layer_replication", "layer_replication changes the base model's structure"),
        ("use_qalora", "QA-LoRA pools the input in groups, so its A does not act on the full "
                       "input"),
        ("alora_invocation_tokens", "activated LoRA applies the update only after its "
                                    "invocation tokens, so it is not a plain weight update"),
        ("kasa_config", "KaSA inserts learned singular values between A and B and truncates the "
                        "base weight"),
        ("monteclora_config", "MonteCLoRA samples its factors"),
        ("arrow_config", "Arrow routes between adapters per token"),
        ("use_bdlora", "BD-LoRA stores block-diagonal factors"),
    ]
    for key, why in refusals:
        if _nonempty(cfg.get(key)):
            raise AdapterError(path, f"{key} = {cfg[key]!r} is not supported: {why}")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(path, f"bias = {bias!r} is not supported: trained biases are not "
                                 f"low-rank factors; only bias='none' adapters can be combined")
    return cfg


# --------------------------------------------------------------------------------------------
# Adapter


def _stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Store:
    """A lazily memory-mapped safetensors file."""

    def __init__(self, path: Path, tensors: Dict[str, _TensorInfo], size: int,
                 stamp: Optional[tuple] = None):
        self.path, self.tensors, self.size = path, tensors, size
        self.stamp = stamp  # (device, inode, size, mtime_ns) when the header was read
        self._mm: Optional[mmap.mmap] = None
        self._flat: Optional[np.ndarray] = None

    def verify(self) -> None:
        """Raise :class:`AdapterError` when the file on disk is no longer the one whose header
        was read (rewritten in place, truncated, replaced): reading a truncated memory map would
        kill the process with SIGBUS, so callers check right before the kernels read it."""
        if self.stamp is None:
            return
        try:
            now = _stamp(self.path)
        except FileNotFoundError:
            raise AdapterFileNotFoundError(self.path, "file disappeared since it was opened "
                                                      "(another process is rewriting the "
                                                      "adapter?); rerun once it is done") from None
        if now != self.stamp:
            what = (f"size {self.stamp[2]} -> {now[2]} bytes" if now[2] != self.stamp[2]
                    else "modified or replaced")
            raise AdapterError(self.path, f"changed on disk since it was opened ({what}): "
                                          f"another process rewrote it while this one reads it; "
                                          f"rerun once the writer is done (nothing was written)")

    @property
    def is_open(self) -> bool:
        return self._mm is not None

    def array(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if self._mm is None:
            try:
                with open(self.path, "rb") as f:
                    if os.fstat(f.fileno()).st_size != self.size:
                        raise AdapterError(self.path, "file changed size since it was opened")
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except FileNotFoundError:
                raise AdapterFileNotFoundError(self.path, "file disappeared since it was "
                                                          "opened") from None
            self._flat = np.frombuffer(self._mm, dtype=np.uint8)
        # Slicing one byte view of the map is ~10x cheaper than a frombuffer per tensor.
        return self._flat[t.start:t.end].view(_DTYPES[t.code]).reshape(t.shape)

    def advise_span(self, start: int, end: int, advice: str) -> None:
        """``madvise`` the file bytes [start, end), in one call: "willneed" (start reading
        them in the background) or "dontneed" (drop them from this process's page tables and
        RSS; they stay in the page cache). Advice only: errors are ignored."""
        flag = {"willneed": getattr(mmap, "MADV_WILLNEED", None),
                "dontneed": getattr(mmap, "MADV_DONTNEED", None)}[advice]
        if self._mm is None or flag is None or not hasattr(self._mm, "madvise"):
            return
        start -= start % mmap.PAGESIZE
        end = min(self.size, end)
        if end > start:
            try:
                self._mm.madvise(flag, start, end - start)
            except (OSError, ValueError):
                pass

    def close(self) -> bool:
        """Unmap; returns False (and keeps the map) while numpy views of it are alive."""
        if self._mm is None:
            return True
        flat, self._flat = self._flat, None
        del flat
        try:
            self._mm.close()
        except BufferError:  # views are alive: keep the map
            self._flat = np.frombuffer(self._mm, dtype=np.uint8)
            return False
        self._mm = None
        return True


class Adapter:
    r"""A LoRA adapter: per-module factors, scalings, PEFT config and provenance.

    Attributes
    ----------
    modules : dict ``name -> (A, B)``
        Module path inside the base model (``model.layers.0.self_attn.q_proj``) to its factors,
        ``A`` of shape ``[r, in]`` and ``B`` of shape ``[out, r]``. For an adapter read from
        disk these are read-only views of the memory-mapped file.
    scalings : dict ``name -> float``
        :math:`s_m` such that the module's update is ``s_m * B @ A``.
    config : dict
        The PEFT ``adapter_config.json`` content.
    provenance : dict or None
        How a combined adapter was made (bank ids, coefficients, mode, rank, ...), written to
        ``metalora.json`` and the safetensors metadata.
    path : pathlib.Path or None
        The directory it was read from.
    """

    def __init__(self, modules: Mapping[str, tuple], scalings: Mapping[str, float],
                 config: Mapping, *, provenance: Optional[Mapping] = None,
                 path: Optional[os.PathLike] = None):
        self._modules = None if modules is None else {k: tuple(v) for k, v in modules.items()}
        self.scalings = dict(scalings)
        self.config = dict(config)
        self.provenance = None if provenance is None else dict(provenance)
        self.path = None if path is None else Path(path)
        self._store: Optional[_Store] = None
        self._keys: Dict[str, Tuple[str, str]] = {}
        self._shapes: Dict[str, Tuple[tuple, tuple]] = {}
        self._spans: Dict[str, Tuple[int, int]] = {}  # file bytes of each module's tensors
        if self._modules is not None:
            self._shapes = {k: (tuple(a.shape), tuple(b.shape)) for k, (a, b) in self._modules.items()}
            missing = set(self._modules) ^ set(self.scalings)
            if missing:
                raise ValueError(f"modules and scalings name different modules: "
                                 f"{sorted(missing)[:5]}")

    # -- reading -------------------------------------------------------------------------
    @property
    def names(self) -> list:
        """Module names, in file order."""
        return list(self._shapes)

    @property
    def modules(self) -> Dict[str, tuple]:
        if self._modules is None:
            self._modules = {m: self.factors(m) for m in self._shapes}
        return self._modules

    def factors(self, name: str) -> tuple:
        """``(A, B)`` of one module (for a file-backed adapter, fresh views of the mapping)."""
        if self._modules is not None and name in self._modules:
            return self._modules[name]
        if self._store is None or name not in self._keys:
            raise KeyError(f"no module {name!r} in this adapter")
        ka, kb = self._keys[name]
        return self._store.array(ka), self._store.array(kb)

    def shapes(self, name: str) -> Tuple[tuple, tuple]:
        """``(A.shape, B.shape)`` of a module, from the header (nothing is read)."""
        return self._shapes[name]

    @property
    def ranks(self) -> Dict[str, int]:
        return {m: s[0][0] for m, s in self._shapes.items()}

    @property
    def dtypes(self) -> set:
        if self._store is not None:
            return {str(_DTYPES[self._store.tensors[k].code]) for ab in self._keys.values()
                    for k in ab}
        return {str(x.dtype) for ab in self.modules.values() for x in ab}

    @property
    def nbytes(self) -> int:
        """Bytes of all factors."""
        if self._store is not None:
            return sum(self._store.tensors[k].nbytes for ab in self._keys.values() for k in ab)
        return sum(x.nbytes for ab in self.modules.values() for x in ab)

    def module_nbytes(self, name: str) -> int:
        if self._store is not None:
            return sum(self._store.tensors[k].nbytes for k in self._keys[name])
        return sum(x.nbytes for x in self.modules[name])

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    @property
    def weights_file(self) -> Optional[Path]:
        return None if self._store is None else self._store.path

    def tensor_name(self, module: str, which: str) -> str:
        """The safetensors key of ``which`` ("A" or "B") for ``module``."""
        if module in self._keys:
            return self._keys[module][0 if which == "A" else 1]
        return f"{PREFIX}{module}.lora_{which}.weight"

    def delta(self, name: str) -> np.ndarray:
        """The dense update ``s * B @ A`` of one module in float64 (for tests and small models)."""
        a, b = self.factors(name)
        a = a.astype(np.float64)
        b = b.astype(np.float64)
        return self.scalings[name] * (b @ a)

    def check_finite(self, names: Optional[Iterable[str]] = None) -> None:
        """Raise :class:`AdapterError` naming the tensor if any factor holds NaN or Inf (reads
        every byte of the selected modules)."""
        for m in self.names if names is None else names:
            for which, x in zip("AB", self.factors(m)):
                v = x.view(np.uint16) if x.dtype == BFLOAT16 else x
                if not all_finite(v):
                    where = self.weights_file or self.path or "adapter"
                    raise AdapterError(where, f"tensor {self.tensor_name(m, which)!r} contains "
                                              f"NaN or Inf")

    def advise(self, names: Sequence[str], advice: str) -> None:
        """``madvise`` the file bytes of modules ``names`` (see ``_Store.advise_span``)."""
        if self._store is not None and names:
            spans = [self._spans[m] for m in names]
            self._store.advise_span(min(s for s, _ in spans), max(e for _, e in spans), advice)

    def close(self) -> bool:
        """Release the file mapping (only possible once no views of it are alive)."""
        if self._store is None:
            return True
        self._modules = None
        return self._store.close()

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        where = f" from {self.path}" if self.path else ""
        return (f"<metalora.Adapter{where}: {len(self._shapes)} modules, rank "
                f"{ranks[0] if len(ranks) == 1 else ranks}, {', '.join(sorted(self.dtypes))}, "
                f"{self.nbytes / 2**20:.1f} MiB>")

    # -- writing -------------------------------------------------------------------------
    def save(self, path: os.PathLike, *, format: str = "peft", overwrite: bool = False,
             **options) -> Path:
        """Write the adapter in an output format, atomically.

        The files go into a temporary directory next to ``path``, are fsynced, and the directory
        is renamed into place: readers see either the old directory or the complete new one,
        and on any error nothing is left behind. NaN/Inf factors are never written.

        Parameters
        ----------
        path : path-like
            The directory (or, for a single-file format such as ``"gguf"``, the file) to
            create. Its parent must exist.
        format : str
            A name in :data:`metalora.writers.WRITERS`: ``"peft"`` (default) writes
            ``adapter_config.json``, ``adapter_model.safetensors`` (metadata
            ``{"format": "pt"}`` plus the ``metalora`` provenance as JSON) and, when there is
            provenance, a readable ``metalora.json``. ``"gguf"`` writes one llama.cpp LoRA file
            (:mod:`metalora.writers.gguf`; needs the ``gguf`` package).
        overwrite : bool
            Replace an existing directory that holds only this format's files (or an existing
            file of this format). Without it an existing ``path`` raises
            :class:`FileExistsError`.
        **options
            Options of the format's writer (PEFT: none; GGUF: ``base=`` the base model's
            ``.gguf`` file or ``config.json``, ``out_type=`` ``"f32"`` (default), ``"f16"`` or
            ``"bf16"``).

        Returns
        -------
        pathlib.Path
            The written directory or file.
        """
        from .writers import save_adapter

        return save_adapter(self, path, format=format, overwrite=overwrite, **options)

    # -- memory mapping ------------------------------------------------------------------
    def verify_unchanged(self) -> None:
        """Raise :class:`AdapterError` naming the file when the safetensors file changed on disk
        since :func:`load_adapter` read its header (a no-op for in-memory adapters)."""
        if self._store is not None and self._modules is None:
            self._store.verify()

    @property
    def is_mapped(self) -> bool:
        """True while this adapter's weights file is memory-mapped."""
        return self._store is not None and self._store.is_open

    def release_mapping(self) -> bool:
        """Unmap the weights file unless the adapter holds its module views (``modules`` was
        accessed) or it was never mapped; a later read maps it again. Returns True when
        unmapped (or nothing was mapped)."""
        if self._store is None or self._modules is not None:
            return self._store is None
        return self._store.close()


_KEY = re.compile(r"^base_model\.model\.(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight$")


def _refuse_key(key: str) -> Optional[str]:
    """Why a tensor that is not a plain lora_A/lora_B weight cannot be combined."""
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        return "embedding LoRAs (lora_embedding_A/B) are not supported"
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors rescale the update, which is then not a B A product"
    if "modules_to_save" in key:
        return "modules_to_save tensors are full trained copies, not low-rank factors"
    if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
        return "LoRA biases are not B A products"
    if key.endswith(".bias"):
        return "trained biases (bias='all' or 'lora_only') are not low-rank factors"
    if "trainable_tokens" in key:
        return "trainable tokens store embedding rows, not low-rank factors"
    return ("unexpected tensor; a LoRA adapter holds only "
            "'base_model.model.<module>.lora_A.weight' and '.lora_B.weight'")


def load_adapter(path: os.PathLike, *, check_finite: bool = False) -> Adapter:
    """Open a PEFT LoRA adapter directory, memory-mapped, without reading the tensor data.

    Parameters
    ----------
    path : path-like
        Directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    check_finite : bool
        Also scan every tensor for NaN/Inf now (reads the whole file). Combining and saving
        check their inputs/outputs anyway.

    Returns
    -------
    Adapter

    Raises
    ------
    AdapterError
        Naming the file and the problem: missing or non-directory path, missing file, corrupt
        or truncated safetensors, invalid or incomplete config, a rank that disagrees with the
        config, or an adapter kind that cannot be combined (DoRA, biases, modules_to_save,
        embedding LoRA).
    """
    path = Path(path)
    if not os.path.exists(path):
        raise AdapterFileNotFoundError(path, "no such adapter directory")
    if not path.is_dir():
        raise AdapterError(path, f"is a file, not an adapter directory; give the directory "
                                 f"holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cpath = path / ADAPTER_CONFIG
    if not cpath.is_file():
        raise AdapterFileNotFoundError(cpath, "missing; not a PEFT adapter directory")
    wpath = path / ADAPTER_WEIGHTS
    if not wpath.is_file():
        hint = (" (only adapter_model.bin found: convert it to safetensors)"
                if (path / "adapter_model.bin").exists() else "")
        raise AdapterFileNotFoundError(wpath, f"missing{hint}")
    try:
        text = cpath.read_text(encoding="utf-8")
        cfg = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(cpath, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise AdapterError(cpath, "JSON nested too deeply to be a PEFT config") from None
    cfg = _check_config(cfg, cpath)
    tensors, meta, size = read_safetensors_header(wpath)
    keys: Dict[str, list] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(wpath, f"tensor {key!r}: {_refuse_key(key)}")
        if t.code not in _DTYPES:
            if t.code == "BF16":  # supported, but its numpy dtype comes from ml_dtypes
                raise AdapterError(wpath, f"tensor {key!r}: bfloat16 needs the ml_dtypes package, "
                                          f"which is not importable: pip install ml_dtypes")
            raise AdapterError(wpath, f"tensor {key!r}: dtype {t.code} is not supported (float32, "
                                      f"float16 or bfloat16)")
        if len(t.shape) != 2:
            raise AdapterError(wpath, f"tensor {key!r}: shape {list(t.shape)} is not 2-D (a "
                                      f"convolution LoRA?); only linear-layer LoRAs are supported")
        keys.setdefault(m["mod"], [None, None])[0 if m["ab"] == "A" else 1] = key
    if not keys:
        raise AdapterError(wpath, "holds no LoRA tensors")
    ad = Adapter(None, {}, cfg, path=path)
    stamp = _stamp(wpath)
    if stamp[2] != size:
        raise AdapterError(wpath, f"changed size while being opened ({size} -> {stamp[2]} bytes): "
                                  f"another process is writing it")
    ad._store = _Store(wpath, tensors, size, stamp)
    # File order (sorted keys) keeps module streaming sequential on disk.
    for mod in sorted(keys, key=lambda k: tensors[keys[k][0] or keys[k][1]].start):
        ka, kb = keys[mod]
        if ka is None or kb is None:
            raise AdapterError(wpath, f"module {mod!r}: has lora_{'B' if ka is None else 'A'} but "
                                      f"no lora_{'A' if ka is None else 'B'}")
        sa, sb = tensors[ka].shape, tensors[kb].shape
        if sa[0] != sb[1] or sa[0] == 0:
            raise AdapterError(wpath, f"module {mod!r}: lora_A is {list(sa)} and lora_B is "
                                      f"{list(sb)}; expected A [r, in] and B [out, r] with the "
                                      f"same r > 0")
        r, s = module_scaling(cfg, mod)
        if r != sa[0]:
            raise AdapterError(wpath, f"module {mod!r}: lora_A has rank {sa[0]} but "
                                      f"{cpath.name} gives r = {r}"
                                      f"{' (rank_pattern)' if r != cfg['r'] else ''}")
        ad._keys[mod] = (ka, kb)
        ad._spans[mod] = (min(tensors[ka].start, tensors[kb].start),
                          max(tensors[ka].end, tensors[kb].end))
        ad._shapes[mod] = (sa, sb)
        ad.scalings[mod] = float(s)
    if "metalora" in meta:
        try:
            ad.provenance = json.loads(meta["metalora"])
        except (json.JSONDecodeError, RecursionError):
            ad.provenance = None
    if check_finite:
        ad.check_finite()
    return ad
