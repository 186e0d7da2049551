"""Write README.md, a Hugging Face model card, into an exported student folder.

    python -m inference.model_card --model runs/distill/final
    python -m inference.evaluate --model runs/distill/final --test data/catalogs/test.jsonl --direction zh-en \\
        --json > zh-en.json                                          # and the same for en-zh
    python -m inference.model_card --model runs/distill/final --eval zh-en.json --eval en-zh.json

Everything is read from the folder itself: config.json (shape, vocabulary, lengths), and, when train_ds.py wrote
them, training_config.json (teacher, data, distillation settings) and metrics.json (validation scores of the exported
step). Test-split scores are given (metrics= here, --eval on the command line); a direction without them shows its
validation score, labelled as such, or none.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from config import DIRECTIONS

log = logging.getLogger(__name__)

CARD = "README.md"
UNKNOWN = "not recorded"
DECODERS = {"transformer": "transformer (causal self-attention with a KV cache)",
            "recurrent": "recurrent (SSRU: a gated linear recurrence with a fixed-size state per layer)"}


class ModelCardError(ValueError):
    """The folder or the scores given cannot make a model card; the message says what to fix."""


@dataclass(frozen=True)
class Score:
    direction: str
    split: str  # "test" or "validation"
    bleu: float
    chrf: float
    n: int | None  # sentences scored
    where: str  # the file or subset the split came from


def read_optional_json(path: Path) -> dict[str, Any]:
    """A JSON object from path, {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"{path}: not valid JSON ({exc}); re-export the folder") from None
    if not isinstance(loaded, dict):
        raise ModelCardError(f"{path}: expected a JSON object; re-export the folder")
    return loaded


def student_config(folder: Path) -> dict[str, Any]:
    config = read_optional_json(folder / "config.json")
    if config.get("model_type") != "rk_student":
        raise ModelCardError(f"{folder}: not a student folder (config.json missing or model_type is not "
                             "rk_student); give a folder exported by train_ds.py --stage distill")
    return config


def parameter_count(folder: Path) -> int:
    """Parameters exactly as Translator.parameters counts them, from config.json alone (no weights loaded)."""
    import torch

    from model import StudentConfig, StudentForTranslation
    with torch.device("meta"):
        student = StudentForTranslation(StudentConfig.from_pretrained(folder))
    return sum(p.numel() for p in student.parameters())


def code(value: str) -> str:
    return value if value == UNKNOWN else f"`{value}`"


def scores(given: dict[str, dict], validation: dict[str, Any], data_path: str) -> list[Score]:
    """One score per direction that has one: the given test score, else the run's validation score."""
    per_direction = validation.get("directions") or {}
    out = []
    for direction in DIRECTIONS:
        if direction in given:
            result = given[direction]
            out.append(Score(direction, "test", float(result["bleu"]), float(result["chrf"]), result.get("n"),
                             code(result.get("test", UNKNOWN))))
        elif direction in per_direction:
            result = per_direction[direction]
            out.append(Score(direction, "validation", float(result["bleu"]), float(result["chrf"]), result.get("n"),
                             f"subset of {code(data_path)} that picked this checkpoint"))
    return out


def check_given(metrics: dict[str, dict], parameters: int) -> None:
    for direction, result in metrics.items():
        if direction not in DIRECTIONS:
            raise ModelCardError(f"metrics: unknown direction {direction!r}; use {', '.join(DIRECTIONS)}")
        missing = {"bleu", "chrf"} - set(result)
        if missing:
            raise ModelCardError(f"metrics[{direction!r}] has no {', '.join(sorted(missing))}; give the JSON that "
                                 "python -m inference.evaluate --json prints")
        if result.get("params", parameters) != parameters:
            raise ModelCardError(f"metrics[{direction!r}] scored a model with {result['params']:,} parameters, this "
                                 f"folder's has {parameters:,}; evaluate this folder")


def front_matter(score_list: list[Score], data_path: str, name: str) -> str:
    meta: dict[str, Any] = {"language": ["zh", "en"], "license": "other",
                            "tags": ["translation", "distillation", "rk-distill"], "pipeline_tag": "translation",
                            "metrics": ["bleu", "chrf"]}
    if score_list:
        meta["model-index"] = [{"name": name, "results": [
            {"task": {"type": "translation", "name": f"Translation {s.direction}"},
             "dataset": {"name": data_path, "type": data_path, "split": s.split},
             "metrics": [{"type": "bleu", "value": s.bleu, "name": "BLEU"},
                         {"type": "chrf", "value": s.chrf, "name": "chrF"}]} for s in score_list]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def model_rows(config: dict[str, Any], training: dict[str, Any], validation: dict[str, Any],
               parameters: int) -> list[tuple[str, str]]:
    data_cfg, distill = training.get("data", {}), training.get("distill", {})
    rows = [("Teacher", code(training.get("train", {}).get("teacher", UNKNOWN))),
            ("Training data", code(data_cfg.get("path", UNKNOWN))),
            ("Directions trained", ", ".join(data_cfg.get("directions", [])) or UNKNOWN),
            ("Preset", code(config.get("preset", UNKNOWN))), ("Parameters", f"{parameters:,}"),
            ("Decoder", DECODERS.get(config["decoder"], config["decoder"])),
            ("Shape", f"{config['encoder_layers']}-layer encoder, {config['decoder_layers']}-layer decoder, width "
                      f"{config['d_model']}, {config['n_heads']} heads, feed-forward {config['ffn_dim']}"),
            ("Vocabulary", f"{config['vocab_size']:,} tokens: the teacher's most frequent in the training data, plus "
                           "its special tokens and all 256 byte tokens"),
            ("Maximum length", f"{config['max_source_len']} source tokens, {config['max_target_len']} target tokens")]
    if distill:
        rows.append(("Distillation", f"{distill.get('kd_loss')}, alpha {distill.get('alpha')}, temperature "
                                     f"{distill.get('temperature')}"))
    if "step" in validation:
        rows.append(("Exported at step", str(validation["step"])))
    return rows


def score_section(score_list: list[Score]) -> list[str]:
    lines = ["## Scores", ""]
    if score_list:
        lines += ["| Direction | Split | BLEU | chrF | Sentences |", "|---|---|---|---|---|"]
        lines += [f"| {s.direction} | {s.split}: {s.where} | {s.bleu:.2f} | {s.chrf:.2f} | "
                  f"{s.n if s.n is not None else '?'} |" for s in score_list]
        lines += ["", "sacrebleu corpus BLEU (zh tokenizer for Chinese targets, 13a for English) and chrF, greedy "
                      "decoding.", ""]
    if not score_list or any(s.split == "validation" for s in score_list):
        caveat = " (validation scores chose this checkpoint, so they flatter it)" if score_list else ""
        lines += [f"Not scored on a test split yet{caveat}. Add test scores with:", "", "```bash",
                  *(f"python -m inference.evaluate --model MODEL_DIR --test TEST.jsonl --direction {d} --json > "
                    f"{d}.json" for d in DIRECTIONS),
                  "python -m inference.model_card --model MODEL_DIR "
                  + " ".join(f"--eval {d}.json" for d in DIRECTIONS), "```", ""]
    return lines


def render(folder: Path, metrics: dict[str, dict]) -> str:
    config = student_config(folder)
    training = read_optional_json(folder / "training_config.json")
    validation = read_optional_json(folder / "metrics.json")
    parameters = parameter_count(folder)
    check_given(metrics, parameters)
    teacher = training.get("train", {}).get("teacher")
    data_path = training.get("data", {}).get("path", UNKNOWN)
    score_list = scores(metrics, validation, data_path)
    name = f"rk-distill-{config.get('preset', 'student')}-student"
    lines = [f"# {name}", "",
             f"A {parameters:,}-parameter Chinese ↔ English translator (encoder-decoder) distilled with rk-distill "
             f"from {f'the Qwen teacher `{teacher}`' if teacher else 'a Qwen teacher'}. It runs on a CPU with "
             "PyTorch or onnxruntime, or on a Rockchip NPU after `python -m deploy`.", "",
             "## Model", "", "| | |", "|---|---|",
             *(f"| {key} | {value} |" for key, value in model_rows(config, training, validation, parameters)), "",
             *score_section(score_list),
             "## Use", "", "MODEL_DIR is this folder. From Python, in an rk-distill checkout:", "", "```python",
             "from inference import Translator", "",
             'translator = Translator("MODEL_DIR")  # split_long=True translates long texts sentence by sentence',
             'print(translator.translate(["打开文件"], "zh-en"))', "```", "", "From the shell:", "", "```bash",
             'python -m inference.translate --model MODEL_DIR --direction zh-en "打开文件"',
             "python -m inference.server --model MODEL_DIR --port 8000     # POST /translate, GET /health",
             "python -m deploy --model MODEL_DIR --target rv1126b --calib VALID.jsonl --out dist/rv1126b", "```", "",
             "## Limitations", "",
             f"- Inputs over {config['max_source_len']} source tokens are refused; `--split_long` (or "
             "`split_long=True`) translates them sentence by sentence, without context across sentences.",
             f"- A translation stops at {config['max_target_len']} target tokens; one that reaches the limit is "
             "logged as possibly cut off.",
             f"- Trained on {code(data_path)} only: other domains, registers and long documents are untested.",
             "- Characters outside the trimmed vocabulary are spelled byte by byte, which costs length and quality.",
             "- A small student inherits its teacher's errors and adds its own: it can drop, repeat or invent "
             "content. Check translations where mistakes matter; nothing filters unsafe output.", "",
             "## License", "",
             "Not set: replace `license: other` in the front matter with this model's license, which must respect "
             "the teacher's license and the training data's terms.", ""]
    return front_matter(score_list, data_path, name) + "\n" + "\n".join(lines)


def write_model_card(folder: str | Path, *, metrics: dict[str, dict] | None = None) -> Path:
    """Write folder/README.md and return its path.

    metrics: test-split scores by direction, each as `python -m inference.evaluate --json` prints it (bleu, chrf;
    n, test and params are used when present). Directions without one show the run's validation score.
    """
    folder = Path(folder)
    card = folder / CARD
    card.write_text(render(folder, metrics or {}), encoding="utf-8")
    return card


def load_eval(path: Path) -> dict[str, Any]:
    """One `inference.evaluate --json` result from a file."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path}: not readable as the JSON object that python -m inference.evaluate --json "
                             f"prints ({exc})") from None
    if not isinstance(result, dict) or "direction" not in result:
        raise ModelCardError(f"{path}: no direction; give the JSON object that python -m inference.evaluate --json "
                             "prints")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="exported student folder (RUN/final)")
    parser.add_argument("--eval", action="append", default=[], type=Path, metavar="JSON",
                        help="a file holding what `python -m inference.evaluate --json` printed for this folder on "
                             "the test split; once per direction")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        metrics: dict[str, dict] = {}
        for path in args.eval:
            result = load_eval(path)
            if result["direction"] in metrics:
                raise ModelCardError(f"{path}: a second --eval for {result['direction']}; give one per direction")
            metrics[result["direction"]] = result
        log.info("wrote %s", write_model_card(args.model, metrics=metrics))
    except ModelCardError as exc:
        print(f"model_card: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
