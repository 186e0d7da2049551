"""One typed configuration for a training run of rk-distill (deploy/ takes its own flags: python -m deploy --help).

A run's configuration is built in three layers, each overriding the last:
the student preset (`--preset tiny`), an optional JSON/YAML file (`--config run.yaml`),
then command-line flags (`--model.d_model 256`, or the short aliases such as `--max_steps`).
The resolved configuration is saved with every run and checkpoint.

This module imports no torch: scripts that only read configs stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _field(default: Any, help: str, choices: tuple | None = None, low: float | None = None,
           high: float | None = None) -> Any:
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


DIRECTIONS = ("zh-en", "en-zh")


@dataclass
class ModelConfig:
    """The student translator's shape (see model.py)."""
    preset: str = _field("tiny", "student preset the other model fields started from",
                         choices=("tiny", "balanced", "performance", "bergamot", "custom"))
    d_model: int = _field(128, "width of every layer", low=16, high=2048)
    n_heads: int = _field(4, "attention heads; must divide d_model", low=1, high=64)
    encoder_layers: int = _field(3, "encoder layers", low=1, high=24)
    decoder_layers: int = _field(2, "decoder layers", low=1, high=24)
    ffn_dim: int = _field(512, "inner width of each feed-forward block", low=16, high=16384)
    decoder: str = _field("transformer", "decoder kind: self-attention with a KV cache, or a "
                          "fixed-state SSRU recurrence (cheapest per step on an NPU)",
                          choices=("transformer", "recurrent"))
    dropout: float = _field(0.1, "dropout probability in training", low=0.0, high=0.9)
    max_source_len: int = _field(48, "longest source, in tokens (the static length of deployed graphs)",
                                 low=4, high=1024)
    max_target_len: int = _field(48, "longest translation, in tokens, end token included", low=4, high=1024)


@dataclass
class DataConfig:
    """Where the parallel corpus comes from and how it becomes examples."""
    path: str = _field("data/catalogs", "corpus: a folder with train/valid/test.jsonl, a .jsonl/.tsv file, "
                       "a datasets folder saved with save_to_disk, or a datasets hub name such as wmt19:zh-en")
    directions: list = _field(list(DIRECTIONS), "translation directions to train, each one example per pair")
    vocab_size: int = _field(8000, "student vocabulary: the most frequent teacher token ids in the training "
                             "corpus (special and byte tokens are always added)", low=300, high=200000)
    max_chars: int = _field(200, "longest side of a pair, in characters; a pair with a longer side is a bad line "
                            "(reason too_long)", low=8, high=100000)
    on_bad_line: str = _field("error", "a bad corpus line (not UTF-8, invalid JSON/TSV, missing, empty or "
                              "non-string field, too long, wrong language, source equal to target, exact "
                              "duplicate): error = stop before training and list every one with file, line and "
                              "reason; skip = drop them and log their counts per reason and file",
                              choices=("error", "skip"))
    tokens_per_batch: int = _field(1024, "fill each micro-batch up to this many padded source+target tokens, "
                                   "with length bucketing so padding stays low; 0 = train.micro_batch_size "
                                   "sentences per micro-batch", low=0, high=10**7)
    stream_window: int = _field(0, "read the train split of a datasets folder (save_to_disk) as a memory-mapped "
                                "stream, this many rows at a time, so memory does not grow with the corpus (needs "
                                "train.max_steps); 0 = load the split whole", low=0, high=10**8)
    valid_subset: int = _field(200, "validation pairs used for BLEU during training", low=1, high=10**6)


@dataclass
class DistillConfig:
    """How the student learns from the teacher."""
    kd_loss: str = _field("forward_kl", "divergence between teacher and student token distributions (kd_loss.py "
                          "defines each)", choices=("forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                                                    "skew_reverse_kl", "tvd"))
    alpha: float = _field(0.5, "weight of the KD term; 1 - alpha weighs cross-entropy on the reference",
                          low=0.0, high=1.0)
    temperature: float = _field(2.0, "softens both distributions; the KD term is scaled by T^2",
                                low=0.05, high=100.0)
    beta: float = _field(0.5, "JSD mixture weight (0 tends to forward KL, 1 to reverse KL)", low=0.0, high=1.0)
    skew: float = _field(0.1, "skewed KLs: share of the first distribution mixed into the second (DistiLLM's "
                         "alpha; 0 = plain KL)", low=0.0, high=0.99)
    chunk_tokens: int = _field(0, "target tokens per chunk of the fused KD loss; 0 = as many as fit 256 MiB of "
                               "float32 logits at the student's vocabulary", low=0, high=10**6)
    teacher_placement: str = _field("auto", "where the frozen teacher's weights live: resident = whole on every "
                                    "rank (no all-gather per step), sharded = ZeRO-3 partitions gathered per "
                                    "layer, offload = partitions in CPU memory (slowest); auto picks by free "
                                    "memory and logs why", choices=("auto", "resident", "sharded", "offload"))
    seq_kd: bool = _field(True, "sequence-level KD: the student trains on the teacher's translation of each "
                          "training source (greedy or beam search, distill.seq_kd_beams; decoded over the student's "
                          "vocabulary, once, before step 1, into "
                          "distill.seq_kd_cache) instead of the reference, still with the token-level KD term; "
                          "the default because it trained the best students in bench/kd_methods.py (README); "
                          "false = the references")
    seq_kd_ratio: float = _field(1.0, "with seq_kd: share of training examples (fixed per example by the seed) that "
                                 "use the teacher's translation; the rest keep the reference", low=0.0, high=1.0)
    seq_kd_beams: int = _field(1, "with seq_kd: beams of the teacher's search for its translations (1 = greedy; "
                               "N costs about N times the teacher's decoding, once)", low=1, high=16)
    seq_kd_batch: int = _field(64, "with seq_kd: sources per teacher decoding batch (sorted by length, so a batch "
                               "pads little); its KV cache grows with it", low=1, high=100000)
    seq_kd_cache: str = _field("", "with seq_kd: JSONL file of the teacher's translations, reused across epochs, "
                               "resumes and runs; refused when made by another teacher, data or vocabulary "
                               "(empty = RUN/seq_kd_cache.jsonl)")
    on_policy_ratio: float = _field(0.0, "share of steps (fixed per step by the seed) on which the student samples "
                                    "its own translations (temperature 1) and the KD term is taken on those "
                                    "samples as the teacher scores them; the CE term stays on the reference",
                                    low=0.0, high=1.0)


@dataclass
class TrainConfig:
    """The optimisation loop and its outputs."""
    out: str = _field("runs/default", "run folder: checkpoints/, tb/, final/, train.log, config.json")
    teacher: str = _field("models/tiny-qwen", "teacher folder (Hugging Face Qwen causal LM)")
    ds_config: str = _field("auto", "DeepSpeed config for the trained model; auto = ds_configs/zero3.json, or, for "
                            "a student distilled on GPUs, ds_configs/zero2.json (a small student gains nothing from "
                            "partitioned weights, and ZeRO-3 would all-gather every layer each micro-batch)")
    teacher_ds_config: str = _field("ds_configs/teacher_zero3.json", "DeepSpeed config for the frozen teacher")
    lr: float = _field(1e-3, "peak learning rate (AdamW)", low=1e-7, high=1.0)
    weight_decay: float = _field(0.01, "AdamW weight decay", low=0.0, high=1.0)
    warmup_steps: int = _field(50, "linear warm-up steps before cosine decay", low=0, high=10**7)
    min_lr_ratio: float = _field(0.1, "cosine decay floor, as a fraction of lr", low=0.0, high=1.0)
    micro_batch_size: int = _field(16, "sentences per rank per micro-batch", low=1, high=100000)
    grad_accum: int = _field(1, "micro-batches per optimiser step", low=1, high=1024)
    grad_clip: float = _field(1.0, "clip the global gradient norm to this (0 = off)", low=0.0, high=1e6)
    max_steps: int = _field(0, "stop after this many optimiser steps (0 = run the epochs)", low=0, high=10**9)
    epochs: int = _field(1, "passes over the training examples when max_steps is 0", low=1, high=10**6)
    eval_every: int = _field(100, "validate (loss, BLEU, chrF) every N steps", low=1, high=10**9)
    save_every: int = _field(200, "checkpoint every N steps (also at the end and on SIGTERM/SIGINT)",
                             low=1, high=10**9)
    keep: int = _field(2, "checkpoints kept on disk (older ones are deleted)", low=1, high=1000)
    patience: int = _field(0, "stop after this many evaluations without a better BLEU (0 = never)",
                           low=0, high=10**6)
    log_every: int = _field(10, "log a line to the console every N steps (TensorBoard gets every step)",
                            low=1, high=10**6)
    seed: int = _field(1234, "random seed for initialisation, shuffling and dropout", low=0, high=2**31 - 1)
    bf16: str = _field("auto", "bf16 compute: auto = on GPUs that support it, off on CPU",
                       choices=("auto", "on", "off"))
    max_bad_steps: int = _field(5, "stop after this many skipped steps in a row (non-finite loss or gradient: "
                                "the update is skipped and counted)", low=1, high=10**6)
    trust_remote_code: bool = _field(False, "let transformers run Python code shipped in the teacher folder; "
                                     "only for folders you trust (Qwen needs none)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


# Presets fix the student's shape and its vocabulary cap; parameter counts are printed by
# `python model.py --preset NAME` (tiny ~2M, balanced ~20M, performance ~52M, bergamot ~17M).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"model": dict(d_model=128, n_heads=4, encoder_layers=3, decoder_layers=2, ffn_dim=512,
                           decoder="transformer"),
             "data": dict(vocab_size=8000)},
    "balanced": {"model": dict(d_model=320, n_heads=8, encoder_layers=6, decoder_layers=3, ffn_dim=1280,
                               decoder="transformer"),
                 "data": dict(vocab_size=24000)},
    "performance": {"model": dict(d_model=512, n_heads=8, encoder_layers=6, decoder_layers=4, ffn_dim=2048,
                                  decoder="transformer"),
                    "data": dict(vocab_size=32000)},
    # Mozilla's on-device students: a deep encoder and a shallow SSRU decoder.
    "bergamot": {"model": dict(d_model=256, n_heads=8, encoder_layers=6, decoder_layers=2, ffn_dim=1536,
                               decoder="recurrent"),
                 "data": dict(vocab_size=32000)},
}

# Defaults of a run on GPUs: a layer under the preset, a --config file and flags, applied only when the run has a
# GPU. CPU runs (CI, the quickstart) keep the field defaults above. On a GPU a micro-batch of 1,024 tokens leaves the
# teacher's matrix units idle, and validating every 100 steps of ~0.3 s would spend more time decoding than training.
GPU_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": dict(tokens_per_batch=8192),
    "distill": dict(seq_kd_batch=256),
    "train": dict(micro_batch_size=64, eval_every=1000, save_every=1000, log_every=50),
}

# Short flags users type most; each maps to one dotted field.
ALIASES = {
    "preset": "model.preset", "teacher": "train.teacher", "data": "data.path", "out": "train.out",
    "max_steps": "train.max_steps", "epochs": "train.epochs", "eval_every": "train.eval_every",
    "save_every": "train.save_every", "keep": "train.keep", "patience": "train.patience",
    "lr": "train.lr", "seed": "train.seed", "micro_batch_size": "train.micro_batch_size",
    "kd_loss": "distill.kd_loss", "alpha": "distill.alpha", "temperature": "distill.temperature",
    "teacher_placement": "distill.teacher_placement",
    "on_bad_line": "data.on_bad_line", "max_bad_steps": "train.max_bad_steps", "log_every": "train.log_every",
    "warmup_steps": "train.warmup_steps", "grad_accum": "train.grad_accum", "ds_config": "train.ds_config",
    "decoder": "model.decoder", "trust_remote_code": "train.trust_remote_code",
    "seq_kd": "distill.seq_kd", "on_policy_ratio": "distill.on_policy_ratio",
}

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _coerce(section: str, name: str, value: Any, kind: type) -> Any:
    where = f"{section}.{name}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a comma-separated list, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.field` on cfg, coercing the value to the field's type."""
    section, _, name = dotted.partition(".")
    types = _section_types()
    if section not in types or not name:
        raise ConfigError(f"unknown config key {dotted!r}; keys look like model.d_model "
                          f"(sections: {', '.join(types)})")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(types[section])
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(sub))
        raise ConfigError(f"unknown config key {dotted!r}; {section} has: {known}")
    setattr(sub, name, _coerce(section, name, value, hints[name]))


def apply_preset(cfg: Config, preset: str) -> None:
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    for section, values in PRESETS[preset].items():
        for name, value in values.items():
            set_value(cfg, f"{section}.{name}", value)
    cfg.model.preset = preset


def validate(cfg: Config) -> Config:
    """Check every field against its declared choices and range; raise one ConfigError listing the first bad one."""
    for section in SECTIONS:
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            value, meta = getattr(sub, f.name), f.metadata
            where = f"{section}.{f.name}"
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(meta['choices'])}")
            low, high = meta.get("low"), meta.get("high")
            if low is not None and isinstance(value, (int, float)) and not low <= value <= high:
                raise ConfigError(f"{where}: {value} is out of range; allowed {low} to {high}")
    if cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"model.n_heads: {cfg.model.n_heads} does not divide model.d_model={cfg.model.d_model}; "
                          "pick a head count that divides the width")
    bad = [d for d in cfg.data.directions if d not in DIRECTIONS]
    if bad or not cfg.data.directions:
        raise ConfigError(f"data.directions: {bad or 'empty'} not allowed; use a subset of {', '.join(DIRECTIONS)}")
    return cfg


def load_file(path: str | Path) -> dict:
    """Read a nested {section: {field: value}} mapping from JSON or YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # both parsers raise their own error types
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, ...), got {type(data).__name__}")
    return data


# Sections a run's config.json held once and that configure nothing now (deploy/ takes its own flags): skipped, so
# `--config RUN/config.json` (how scripts/convert_checkpoint.sh resumes) still takes an older run's file.
RETIRED_SECTIONS = ("deploy",)


def from_mapping(data: dict, cfg: Config | None = None, origin: str = "config") -> Config:
    """Apply a nested mapping on top of cfg (a preset named in it is applied first)."""
    cfg = cfg or Config()
    preset = (data.get("model") or {}).get("preset")
    if preset and preset != "custom":
        apply_preset(cfg, preset)
    for section, values in data.items():
        if section in RETIRED_SECTIONS:
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping")
        for name, value in values.items():
            set_value(cfg, f"{section}.{name}", value)
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config, every dotted field and the short aliases to parser (all defaulting to 'not given')."""
    parser.add_argument("--config", help="JSON or YAML file with sections model/data/distill/train; "
                        "applied after the preset, before the flags")
    reverse_alias = {v: k for k, v in ALIASES.items()}
    types = _section_types()
    for section, section_type in types.items():
        group = parser.add_argument_group(f"{section} options")
        for f in dataclasses.fields(section_type):
            dotted = f"{section}.{f.name}"
            names = [f"--{dotted}"] + ([f"--{reverse_alias[dotted]}"] if dotted in reverse_alias else [])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            extra = f" (one of: {', '.join(f.metadata['choices'])})" if f.metadata.get("choices") else ""
            if f.metadata.get("low") is not None:
                extra += f" (range {f.metadata['low']:g} to {f.metadata['high']:g})"
            switch = {"nargs": "?", "const": "true"} if isinstance(default, bool) else {}  # --seq_kd = --seq_kd true
            shown = str(default).lower() if switch else default
            if f.name in GPU_DEFAULTS.get(section, {}):
                shown = f"{shown}; on GPUs {GPU_DEFAULTS[section][f.name]}"
            group.add_argument(*names, dest=dotted, default=None, metavar="true|false" if switch else f.name.upper(),
                               help=f"{f.metadata['help']}{extra} [default: {shown}]", **switch)


def device_defaults(cfg: Config, on_gpu: bool) -> Config:
    """Apply GPU_DEFAULTS to cfg when the run has a GPU (the first layer above the field defaults)."""
    if on_gpu:
        for section, values in GPU_DEFAULTS.items():
            for name, value in values.items():
                set_value(cfg, f"{section}.{name}", value)
    return cfg


def from_args(args: argparse.Namespace, on_gpu: bool = False) -> Config:
    """Device defaults, preset, then --config file, then explicit flags; validated."""
    given = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    cfg = device_defaults(Config(), on_gpu)
    preset = given.get("model.preset")
    if getattr(args, "config", None) and not Path(args.config).is_file():
        raise ConfigError(f"--config {args.config}: no such file; expected a JSON or YAML file with sections "
                          "model, data, distill, train")
    file_data = load_file(args.config) if getattr(args, "config", None) else {}
    out = (file_data.get("train") or {}).get("out") if isinstance(file_data.get("train"), dict) else None
    if out is not None and (Path(str(out)).is_absolute() or ".." in Path(str(out)).parts):
        # a --config file may come from elsewhere: it must not point a run's writes outside this project
        # (a run's own saved config.json, read back by export, holds whatever --out the user gave)
        raise ConfigError(f"{args.config}: train.out {out!r} leaves the working folder; give a relative path "
                          "without '..', or pass --out on the command line if you mean it")
    if preset is None:
        preset = (file_data.get("model") or {}).get("preset", cfg.model.preset)
    if preset != "custom":
        apply_preset(cfg, preset)
    from_mapping({s: {k: v for k, v in vals.items() if k != "preset"} for s, vals in file_data.items()
                  if isinstance(vals, dict)} if file_data else {}, cfg, origin=str(args.config))
    for dotted, value in given.items():
        set_value(cfg, dotted, value)
    return validate(cfg)


def from_json_file(path: str | Path) -> Config:
    """Load a resolved config saved by a run (no preset re-applied: the file is complete)."""
    data = load_file(path)
    cfg = Config()
    for section, values in data.items():
        if section in SECTIONS:
            for name, value in values.items():
                set_value(cfg, f"{section}.{name}", value)
    return validate(cfg)


# ----------------------------------------------------------------------------- the run's command line

CHECKPOINT_TAG = re.compile(r"step\d+(_universal)?")


def parse_run_args(argv: list[str], description: str, has_gpu) -> tuple[argparse.Namespace, Config]:
    """train_ds.py's command line: the run's own flags, then every config field; has_gpu() says whether the GPU
    defaults apply (asked only once the flags parse: --help needs no DeepSpeed). A config problem exits with one
    line (the usage text would bury it)."""
    if argv and argv[0] == "export":  # `train_ds.py export --ckpt ... --out ...`
        argv = ["--stage", "export", *argv[1:]]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("distill", "sft", "export"), default="distill",
                        help="distill: train the student from the teacher; sft: fine-tune the teacher itself on "
                             "the corpus; export: consolidate --ckpt into a Hugging Face folder at --out")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from RUN/checkpoints: the latest checkpoint, or the tag given (e.g. step200)")
    parser.add_argument("--ckpt", help="export only: a checkpoints folder (RUN/checkpoints) to consolidate")
    parser.add_argument("--tag", help="export only: checkpoint tag (default: the latest)")
    parser.add_argument("--halt_at", type=int, default=0,
                        help="save a checkpoint and exit after this step, as a pre-empted job would "
                             "(time-boxed jobs; resume tests); the LR schedule still spans the whole run")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; do not pass")
    add_arguments(parser)
    args = parser.parse_args(argv)
    for flag, tag in (("--resume", args.resume), ("--tag", args.tag)):
        if tag not in (None, "latest") and not CHECKPOINT_TAG.fullmatch(tag):  # names a folder
            parser.error(f"{flag} {tag!r}: give a checkpoint tag such as step200 (or step200_universal, made by "
                         "scripts/convert_checkpoint.sh), or nothing for the latest")
    try:
        cfg = from_args(args, on_gpu=has_gpu())
    except ConfigError as exc:
        parser.exit(2, f"train_ds.py: {exc} (train_ds.py --help lists every flag)\n")
    return args, cfg


def check_run_paths(args: argparse.Namespace, cfg: Config) -> None:
    """Every path a run reads, checked before any process group, model or corpus loads (the mistakes newcomers make
    first), each failing with one line that names the flag, the value and what was expected."""
    import checkpoint
    import corpus
    import teacher
    if args.stage == "export":
        return checkpoint.check_export_source(args.ckpt)
    teacher.check_teacher_folder("--teacher", cfg.train.teacher, cfg.train.trust_remote_code)
    corpus.check_source("--data", cfg.data.path, ("valid",) if cfg.data.stream_window else ("train", "valid"))
    for flag, path in (("--ds_config", cfg.train.ds_config),
                       ("--train.teacher_ds_config", cfg.train.teacher_ds_config)):
        if path != "auto" and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file; expected a DeepSpeed JSON config such as "
                              "ds_configs/zero3.json")
    if args.resume:
        checkpoint.check_resume(Path(cfg.train.out) / "checkpoints", args.resume)
