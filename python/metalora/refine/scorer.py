r"""Scoring coefficient vectors on the task's own examples with forward passes of the base model.

The top-k bank adapters' factors sit beside each target linear layer of the model, stacked, and
only a coefficient vector changes between candidates:

.. math:: y = W x + \sum_j c_j s_j B_j (A_j x) = W x + B_{cat} (\mathrm{diag}(c_{rep}) A_{cat} x)

where :math:`c_{rep}` repeats :math:`c_j` over adapter j's rank. No PEFT model is rebuilt per
candidate, and several candidates run in one batched forward (each takes its own copy of the
examples in the batch). The score is the mean teacher-forced negative log-likelihood per target
token of the held-out outputs. A token prefix every prompt shares (a task instruction before each
input, as in Natural-Instructions prompts) runs once per candidate, not once per example: causal
attention makes its states independent of what follows, so its key/value cache is repeated over
the examples.

:class:`Scorer` is the interface the search uses; :class:`TorchScorer` runs a transformers model
(a local folder or a GGUF file, which transformers dequantises to float32). Another engine (e.g.
llama.cpp) only has to provide ``nll_many`` and ``nll_adapter``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Protocol, Sequence, Tuple

import numpy as np

from .._io import check_threads

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..bank import Bank

__all__ = ["Scorer", "TorchScorer", "load_model", "RefineModelError"]


class RefineModelError(ValueError):
    """The model given for refinement cannot be read or does not match the bank."""


class Scorer(Protocol):
    """What the refinement search needs from a model."""

    def nll_many(self, coefficients: Sequence[np.ndarray]) -> List[float]:
        """Mean target NLL for each coefficient vector (one per candidate adapter)."""

    def nll_adapter(self, adapter: "Adapter") -> float:
        """Mean target NLL with a whole adapter applied (e.g. the written svd form)."""


def load_model(path: os.PathLike, *, dtype: str = "float32"):
    """``(model, tokenizer)`` from a transformers folder or a GGUF file (needs ``gguf``)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"refinement needs torch and transformers ({exc.name} is missing): "
                          f"pip install 'metalora[refine]'") from None
    path = Path(path)
    if not path.exists():
        raise RefineModelError(f"{path}: no such model (give a transformers model folder or a "
                               f".gguf file)")
    kw = {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise RefineModelError(f"{path}: a model file must be a .gguf file (or give a "
                                   f"transformers model folder)")
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise ImportError("reading a GGUF model needs the gguf package: pip install gguf")
        kw["gguf_file"] = path.name
        path = path.parent
    elif not (path / "config.json").is_file():
        raise RefineModelError(f"{path}: no config.json; not a transformers model folder")
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise RefineModelError(f"{path}: transformers cannot load it ({exc})") from None
    model.eval()
    return model, tok


def check_model_matches_bank(model, bank: "Bank") -> None:
    """Every bank module must be a linear layer of the model with the adapters' shapes."""
    import torch

    problems = []
    for m in bank.modules:
        try:
            layer = model.get_submodule(m)
        except AttributeError:
            problems.append(f"{m}: not a module of the model")
            continue
        if not isinstance(layer, torch.nn.Linear):
            problems.append(f"{m}: is a {type(layer).__name__}, not a linear layer")
            continue
        (ra, n_in), (n_out, rb) = bank[0].shapes(m)
        if (layer.in_features, layer.out_features) != (n_in, n_out):
            problems.append(f"{m}: the model's layer is {layer.out_features} x {layer.in_features}, "
                            f"the bank's adapters are for {n_out} x {n_in}")
        if len(problems) >= 3:
            break
    if problems:
        base = bank.base_model or "(not recorded)"
        raise RefineModelError(f"the model does not match the bank (base model of the bank: "
                               f"{base}): " + "; ".join(problems))


#: A prompt prefix shared by every held-out example runs once when it is at least this long.
MIN_SHARED_PREFIX = 16


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all ``prompts`` share, each keeping at least one token of its
    own (its last prompt position predicts the first target token); 0 below
    :data:`MIN_SHARED_PREFIX` or for a single prompt (nothing to share)."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    k = next((i for i in range(n) if any(p[i] != first[i] for p in prompts)), max(n, 0))
    return k if k >= MIN_SHARED_PREFIX else 0


def _install_slots(model, modules: Sequence[str]):
    import torch

    class Slot(torch.nn.Module):
        """A base linear layer plus the stacked low-rank paths of the candidate adapters."""

        def __init__(self, linear):
            super().__init__()
            self.linear = linear
            self.A = self.B = None  # [R, in], [out, R] (scalings folded into B)
            self.coef = None  # [P, R]: one row of repeated coefficients per candidate
            self.fixed = None  # (A, B) of a whole adapter, for nll_adapter

        def forward(self, x):
            y = self.linear(x)
            if self.fixed is not None:
                A, B = self.fixed
                return y + (x @ A.T) @ B.T
            if self.coef is None:
                return y
            P = self.coef.shape[0]
            h = x @ self.A.T  # [P * n, T, R]
            h = (h.reshape(P, -1, *h.shape[1:]) * self.coef[:, None, None, :]).reshape(h.shape)
            return y + h @ self.B.T

    slots = {}
    for name in modules:
        parent, _, child = name.rpartition(".")
        layer = model.get_submodule(name)
        slot = Slot(layer)
        setattr(model.get_submodule(parent) if parent else model, child, slot)
        slots[name] = slot
    return slots


class TorchScorer:
    """Mean target NLL of held-out examples under the base model plus a combination of candidate
    adapters (see the module docstring).

    Parameters
    ----------
    model, tokenizer
        A causal LM (transformers) and its tokenizer, e.g. from :func:`load_model`.
    bank : Bank
    candidates : sequence of int
        Bank positions of the adapters the coefficient vectors weigh.
    examples : sequence of (input, output)
        The held-out examples.
    template : str
        The prompt of an example, ``template.format(input=...)``; the target is the output plus
        the tokenizer's end-of-sequence token.
    max_tokens : int
        Prompt + target tokens per example (the prompt is cut from the left).
    batch_candidates : int
        Candidates evaluated in one forward pass.
    threads : int
        torch threads (0: leave torch's setting).
    """

    def __init__(self, model, tokenizer, bank: "Bank", candidates: Sequence[int],
                 examples: Sequence[Tuple[str, str]], *, template: str = "{input}\n",
                 max_tokens: int = 128, batch_candidates: int = 4, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(check_threads(threads))
        check_model_matches_bank(model, bank)
        self.model, self.tok = model, tokenizer
        self.dtype = next(model.parameters()).dtype
        self.candidates = list(candidates)
        self.batch_candidates = max(1, int(batch_candidates))
        self.slots = _install_slots(model, bank.modules)
        ads = [bank[i] for i in self.candidates]
        for m, slot in self.slots.items():
            As, Bs = [], []
            for a in ads:
                A, B = (np.asarray(x, dtype=np.float32) for x in a.factors(m))
                As.append(A)
                Bs.append(B * np.float32(a.scalings[m]))
            slot.A = torch.from_numpy(np.concatenate(As, 0)).to(self.dtype)
            slot.B = torch.from_numpy(np.concatenate(Bs, 1)).to(self.dtype)
            slot.rep = torch.tensor(np.repeat(np.arange(len(ads)), [x.shape[0] for x in As]))
        # decoder + linear head (the Llama family and most causal LMs); anything else (a
        # soft-capped or scaled head) goes through the model's own logits
        self._decoder = getattr(model, "get_decoder", lambda: None)()
        self._head = model.get_output_embeddings()
        if (self._decoder is None or not isinstance(self._head, torch.nn.Linear)
                or getattr(model.config, "final_logit_softcapping", None)
                or getattr(model.config, "logit_scale", None)):
            self._head = None
        self._batch = self._encode(examples, template, max_tokens)

    def _cacheable(self) -> bool:
        """Whether the shared prompt prefix can run once: a decoder with a linear head whose
        key/value cache can be repeated over the batch (the Llama family and most causal LMs)."""
        import inspect

        if self._head is None or getattr(self.model.config, "use_cache", True) is False:
            return False
        args = inspect.signature(self._decoder.forward).parameters
        # transformers 5 calls the decoder's cache argument `cache`, 4 `past_key_values`
        self._cache_arg = next((a for a in ("cache", "past_key_values") if a in args), None)
        return self._cache_arg is not None

    def _encode(self, examples, template: str, max_tokens: int):
        import torch

        tok = self.tok
        eos = tok.eos_token_id
        if eos is None:
            raise RefineModelError("the tokenizer has no end-of-sequence token")
        pairs = []
        for inp, out in examples:
            target = tok(out, add_special_tokens=False)["input_ids"][: max_tokens // 2 - 1] + [eos]
            prompt = tok(template.format(input=inp), add_special_tokens=False)["input_ids"]
            prompt = prompt[-(max_tokens - len(target)):]
            pairs.append((prompt, target))
        self.prefix = shared_prefix([p for p, _ in pairs]) if self._cacheable() else 0
        n = max(len(p) + len(t) for p, t in pairs)
        ids = torch.full((len(pairs), n), eos, dtype=torch.long)
        mask = torch.zeros((len(pairs), n), dtype=torch.long)
        labels = torch.full((len(pairs), n), -100, dtype=torch.long)
        for i, (p, t) in enumerate(pairs):
            ids[i, :len(p) + len(t)] = torch.tensor(p + t)
            mask[i, :len(p) + len(t)] = 1
            labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
        return ids, mask, labels

    def _nll(self, P: int) -> List[float]:
        """Per-candidate mean target NLL with the slots set for P candidates."""
        import torch

        ids, mask, labels = self._batch
        n, k = ids.shape[0], self.prefix
        with torch.no_grad():
            ids, mask, lab = ids.repeat(P, 1), mask.repeat(P, 1), labels.repeat(P, 1)[:, k + 1:]
            keep = lab != -100
            if self._head is None:  # the model's own logits (a soft-capped or scaled head)
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
            else:
                if k:  # the shared prefix once per candidate, its cache repeated over the examples
                    out = self._decoder(input_ids=ids[::n, :k], use_cache=True)
                    cache = getattr(out, "cache", None) or out.past_key_values
                    cache.batch_repeat_interleave(n)
                    hidden = self._decoder(input_ids=ids[:, k:], attention_mask=mask,
                                           use_cache=True, **{self._cache_arg: cache},
                                           position_ids=torch.arange(k, ids.shape[1]).expand(
                                               len(ids), -1)).last_hidden_state
                else:
                    hidden = self._decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                # the vocabulary projection on target positions only
                head = self._head
                logits = torch.nn.functional.linear(
                    hidden[:, :-1][keep].float(), head.weight.float(),
                    None if head.bias is None else head.bias.float())
            logits = logits.float()
            nll = torch.nn.functional.cross_entropy(logits, lab[keep], reduction="none")
            per_row = torch.zeros(P * n, dtype=torch.float64).index_add_(
                0, torch.nonzero(keep)[:, 0], nll.double())
            counts = keep.sum(1).reshape(P, n).sum(1).double()
            return (per_row.reshape(P, n).sum(1) / counts).tolist()

    def nll_many(self, coefficients: Sequence[np.ndarray]) -> List[float]:
        import torch

        out: List[float] = []
        for s in range(0, len(coefficients), self.batch_candidates):
            chunk = np.stack([np.asarray(c, dtype=np.float64) for c in
                              coefficients[s:s + self.batch_candidates]])
            if chunk.shape[1] != len(self.candidates):
                raise ValueError(f"coefficient vectors have {chunk.shape[1]} entries for "
                                 f"{len(self.candidates)} candidates")
            coef = torch.from_numpy(chunk).to(self.dtype)
            for slot in self.slots.values():
                slot.fixed = None
                slot.coef = coef[:, slot.rep]
            try:
                out.extend(self._nll(len(chunk)))
            finally:
                for slot in self.slots.values():
                    slot.coef = None
        return out

    def nll(self, coefficients: np.ndarray) -> float:
        return self.nll_many([coefficients])[0]

    def nll_adapter(self, adapter: "Adapter") -> float:
        import torch

        for m, slot in self.slots.items():
            A, B = (np.asarray(x, dtype=np.float32) for x in adapter.factors(m))
            B = B * np.float32(adapter.scalings[m])
            slot.fixed = (torch.from_numpy(A).to(self.dtype), torch.from_numpy(B).to(self.dtype))
        try:
            return self._nll(1)[0]
        finally:
            for slot in self.slots.values():
                slot.fixed = None

    def nll_base(self) -> float:
        return self._nll(1)[0]

