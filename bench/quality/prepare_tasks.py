"""Acquire BIG-bench 1.0.0 tasks and write compact per-task splits under ``bench/quality/tasks``.

    python bench/quality/prepare_tasks.py [--source DIR]

BIG-bench is only distributed as the ``bigbench==1.0.0`` sdist on PyPI, and a plain ``pip download``
refuses it (it declares a direct-URL dependency). ``pip download --no-deps --no-clean
--no-build-isolation`` with a private TMPDIR leaves the unpacked sdist behind; the task files are
read from there (or from ``--source``, an unpacked ``bigbench/benchmark_tasks`` folder).

Every task gets fixed-seed splits: ``test`` (32 examples), ``validation`` (32) and ``train`` (up
to 320). Rows are ``{"input", "output"}`` plus ``references`` when the task gives several accepted
targets. The first row of every file also carries the BIG-bench ``canary`` string, as BIG-bench
asks of any file that stores its examples.

``tasks/index.json`` also holds each task's ``instruction`` (used by the ``instructed`` setting of
``common.py``): the task's ``task_prefix`` when it has one (for the Natural-Instructions subtasks
that is the NI definition, with its "Things to avoid", "Emphasis" and "Prompt" parts), otherwise
its ``description``; ``instruction_from`` says which, and tasks with neither get null and are
listed at the end of the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TASKS_DIR  # noqa: E402

N_TEST, N_VALIDATION, N_TRAIN = 32, 32, 320
MAX_INPUT_CHARS, MAX_TARGET_CHARS = 700, 200
SEED = 20260

NI = "natural_instructions/subtask"
# (id, BIG-bench path, role). Bank: 48 tasks in families (MC-TACO, CosmosQA, QASC, linguistic
# mappings, ...) so that related adapters exist. Extra: tasks with no adapter in the bank, some
# with a relative in it (qasc answer generation, pig-latin decoding, MC-TACO absolute time
# points) and one without (text simplification).
TASKS = [
    ("ni003_mctaco_qgen_duration", NI + "003_mctaco_question_generation_event_duration", "bank"),
    ("ni004_mctaco_answer_duration", NI + "004_mctaco_answer_generation_event_duration", "bank"),
    ("ni005_mctaco_wrong_duration", NI + "005_mctaco_wrong_answer_generation_event_duration", "bank"),
    ("ni006_mctaco_qgen_stationary", NI + "006_mctaco_question_generation_transient_stationary", "bank"),
    ("ni007_mctaco_answer_stationary", NI + "007_mctaco_answer_generation_transient_stationary", "bank"),
    ("ni008_mctaco_wrong_stationary", NI + "008_mctaco_wrong_answer_generation_transient_stationary", "bank"),
    ("ni009_mctaco_qgen_ordering", NI + "009_mctaco_question_generation_event_ordering", "bank"),
    ("ni010_mctaco_answer_ordering", NI + "010_mctaco_answer_generation_event_ordering", "bank"),
    ("ni011_mctaco_wrong_ordering", NI + "011_mctaco_wrong_answer_generation_event_ordering", "bank"),
    ("ni015_mctaco_qgen_frequency", NI + "015_mctaco_question_generation_frequency", "bank"),
    ("ni016_mctaco_answer_frequency", NI + "016_mctaco_answer_generation_frequency", "bank"),
    ("ni017_mctaco_wrong_frequency", NI + "017_mctaco_wrong_answer_generation_frequency", "bank"),
    ("ni018_mctaco_presence", NI + "018_mctaco_temporal_reasoning_presence", "bank"),
    ("ni019_mctaco_category", NI + "019_mctaco_temporal_reasoning_category", "bank"),
    ("ni022_cosmosqa_inappropriate", NI + "022_cosmosqa_passage_inappropriate_binary", "bank"),
    ("ni023_cosmosqa_qgen", NI + "023_cosmosqa_question_generation", "bank"),
    ("ni024_cosmosqa_answer", NI + "024_cosmosqa_answer_generation", "bank"),
    ("ni033_winogrande_answer", NI + "033_winogrande_answer_generation", "bank"),
    ("ni037_qasc_related_fact", NI + "037_qasc_generate_related_fact", "bank"),
    ("ni038_qasc_combined_fact", NI + "038_qasc_combined_fact", "bank"),
    ("ni039_qasc_overlapping_words", NI + "039_qasc_find_overlapping_words", "bank"),
    ("ni040_qasc_qgen", NI + "040_qasc_question_generation", "bank"),
    ("ni042_qasc_incorrect_option", NI + "042_qasc_incorrect_option_generation", "bank"),
    ("ni043_essential_terms_answer", NI + "043_essential_terms_answering_incomplete_questions", "bank"),
    ("ni044_essential_terms_words", NI + "044_essential_terms_identifying_essential_words", "bank"),
    ("ni046_question_typing", NI + "046_miscellaenous_question_typing", "bank"),
    ("ni047_science_questions", NI + "047_misc_answering_science_questions", "bank"),
    ("ni050_multirc_answerability", NI + "050_multirc_answerability", "bank"),
    ("ni051_multirc_answer_sentence", NI + "051_multirc_correct_answer_single_sentence", "bank"),
    ("bb_past_tense", "linguistic_mappings/past_tense_json", "bank"),
    ("bb_plural", "linguistic_mappings/plural_json", "bank"),
    ("bb_pronoun_replacement", "linguistic_mappings/pronoun_replacement_json", "bank"),
    ("bb_question_formation", "linguistic_mappings/question_formation_json", "bank"),
    ("bb_sentence_negation", "linguistic_mappings/sentence_negation_json", "bank"),
    ("bb_pig_latin_encode", "language_games/pig_latin_encode", "bank"),
    ("bb_dates", "unnatural_in_context_learning/dates", "bank"),
    ("bb_reverse_list", "unnatural_in_context_learning/reverse_natural_content", "bank"),
    ("bb_common_gen", "gem/common_gen", "bank"),
    ("bb_e2e_nlg", "gem/e2e_nlg", "bank"),
    ("bb_word_unscrambling", "word_unscrambling", "bank"),
    ("bb_qa_wikidata", "qa_wikidata", "bank"),
    ("bb_periodic_elements", "periodic_elements/subtask_1", "bank"),
    ("bb_object_counting", "object_counting", "bank"),
    ("bb_unit_conversion", "unit_conversion/unit_conversion_with_relative_error", "bank"),
    ("bb_ipa_transliterate", "international_phonetic_alphabet_transliterate", "bank"),
    ("bb_tense", "tense", "bank"),
    ("bb_word_sorting", "word_sorting", "bank"),
    ("bb_auto_categorization", "auto_categorization", "bank"),
    ("x_ni041_qasc_answer", NI + "041_qasc_answer_generation", "extra"),
    ("x_ni013_mctaco_answer_timepoint", NI + "013_mctaco_answer_generation_absolute_timepoint", "extra"),
    ("x_bb_pig_latin_decode", "language_games/pig_latin_decode", "extra"),
    ("x_bb_asset_simplification", "gem/asset", "extra"),
]


def fetch_sdist(workdir: Path) -> Path:
    """Unpack the bigbench 1.0.0 sdist with pip and return its ``benchmark_tasks`` folder."""
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean",
           "--no-build-isolation", "bigbench==1.0.0", "-d", str(workdir / "dl")]
    print("fetching the bigbench==1.0.0 sdist from the package registry ...", flush=True)
    proc = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True,
                          text=True, timeout=900)
    found = sorted(tmp.glob("pip-download-*/bigbench_*/bigbench/benchmark_tasks"))
    if not found:
        # pip always "fails" here (the direct-URL dependency) but leaves the sdist unpacked; no
        # folder means the download itself did not happen.
        raise SystemExit(
            "could not obtain the bigbench==1.0.0 sdist (is the package registry reachable? "
            f"pip said:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]})\nFix: make PyPI reachable, or "
            "pass --source pointing at an unpacked bigbench/benchmark_tasks folder")
    return found[0]


def _targets(ex: dict) -> list:
    t = ex.get("target")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list) and t and all(isinstance(x, str) for x in t):
        return t
    return []


def build_task(root: Path, rel: str, task_id: str, role: str, out_dir: Path) -> dict:
    src = root / rel
    data = json.loads((src / "task.json").read_text(encoding="utf-8"))
    canary = data.get("canary")
    if not canary:
        raise SystemExit(f"{src}/task.json has no canary string; refusing to store its examples")
    rows = []
    for ex in data["examples"]:
        refs = [r.strip() for r in _targets(ex) if r.strip()]
        inp = str(ex.get("input", "")).strip()
        if not refs or not inp or len(inp) > MAX_INPUT_CHARS or len(refs[0]) > MAX_TARGET_CHARS:
            continue
        row = {"input": inp, "output": refs[0]}
        if len(refs) > 1:
            row["references"] = refs
        rows.append(row)
    need = N_TEST + N_VALIDATION + 64
    if len(rows) < need:
        raise SystemExit(f"{task_id}: only {len(rows)} usable examples in {src} (need {need})")
    seed = int.from_bytes(hashlib.sha256(f"{SEED}:{task_id}".encode()).digest()[:8], "little")
    order = np.random.default_rng(seed).permutation(len(rows))
    parts = {"test": order[:N_TEST], "validation": order[N_TEST:N_TEST + N_VALIDATION],
             "train": order[N_TEST + N_VALIDATION:N_TEST + N_VALIDATION + N_TRAIN]}
    tmp = out_dir / f".{task_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, idx in parts.items():
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for k, i in enumerate(sorted(idx)):
                row = dict(rows[i])
                if k == 0:
                    row["canary"] = canary
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    final = out_dir / task_id
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    instruction, origin = None, None
    for key in ("task_prefix", "description"):
        text = str(data.get(key) or "").strip()
        if text:
            instruction, origin = text, key
            break
    return {"id": task_id, "role": role, "source": f"bigbench==1.0.0:{rel}",
            "usable": len(rows), **{f"n_{k}": int(len(v)) for k, v in parts.items()},
            "instruction": instruction, "instruction_from": origin, "canary": canary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="an unpacked bigbench/benchmark_tasks folder "
                    "(default: fetch the sdist with pip into a temporary folder)")
    ap.add_argument("--out", type=Path, default=TASKS_DIR, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="metalora-bigbench-") as work:
        src = args.source or fetch_sdist(Path(work))
        if not (src / "natural_instructions").is_dir():
            raise SystemExit(f"{src} is not a bigbench/benchmark_tasks folder")
        args.out.mkdir(parents=True, exist_ok=True)
        index = []
        for task_id, rel, role in TASKS:
            info = build_task(src, rel, task_id, role, args.out)
            index.append(info)
            print(f"{task_id:34s} {role:5s} usable={info['usable']:5d} train={info['n_train']} "
                  f"instruction={info['instruction_from']}", flush=True)
    canaries = sorted({t.pop("canary") for t in index})   # the index stores task text too
    (args.out / "index.json").write_text(json.dumps(
        {"source": "BIG-bench 1.0.0 (Apache-2.0), sdist on PyPI", "seed": SEED,
         "canary": " | ".join(canaries), "tasks": index}, indent=1, ensure_ascii=False) + "\n")
    bare = [t["id"] for t in index if t["instruction"] is None]
    print(f"wrote {len(index)} tasks to {args.out}; without any instruction: "
          f"{', '.join(bare) if bare else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
