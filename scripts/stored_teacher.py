"""The stored teacher the quickstart starts from: store one from a finished `train_ds.py --stage sft` run, and check
that it fits this machine's corpus.

    python -m scripts.stored_teacher save --run RUN --corpus data/catalogs --out models/tiny-qwen-catalogs \
        --command "the exact command that trained it" --eval zh-en.json --eval en-zh.json
    python -m scripts.stored_teacher check models/tiny-qwen-catalogs data/catalogs

A teacher trained on the catalog corpus must never have seen a catalog that this machine's corpus puts in its valid
or test split: its scores there would be memory, not translation. `save` records which catalogs the run trained on
(corpus.json); `check` refuses the teacher, in one line, when one of them is a valid or test catalog here.
`save` also writes the folder's README.md: the command, the run's log and validation curve, the test scores given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

CORPUS_FILE = "corpus.json"


class StoredTeacherError(ValueError):
    """The stored teacher cannot be used with this corpus, or cannot be stored; the message says why."""


def corpus_catalogs(corpus: Path) -> dict[str, list[str]]:
    stats = corpus / "stats.json"
    if not stats.is_file():
        raise StoredTeacherError(f"{stats}: not found; build the corpus first (python -m scripts.build_corpus)")
    return json.loads(stats.read_text())["catalogs"]


def check(teacher: Path, corpus: Path) -> None:
    """Raise StoredTeacherError when a catalog the teacher trained on is a valid or test catalog of `corpus`."""
    record = teacher / CORPUS_FILE
    if not record.is_file():
        raise StoredTeacherError(f"{record}: not found; {teacher} is not a stored teacher (scripts/stored_teacher.py "
                                 "save writes one)")
    trained_on = set(json.loads(record.read_text())["train_catalogs"])
    here = corpus_catalogs(corpus)
    leaked = sorted(trained_on & (set(here["valid"]) | set(here["test"])))
    if leaked:
        raise StoredTeacherError(f"{teacher} trained on catalogs that are held out here ({', '.join(leaked[:5])}"
                                 f"{' ...' if len(leaked) > 5 else ''}): its scores would not be honest on this corpus")


def save(run: Path, corpus: Path, out: Path, command: str, evals: list[Path]) -> Path:
    """Copy RUN/final to `out` with corpus.json, the run's train.log and a README.md saying how it was made."""
    final = run / "final"
    if not (final / "model.safetensors").is_file():
        raise StoredTeacherError(f"{final}: no model.safetensors; give the --out of a finished --stage sft run")
    catalogs = corpus_catalogs(corpus)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    shutil.copy(run / "train.log", tmp / "train.log")
    (tmp / CORPUS_FILE).write_text(json.dumps({"corpus": str(corpus), "train_catalogs": catalogs["train"],
                                               "held_out_catalogs": catalogs["valid"] + catalogs["test"]},
                                              indent=2) + "\n")
    (tmp / "README.md").write_text(readme(run, command, [json.loads(p.read_text()) for p in evals]))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def readme(run: Path, command: str, evals: list[dict]) -> str:
    history = json.loads((run / "history.json").read_text())
    curve = "\n".join(f"| {h['step']} | {h['loss']:.3f} | {h['directions']['zh-en']['bleu']:.2f} / "
                      f"{h['directions']['zh-en']['chrf']:.2f} | {h['directions']['en-zh']['bleu']:.2f} / "
                      f"{h['directions']['en-zh']['chrf']:.2f} |" for h in history)
    tests = "\n".join(f"| {e['direction']} | {e['test']} | {e['n']} | {e['bleu']:.2f} | {e['chrf']:.2f} |"
                      for e in evals)
    return f"""# The quickstart's stored teacher

A tiny Qwen2-architecture causal LM (random weights, then fine-tuned) that `scripts/quickstart.sh` starts from:
on 2 CPU cores a teacher cannot both learn to translate and teach a student within the quickstart's 30 minutes, so
this one was fine-tuned once, ahead of time, with the project's own `--stage sft`. Nothing here was downloaded or
trained on anything but the train split of the machine's gettext catalogs (`corpus.json` lists them; the
quickstart refuses this teacher where one of them is held out). `TEACHER=scratch bash scripts/quickstart.sh`
makes and fine-tunes one from random weights in the run instead.

## How it was made

```bash
{command}
```

The run's log is `train.log`; its resolved configuration is `training_config.json`.

## Validation during fine-tuning (greedy, the run's validation subset)

| step | loss | zh-en BLEU / chrF | en-zh BLEU / chrF |
|---:|---:|---|---|
{curve}

## Test scores (greedy, `python -m inference.evaluate`)

| direction | test file | pairs | BLEU | chrF |
|---|---|---:|---:|---:|
{tests}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="action", required=True)
    saving = commands.add_parser("save", help="store RUN/final of a finished sft run")
    saving.add_argument("--run", type=Path, required=True, help="the sft run's --out folder")
    saving.add_argument("--corpus", type=Path, required=True, help="the full corpus folder it was split from")
    saving.add_argument("--out", type=Path, required=True, help="where to store the teacher")
    saving.add_argument("--command", required=True, help="the exact commands that trained it, for its README")
    saving.add_argument("--eval", type=Path, action="append", default=[],
                        help="what `python -m inference.evaluate --json` printed for it; once per direction")
    checking = commands.add_parser("check", help="refuse a stored teacher that trained on a held-out catalog")
    checking.add_argument("teacher", type=Path)
    checking.add_argument("corpus", type=Path, help="the full corpus folder (its stats.json lists the catalogs)")
    args = parser.parse_args(argv)
    try:
        if args.action == "save":
            print(save(args.run, args.corpus, args.out, args.command, args.eval))
        else:
            check(args.teacher, args.corpus)
    except StoredTeacherError as exc:
        print(f"stored_teacher: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
