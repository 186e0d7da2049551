"""Distil a Qwen teacher into a tiny zh<->en student with DeepSpeed ZeRO-3, teacher and student in one job.

    # fine-tune the teacher on the parallel corpus first (a stock Qwen is a poor translator of UI strings)
    deepspeed --num_gpus 4 train_ds.py --stage sft --teacher models/Qwen1.5-1.8B --data data/catalogs --out runs/sft
    # distil: the frozen teacher is sharded beside the student; its logits exist only per micro-batch
    deepspeed --num_gpus 4 train_ds.py --stage distill --teacher runs/sft/final --data data/catalogs \
        --preset balanced --out runs/distill
    # consolidate a checkpoint into a Hugging Face folder
    python train_ds.py export --ckpt runs/distill/checkpoints --out runs/distill/exported

With no GPU, `deepspeed --num_gpus 2` starts two CPU ranks (gloo). Outputs: RUN/config.json, RUN/train.log,
RUN/checkpoints/ (resume with --resume), RUN/tb/ (TensorBoard), RUN/best/ and RUN/final/ (student folders).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import config as config_lib
import corpus
import data
import seq_kd
import vocabulary
from kd_loss import LossParts, fused_distill_loss
from progress import Progress, quiet_unless_terminal

log = logging.getLogger("train_ds")


# ----------------------------------------------------------------------------- arguments

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, config_lib.Config]:
    if argv and argv[0] == "export":  # `train_ds.py export --ckpt ... --out ...`
        argv = ["--stage", "export", *argv[1:]]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    config_lib.add_arguments(parser)
    args = parser.parse_args(argv)
    for flag, tag in (("--resume", args.resume), ("--tag", args.tag)):
        if tag not in (None, "latest") and not re.fullmatch(r"step\d+(_universal)?", tag):  # names a folder
            parser.error(f"{flag} {tag!r}: give a checkpoint tag such as step200 (or step200_universal, made by "
                         "scripts/convert_checkpoint.sh), or nothing for the latest")
    try:
        cfg = config_lib.from_args(args, on_gpu=has_gpu())
    except config_lib.ConfigError as exc:  # one line: the usage text would bury it
        parser.exit(2, f"train_ds.py: {exc} (train_ds.py --help lists every flag)\n")
    return args, cfg


TEACHER_EXPECTED = ("a local Hugging Face causal-LM folder such as models/Qwen1.5-1.8B (config.json, tokenizer files, "
                    "*.safetensors weights); nothing is downloaded")


def check_teacher_folder(flag: str, path: str, trust_remote_code: bool) -> None:
    """One ConfigError line unless `path` is a folder transformers can load a causal LM and its tokenizer from."""
    folder = Path(path)
    if not folder.exists():
        raise config_lib.ConfigError(f"{flag} {path}: no such folder; expected {TEACHER_EXPECTED}")
    if not folder.is_dir():
        raise config_lib.ConfigError(f"{flag} {path}: a file, not a folder; expected {TEACHER_EXPECTED}")
    if not (folder / "config.json").is_file():
        raise config_lib.ConfigError(f"{flag} {path}: no config.json in this folder; expected {TEACHER_EXPECTED}")
    try:
        model_config = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise config_lib.ConfigError(f"{flag} {path}: config.json is not valid JSON ({exc})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_type = model_config.get("model_type")
    if model_type == "rk_student":
        raise config_lib.ConfigError(f"{flag} {path}: a distilled student (rk_student), not a teacher; give the Qwen "
                                     "folder it was distilled from (or the --stage sft output, RUN/final)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "auto_map" not in model_config:
        raise config_lib.ConfigError(f"{flag} {path}: a {model_type or 'untyped'} model, which transformers cannot load "
                                     "as a causal LM (AutoModelForCausalLM); expected a Qwen-family folder")
    if not any(next(folder.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json")):
        raise config_lib.ConfigError(f"{flag} {path}: no weights (*.safetensors) in this folder; expected "
                                     f"{TEACHER_EXPECTED}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise config_lib.ConfigError(f"{flag} {path}: no tokenizer files (tokenizer.json); copy the ones the model was "
                                     "published with into the folder")


def check_paths(args: argparse.Namespace, cfg: config_lib.Config) -> None:
    """Every path a run reads, checked before any process group, model or corpus loads (the mistakes newcomers make
    first), each failing with one line that names the flag, the value and what was expected."""
    if args.stage == "export":
        if not args.ckpt:
            raise config_lib.ConfigError("export: --ckpt RUN/checkpoints is required")
        if not (Path(args.ckpt).parent / "run.json").is_file():
            raise config_lib.ConfigError(f"--ckpt {args.ckpt}: not a run's checkpoints folder (no run.json beside it); "
                                         "give RUN/checkpoints of a train_ds.py run")
        return
    check_teacher_folder("--teacher", cfg.train.teacher, cfg.train.trust_remote_code)
    corpus.check_source("--data", cfg.data.path, ("valid",) if cfg.data.stream_window else ("train", "valid"))
    for flag, path in (("--ds_config", cfg.train.ds_config), ("--train.teacher_ds_config", cfg.train.teacher_ds_config)):
        if path != "auto" and not Path(path).is_file():
            raise config_lib.ConfigError(f"{flag} {path}: no such file; expected a DeepSpeed JSON config such as "
                                         "ds_configs/zero3.json")
    if args.resume:
        ckpt_dir = Path(cfg.train.out) / "checkpoints"
        tag = args.resume
        found = ((ckpt_dir / "latest").is_file() or (ckpt_dir / "latest_universal").is_file() if tag == "latest"
                 else (ckpt_dir / tag).is_dir())
        if not found:
            raise config_lib.ConfigError(f"--resume {tag}: no such checkpoint in {ckpt_dir}; drop --resume to start "
                                         "a new run, or give the --out of the run to continue")


def has_gpu() -> bool:
    """Whether this machine has an accelerator DeepSpeed drives (its GPU defaults then apply, see config.py)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() != "cpu"


# ----------------------------------------------------------------------------- distributed helpers

def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def mean_across_ranks(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def any_rank(flag: bool, device, group=None) -> bool:
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


def bind_device(accelerator, local_rank: int) -> torch.device:
    """This rank's device, bound before the process group starts. The deepspeed launcher shows every rank all the
    GPUs of its node and never calls set_device, so without this every rank would build its tensors on cuda:0 while
    ZeRO puts its partitions on each rank's own GPU (and NCCL refuses two ranks on one GPU). CPU: nothing to bind."""
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    accelerator.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


@dataclass(frozen=True)
class Processes:
    """This process's place in the job: rank, world size, its device, and a host-side (gloo) group for flags that
    live on the host, so that agreeing on them never waits for the GPU."""
    rank: int
    world: int
    device: torch.device
    on_gpu: bool
    host_group: object = None  # None: the default group is gloo already (CPU runs)


def start_processes() -> Processes:
    """Bind this rank's device, start the process group, and return where this process stands. Without a launcher
    (`python train_ds.py ...`) it runs as the only rank, on whatever device there is."""
    from deepspeed.accelerator import get_accelerator
    if not any(name in os.environ for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        # DeepSpeed would otherwise look for MPI (mpi4py) to find its ranks
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    accelerator = get_accelerator()
    device = bind_device(accelerator, int(os.environ.get("LOCAL_RANK", "0")))
    init_processes()
    on_gpu = device.type != "cpu"
    return Processes(dist.get_rank(), dist.get_world_size(), device, on_gpu,
                     dist.new_group(backend="gloo") if on_gpu else None)


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_processes() -> None:
    """deepspeed.init_distributed, then unlink this rank's /dev/shm all-reduce buffer name. On CPU, DeepSpeed maps
    one 66 MB file per rank there and never removes it, so each run would leave its files until reboot. Every rank
    has mapped every file once init returns on all ranks (the barrier), and a mapping outlives its name: the
    memory stays until the processes exit, crash included, and no name is left behind."""
    import deepspeed
    deepspeed.init_distributed()
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def setup_logging(out: Path) -> None:
    # DeepSpeed 0.19.8 calls collectives that torch 2.13 renamed, and torch warns on every call: one line per step
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    level = logging.INFO if is_main() else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out / "train.log"))
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers,
                        force=True)


def deepspeed_config(path: str, cfg: config_lib.Config, world: int, use_bf16: bool, trained: bool) -> dict:
    """The JSON file with batch sizes, clipping, precision and optimiser values filled from our config,
    so the JSON and the command line cannot disagree (DeepSpeed alone ignores "auto")."""
    ds = json.loads(Path(path).read_text())
    autos = [k for k, v in _walk(ds) if v == "auto"]
    if autos:
        raise config_lib.ConfigError(f"{path}: 'auto' at {', '.join(autos)}; DeepSpeed ignores it outside the "
                                     "Hugging Face Trainer, write integers")
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum if trained else 1
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    ds["bf16"] = {"enabled": use_bf16}
    ds.pop("fp16", None)
    if trained:
        ds["gradient_clipping"] = cfg.train.grad_clip
        if "optimizer" in ds:
            ds["optimizer"]["params"].update(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return ds


def _walk(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, tree


def lr_lambda(cfg: config_lib.TrainConfig, total_steps: int):
    """Linear warm-up to lr, then cosine decay to min_lr_ratio * lr at total_steps."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_engine(model, ds: dict, cfg: config_lib.Config, total_steps: int):
    """A trained model's DeepSpeed engine: AdamW and warm-up + cosine, from the JSON or from torch.

    Under `accelerate launch` the engine comes from accelerator.prepare (the frozen teacher keeps its own
    deepspeed.initialize in build_models); with DeepSpeed, accelerate returns the DeepSpeedEngine itself."""
    import deepspeed
    optimizer = None
    if "optimizer" not in ds:  # DeepSpeed's own AdamW is CUDA/CPU-Adam specific; torch's runs everywhere
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(0.9, 0.98), eps=1e-8,
                                      weight_decay=cfg.train.weight_decay)
    scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train, total_steps)))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":  # not `accelerate launch`
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        return engine
    # `accelerate launch --config_file ds_configs/accelerate_zero3.yaml`: the same engine, made by accelerate
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs
    named = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if named and Path(named).resolve() != Path(cfg.train.ds_config).resolve():
        raise config_lib.ConfigError(f"the accelerate config's deepspeed_config_file {named} is not --ds_config "
                                     f"{cfg.train.ds_config}; drop it from the YAML and pass --ds_config")
    # main's deepspeed.init_distributed made the process group; naming its backend lets accelerate count its
    # ranks (with no backend on CPU it counts one: "No backend == no distributed training", accelerate/state.py)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                              gradient_accumulation_steps=ds["gradient_accumulation_steps"],
                              kwargs_handlers=[InitProcessGroupKwargs(backend=dist.get_backend())])
    if optimizer is None:  # the JSON's optimizer: DeepSpeed builds it and calls our scheduler on it, as above
        optimizer = DummyOptim(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        lr_scheduler = DummyScheduler(optimizer, lr_scheduler_callable=scheduler)
    else:
        lr_scheduler = scheduler(optimizer)
    engine, _, _ = accelerator.prepare(model, optimizer, lr_scheduler)  # the model comes back as the engine
    if engine.lr_scheduler is None:
        # accelerate hands DeepSpeed only DeepSpeed's own scheduler types and leaves LambdaLR to the caller;
        # given to the engine, engine.step() steps it and checkpoints hold it, as with deepspeed.initialize
        if engine.basic_optimizer is not optimizer:  # accelerate swapped in DeepSpeed's CPU Adam (offload)
            raise config_lib.ConfigError(f"{cfg.train.ds_config}: an offloaded optimizer needs an \"optimizer\" "
                                         "section in the JSON (see ds_configs/zero3_offload.json)")
        engine.lr_scheduler = lr_scheduler
    log.info("trained model's engine made by accelerate.prepare (%s, %d processes)", accelerator.distributed_type,
             accelerator.num_processes)
    return engine


# ----------------------------------------------------------------------------- the teacher

def load_teacher(path: str, ds: dict, dtype: torch.dtype, trust_remote_code: bool):
    """A Hugging Face causal LM, partitioned as it loads when ds is a ZeRO-3 config.

    Returns (model, hf_ds_config); keep the second alive as long as the model: transformers reads it
    through a weak reference to decide on ZeRO-3 behaviour (e.g. generate's synced_gpus).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841 -- must exist while from_pretrained runs
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, hf_ds


def split_teacher_head(model, kept_ids: list[int], path: str):
    """The frozen teacher's body (embeddings, layers, final norm) and its output-layer rows for the student's
    kept ids, as a plain tensor [K, H] on every rank: teacher logits are then only ever built inside the
    fused loss, for the K kept ids at target positions, and the loss's chunks need no collective."""
    import deepspeed
    head = model.get_output_embeddings()
    with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
        rows = head.weight.shape[0]
        if max(kept_ids) >= rows:
            raise vocabulary.VocabMismatchError(
                f"{path}: output layer has {rows} rows but the vocabulary map needs id {max(kept_ids)}; "
                "the student vocabulary was built from a different tokenizer")
        kept = head.weight.data[torch.tensor(kept_ids)].clone()
    body = model.base_model
    body.requires_grad_(False)
    return body, kept


def teacher_parameters(teacher_config, trust_remote_code: bool) -> int:
    """Parameter count of the teacher, from its config alone (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(teacher_config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def free_memory_per_rank(on_gpu: bool) -> int:
    if on_gpu:
        return torch.cuda.mem_get_info()[0]
    import psutil
    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def place_teacher(requested: str, parameters: int, dtype: torch.dtype, world: int,
                  free_bytes: int) -> tuple[str, str]:
    """Where the frozen teacher's weights live, and why (with the sizes that decided it).

    resident: a plain module, whole on every rank's device (no ZeRO engine: no all-gather and no per-module hook
    on any forward); sharded: ZeRO-3 partitions gathered layer by layer each forward; offload: partitions in CPU
    memory. auto keeps 40% of free memory for the student and activations.
    """
    weight_bytes = parameters * torch.finfo(dtype).bits // 8
    budget = int(0.6 * free_bytes)
    gib = 2 ** 30
    sizes = (f"teacher {weight_bytes / gib:.2f} GiB ({parameters / 1e6:.1f}M parameters), "
             f"{free_bytes / gib:.1f} GiB free per rank")
    if requested != "auto":
        return requested, f"as asked (--distill.teacher_placement) ({sizes})"
    if weight_bytes <= budget:
        return "resident", f"a whole copy fits beside the student ({sizes})"
    if weight_bytes / world <= budget:
        return "sharded", f"a whole copy does not fit; a 1/{world} shard does ({sizes})"
    return "offload", f"even a 1/{world} shard does not fit ({sizes})"


def teacher_zero3_config(ds: dict, placement: str, hidden: int) -> dict:
    """The sharded or offloaded teacher's ZeRO-3 config, its buckets scaled to the teacher's width as Hugging Face
    and TRL do for "auto" (a fixed bucket sized for one width is smaller than one MLP matrix of a wider model)."""
    zero = ds["zero_optimization"]
    zero.update(reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                stage3_param_persistence_threshold=10 * hidden)
    if placement == "offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return ds


def load_frozen_teacher(cfg: config_lib.Config, prepared: "RunData", placement: str, dtype: torch.dtype,
                        device: torch.device, world: int, use_bf16: bool):
    """(teacher body, its output rows for the kept ids [K, H] on device, hf_ds to keep alive or None).

    Resident: a plain module loaded straight onto this rank's device. Otherwise: partitioned while it loads, inside
    a ZeRO-3 engine of its own (a frozen model next to a trained one needs its own; see REFERENCE)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    path, trust = cfg.train.teacher, cfg.train.trust_remote_code
    if placement == "resident":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust,
                                                     device_map={"": str(device)})
        body, rows = split_teacher_head(model, prepared.vocab.teacher_ids, path)
        return body.eval(), rows.to(device), None
    ds = deepspeed_config(cfg.train.teacher_ds_config, cfg, world, use_bf16, trained=False)
    teacher_zero3_config(ds, placement, prepared.teacher_config.hidden_size)
    model, hf_ds = load_teacher(path, ds, dtype, trust)
    body, rows = split_teacher_head(model, prepared.vocab.teacher_ids, path)
    engine, *_ = deepspeed.initialize(model=body, config=ds)
    engine.module.eval()
    return engine, rows.to(device), hf_ds


def teacher_logits(teacher, batch: dict, target_len: int) -> torch.Tensor:
    """Logits [B, T, V] of the whole causal LM at the T target positions only (sft: the trained teacher)."""
    out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                  position_ids=batch["teacher_position_ids"], logits_to_keep=target_len, use_cache=False)
    return out.logits


def teacher_hidden(teacher_body, batch: dict, target_len: int) -> torch.Tensor:
    """The frozen teacher's final hidden states [B, T, H] at the T target positions (see
    data.ExampleBuilder.collate)."""
    out = teacher_body(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                       position_ids=batch["teacher_position_ids"], use_cache=False)
    return out.last_hidden_state[:, -target_len:]


# ----------------------------------------------------------------------------- steps

class StepTimer:
    """Time spent in each region (teacher, student) of a step. On a GPU each region is a pair of device events,
    read only when the log is flushed, so timing adds no host sync per step and the teacher's kernels count as
    teacher time however late they run; on CPU, where work is synchronous, the wall clock."""

    def __init__(self, accelerator, on_gpu: bool):
        self.accelerator, self.on_gpu = accelerator, on_gpu
        self.seconds = {"teacher": 0.0, "student": 0.0}
        self.events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def region(self, name: str):
        if self.on_gpu:
            start, end = (self.accelerator.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - began

    def ms(self) -> dict[str, float]:
        """Milliseconds per region; on a GPU this waits for the recorded events (call it when flushing)."""
        for name, start, end in self.events:
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1000
        self.events.clear()
        return {name: 1000 * seconds for name, seconds in self.seconds.items()}


def to_device(batch: dict, device) -> dict:
    """Long tensors on device. On a GPU they go through pinned memory without blocking: a copy from pageable
    memory would first wait for every kernel queued before it."""
    tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    if torch.device(device).type == "cpu":
        return tensors
    return {k: t.pin_memory().to(device, non_blocking=True) for k, t in tensors.items()}


def batch_counts(batch: dict) -> tuple[int, int, int, int]:
    """Target, source, teacher and padded tokens of a collated batch, counted on the host lists (no sync)."""
    return (len(batch["target_positions"]), sum(map(sum, batch["source_mask"])),
            sum(map(sum, batch["teacher_attention_mask"])),
            len(batch["labels"]) * len(batch["labels"][0]) + len(batch["source_ids"]) * len(batch["source_ids"][0]))


def distill_step(student, teacher, teacher_rows: torch.Tensor, batch: dict, cfg: config_lib.DistillConfig,
                 timer: StepTimer) -> LossParts:
    labels = batch["labels"]
    with timer.region("teacher"), torch.no_grad():  # never inference_mode: its tensors cannot meet ZeRO-3's model
        hidden = teacher_hidden(teacher, batch, labels.shape[1])
    with timer.region("student"):
        out = student(source_ids=batch["source_ids"], source_mask=batch["source_mask"], direction=batch["direction"],
                      decoder_input_ids=batch["decoder_input_ids"],
                      output_loss=lambda s_hidden, s_weight: fused_distill_loss(
                          s_hidden, s_weight, hidden, teacher_rows, labels, cfg, batch["target_positions"]))
    return out.loss_parts


def sft_step(teacher, batch: dict, timer: StepTimer) -> LossParts:
    """Causal-LM loss on the assistant turn (the target) only."""
    with timer.region("teacher"):
        labels = batch["teacher_labels"]
        positions = batch["target_positions"]
        logits = teacher_logits(teacher, batch, labels.shape[1]).float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).index_select(0, positions),
                                               labels.flatten().index_select(0, positions), reduction="sum")
        ce = ce / max(len(positions), 1)
    return LossParts(ce, ce.new_zeros(()), ce.detach(), len(positions))


# ----------------------------------------------------------------------------- on-policy KD (seq_kd.py says why)

def model_bytes(module) -> int:
    """Bytes of a module's whole weights, also when ZeRO-3 has partitioned them (ds_numel is the full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def whole_model(engine, allowed: bool = True):
    """The trained model's ZeRO-3 parameters gathered whole on every rank, with ZeRO-3's per-module hooks lifted,
    for a decoding loop: otherwise every decoding step all-gathers every layer again (as TRL's
    unwrap_model_for_generation does). The hooks come back on exit and the parameters are partitioned again.

    Yields True when the model is whole and hook-free (each rank may then decode alone, without lockstep), False
    when it stays partitioned: allowed=False (it would not fit whole), or a DeepSpeed lacking these internals.
    Below ZeRO-3 the model is whole already."""
    import deepspeed
    if engine.zero_optimization_stage() != 3:
        yield True
        return
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if not allowed or offload is None or not hasattr(offload, "_register_deepspeed_module"):
        yield False
        return
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for param in params:
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield True
        finally:
            offload._register_deepspeed_module(offload.module)


def on_policy_loss(models: "Models", examples: list, builder: data.ExampleBuilder, cfg: config_lib.DistillConfig,
                   device, timer: StepTimer) -> tuple[LossParts, dict]:
    """alpha * T^2 * D(teacher, student) on the student's own samples + (1 - alpha) * CE on the reference, in one
    student forward over [samples; references] (one forward and backward per micro-batch, as on other steps).
    Returns the loss and the host lists of the batch it trained on (for counting its tokens)."""
    engine = models.engine
    reference = to_device(builder.collate(examples), device)
    with timer.region("student"):
        engine.module.eval()  # sample from the student's distribution, not a dropout-perturbed one
        with whole_model(engine) as whole, torch.no_grad():
            samples = engine.module.generate(reference["source_ids"], reference["source_mask"],
                                             reference["direction"], all_done=None if whole else lockstep(device),
                                             temperature=1.0)
        engine.module.train()
    ended = [builder.eos_teacher_id]  # a sample shorter than the limit ended with the end token
    sampled = [dataclasses.replace(e, target_ids=[builder.vocab.teacher_ids[t] for t in ids] +
                                   (ended if len(ids) < builder.max_target_len else []))
               for e, ids in zip(examples, samples)]
    with timer.region("teacher"):
        scored = to_device(builder.collate(sampled), device)
        with torch.no_grad():
            hidden = teacher_hidden(models.teacher, scored, scored["labels"].shape[1])
    with timer.region("student"):
        host = builder.collate(sampled + list(examples))
        both = to_device(host, device)
        labels, n = both["labels"], len(examples)
        kd_labels, ce_labels = labels.clone(), labels.clone()
        kd_labels[n:], ce_labels[:n] = data.IGNORE_INDEX, data.IGNORE_INDEX
        teacher_full = hidden.new_zeros(labels.shape + hidden.shape[-1:])
        teacher_full[:n, :hidden.shape[1]] = hidden
        no_teacher = hidden.new_zeros(labels.shape + (1,))  # the CE part: a teacher term weighted 0
        no_rows = models.teacher_rows.new_zeros(models.teacher_rows.shape[0], 1)
        kd_cfg, ce_cfg = dataclasses.replace(cfg, alpha=1.0), dataclasses.replace(cfg, alpha=0.0)

        def output_loss(s_hidden, s_weight):
            kd = fused_distill_loss(s_hidden, s_weight, teacher_full, models.teacher_rows, kd_labels, kd_cfg)
            ce = fused_distill_loss(s_hidden, s_weight, no_teacher, no_rows, ce_labels, ce_cfg)
            return LossParts(cfg.alpha * kd.total + (1 - cfg.alpha) * ce.total, kd.kd, ce.ce, kd.tokens + ce.tokens)

        out = engine(source_ids=both["source_ids"], source_mask=both["source_mask"], direction=both["direction"],
                     decoder_input_ids=both["decoder_input_ids"], output_loss=output_loss)
    return out.loss_parts, host


def lockstep(device):
    """all_done for a decoding loop whose every step is a collective (ZeRO-3 hooks): done when every rank is."""
    return lambda done: not any_rank(not done, device)


# ----------------------------------------------------------------------------- evaluation

def translate_shard(stage: str, model, builder: data.ExampleBuilder, examples: list, device, batch_size: int,
                    whole: bool) -> list[str]:
    """Greedy translations of this rank's examples. whole: the model is hook-free on every rank (see whole_model),
    so each rank decodes alone; otherwise every rank runs the same number of forward passes."""
    from inference.translator import teacher_generate
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))  # batches that pad little
    outputs: list[str] = [""] * len(examples)
    for start in range(0, len(examples), batch_size):
        picked = order[start:start + batch_size]
        chunk = [examples[i] for i in picked]
        batch = to_device(builder.collate(chunk), device)
        if stage == "distill":
            ids = model.generate(batch["source_ids"], batch["source_mask"], batch["direction"],
                                 all_done=None if whole else lockstep(device))
            texts = [builder.decode(row) for row in ids]
        else:
            texts = teacher_generate(model, builder.tokenizer, [ex.prompt_ids for ex in chunk],
                                     builder.max_target_len, device, synced_gpus=not whole)
        for i, text in zip(picked, texts):
            outputs[i] = text
    return outputs


def evaluate(stage: str, models: "Models", builder, valid_examples: list, cfg: config_lib.Config, device,
             on_gpu: bool) -> dict:
    """Validation loss over the subset, then greedy BLEU/chrF per direction, computed once on rank 0. Decoding runs
    on the whole, hook-free model when it fits (a student always does; a trained teacher when its weights take at
    most half of the free memory), else through ZeRO-3's hooks, in lockstep."""
    from inference.metrics import score
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = models.engine
    engine.eval()
    timer = StepTimer(None, False)
    losses = []
    with torch.no_grad():
        # small enough that every rank gets a batch even from a small validation subset
        size = max(1, min(cfg.train.micro_batch_size, len(valid_examples) // world))
        for indices in data.make_batches(valid_examples, size, 0, 0, 0, world)[rank::world]:
            batch = to_device(builder.collate([valid_examples[i] for i in indices]), device)
            parts = step_loss(stage, models, batch, cfg, timer)
            losses.append(torch.stack([parts.total, parts.kd, parts.ce]).double())
        mean = torch.stack(losses).mean(0).tolist() if losses else [0.0, 0.0, 0.0]
        loss, kd, ce = mean_across_ranks(mean, device)
        # an equal share per rank (the last rank pads by repeating) keeps every rank's generate in step
        share = math.ceil(len(valid_examples) / world)
        mine = (valid_examples[rank * share:(rank + 1) * share] or valid_examples[:1])
        mine = mine + [mine[-1]] * (share - len(mine))
        fits = stage == "distill" or model_bytes(engine.module) <= 0.5 * free_memory_per_rank(on_gpu)
        with whole_model(engine, allowed=fits) as whole:
            hyps = translate_shard(stage, engine.module, builder, mine, device, cfg.train.micro_batch_size, whole)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, hyps)
    result = {"loss": loss, "kd": kd, "ce": ce}
    if rank == 0:
        flat = [h for part in gathered for h in part][:len(valid_examples)]
        per_direction = {}
        for direction in cfg.data.directions:
            d = data.direction_index(direction)
            pick = [i for i, ex in enumerate(valid_examples) if ex.direction == d]
            per_direction[direction] = score([flat[i] for i in pick], [valid_examples[i].reference for i in pick],
                                             direction.split("-")[1])
        result["directions"] = per_direction
        result["bleu"] = sum(s["bleu"] for s in per_direction.values()) / len(per_direction)
        result["chrf"] = sum(s["chrf"] for s in per_direction.values()) / len(per_direction)
        result["examples"] = [(ex.source_text, hyp, ex.reference) for ex, hyp in zip(valid_examples[:5], flat)]
    box = [result]
    dist.broadcast_object_list(box, src=0)
    engine.train()
    return box[0]


# ----------------------------------------------------------------------------- saving

def save_folder(stage: str, state_dict: dict, cfg: config_lib.Config, run: Path, out: Path, metrics: dict) -> None:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer, vocab map, run config).

    The weights go straight to safetensors: building a model here would, for the teacher, start a ZeRO-3
    partitioned init (a collective) on rank 0 alone while the other ranks wait elsewhere.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    import model  # noqa: F401 -- registers the student's config class with AutoConfig
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_config = AutoConfig.from_pretrained(run / ("student_config" if stage == "distill" else "teacher_config"))
    if stage == "distill":  # ONNX export and the board start from float32, whatever precision trained it
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    else:  # the fine-tuned teacher keeps its training precision, and its config says which
        model_config.dtype = next(v.dtype for v in state_dict.values() if v.is_floating_point())
        if getattr(model_config, "tie_word_embeddings", False):
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    model_config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(run / "tokenizer").save_pretrained(tmp)
    if stage == "distill":
        shutil.copy(run / vocabulary.VocabMap.FILE, tmp / vocabulary.VocabMap.FILE)
    elif (run / "teacher_config" / "generation_config.json").is_file():
        shutil.copy(run / "teacher_config" / "generation_config.json", tmp / "generation_config.json")
    cfg.save(tmp / "training_config.json")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    if stage == "distill":  # a model card, so the folder can be pushed to a model hub as it is
        from inference.model_card import write_model_card
        write_model_card(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def consolidated_state(engine) -> dict:
    """Full weights gathered from every rank's shards (all ranks must call it); rank 0 gets them all. Below
    ZeRO-3 (ds_configs/zero2.json) every rank already holds them whole."""
    state = (engine._consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3
             else engine.module.state_dict())
    return {k: v.detach().cpu().clone() for k, v in state.items()} if is_main() else {}


PARTIAL = ".partial"  # suffix of a checkpoint folder still being written


def saved_client_state(folder: Path) -> dict:
    """A checkpoint's client state (step, total_steps, ...) before any engine exists: the first model-states file,
    memory-mapped (under ZeRO-3 it holds shapes and buffers, not weights); {} when there is none."""
    files = sorted(folder.glob("*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True) if files else {}


def publish_checkpoint(folder: Path, tag: str) -> None:
    """Rename folder/<tag>.partial to folder/<tag>, then point `latest` at it (atomically, fsynced)."""
    final = folder / tag
    shutil.rmtree(final, ignore_errors=True)  # a step saved again after a resume
    os.replace(folder / (tag + PARTIAL), final)
    pointer = folder / "latest.tmp"
    with pointer.open("w") as handle:
        handle.write(tag)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer, folder / "latest")


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and any partial folder a crash left."""
    for partial in folder.glob("step*" + PARTIAL):
        shutil.rmtree(partial, ignore_errors=True)
    tags = sorted((p for p in folder.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                  key=lambda p: int(p.name[4:]))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


FAULT_ENV = "RK_DISTILL_FAULT"


def fault(point: str, step: int) -> bool:
    """Fault injection for tests/test_faults.py. $RK_DISTILL_FAULT holds comma-separated `ACTION:POINT@STEP`
    items, e.g. `SIGKILL:in_save@6` (the process signals itself there: SIGKILL runs no handler, as when a node
    dies) or `nan:loss@3` (returns True: the caller poisons its loss). Points: in_step, in_save, loss."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        action, _, where = item.rpartition(":")
        if where == f"{point}@{step}":
            if action.startswith("SIG"):
                os.kill(os.getpid(), signal.Signals[action])
            return True
    return False


# ----------------------------------------------------------------------------- export stage

def export_checkpoint(args: argparse.Namespace, cfg: config_lib.Config) -> None:
    """Consolidate ZeRO shards offline (one process, no GPU) into a Hugging Face folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = Path(args.ckpt)  # checked by check_paths
    run = ckpt.parent
    stage = json.loads((run / "run.json").read_text())["stage"]
    saved = config_lib.from_json_file(run / "config.json")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=args.tag)
    out = Path(cfg.train.out)
    save_folder(stage, state, saved, run, out, {"exported_from": str(ckpt), "tag": args.tag or "latest"})
    print(f"exported {stage} model to {out}")


@dataclass
class RunData:
    """The tokenizer, trimmed vocabulary and aligned examples of a run, and the schedule they give."""
    tokenizer: object
    teacher_config: object
    vocab: vocabulary.VocabMap
    builder: data.ExampleBuilder
    train_examples: list
    valid_examples: list
    batches_per_epoch: int
    total_steps: int
    stream: data.ExampleStream | None = None  # --data.stream_window: train examples read window by window


STREAM_VOCAB_ROWS = 200_000  # rows of a streamed corpus counted for the student's vocabulary


def prepare_data(stage: str, cfg: config_lib.Config, run: Path, world: int) -> RunData:
    """Teacher tokenizer, the student's vocabulary (reused from RUN when resuming), aligned examples."""
    from transformers import AutoConfig, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.train.teacher, trust_remote_code=cfg.train.trust_remote_code)
    teacher_config = AutoConfig.from_pretrained(cfg.train.teacher, trust_remote_code=cfg.train.trust_remote_code)
    if len(tokenizer) > teacher_config.vocab_size:  # padded is normal (Qwen: 151,643 ids, 151,936 rows); short is not
        raise vocabulary.VocabMismatchError(
            f"{cfg.train.teacher}: the tokenizer has {len(tokenizer)} ids but the model has only "
            f"{teacher_config.vocab_size} output rows; the tokenizer files belong to another model: use the ones "
            "saved with this checkpoint")
    streaming = cfg.data.stream_window > 0
    if streaming and (not cfg.train.max_steps or cfg.distill.seq_kd):
        raise config_lib.ConfigError("--data.stream_window needs --max_steps (a stream has no epoch length "
                                     "known in advance) and --seq_kd false (seq_kd translates every scheduled "
                                     "example before step 1, which a stream exists to avoid)")
    try:  # every problem in the splits is listed before step 1, not the first one at hour 30
        splits = corpus.load_splits(cfg.data.path, ("valid",) if streaming else ("train", "valid"),
                                    cfg.data.on_bad_line, cfg.data.max_chars)
        train_pairs = (corpus.arrow_sample(cfg.data.path, STREAM_VOCAB_ROWS, cfg.data.max_chars) if streaming
                       else splits["train"].pairs)
    except corpus.CorpusError as exc:
        raise SystemExit(f"train_ds.py: {exc}") from None
    valid_pairs = splits["valid"].pairs[:cfg.data.valid_subset]
    if stage == "distill":
        if (run / vocabulary.VocabMap.FILE).is_file():
            vocab = vocabulary.VocabMap.load(run)
            vocab.check_tokenizer(tokenizer, f"teacher {cfg.train.teacher}")
        else:
            texts = [p.zh for p in train_pairs] + [p.en for p in train_pairs]
            vocab = vocabulary.build_vocab_map(tokenizer, texts, cfg.data.vocab_size, teacher_config.vocab_size)
    else:
        vocab = vocabulary.VocabMap.full(tokenizer, teacher_config.vocab_size)
    builder = data.ExampleBuilder(tokenizer, vocab, cfg.model.max_source_len, cfg.model.max_target_len)
    if streaming:
        stream = data.ExampleStream(cfg.data.path, builder, cfg.data.directions, cfg.data.stream_window,
                                    cfg.train.micro_batch_size, cfg.data.tokens_per_batch, cfg.train.seed, world,
                                    dist.get_rank(), cfg.data.on_bad_line, cfg.data.max_chars)
        log.info("data: streaming %d train rows in windows of %d; vocabulary from the first %d rows",
                 len(stream), cfg.data.stream_window, len(train_pairs))
        valid_examples, _ = builder.examples(valid_pairs, cfg.data.directions)
        return RunData(tokenizer, teacher_config, vocab, builder, [], valid_examples, 0, cfg.train.max_steps, stream)
    train_examples, dropped = builder.examples(train_pairs, cfg.data.directions)
    valid_examples, _ = builder.examples(valid_pairs, cfg.data.directions)
    log.info("data: %d train pairs -> %d examples (%d too long for the model), %d validation examples; "
             "vocabulary %d of the teacher's %d ids", len(train_pairs), len(train_examples), dropped,
             len(valid_examples), vocab.size, teacher_config.vocab_size)
    batches_per_epoch = len(data.make_batches(train_examples, cfg.train.micro_batch_size, cfg.data.tokens_per_batch,
                                              cfg.train.seed, 0, world)) // world
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    return RunData(tokenizer, teacher_config, vocab, builder, train_examples, valid_examples, batches_per_epoch,
                   total_steps)


@dataclass
class Models:
    """The trained model's engine and, when distilling, the frozen teacher's body and output rows."""
    engine: object
    teacher: object = None                     # distill: a plain module (resident) or a ZeRO-3 engine (sharded)
    teacher_rows: torch.Tensor | None = None   # distill: teacher output rows for the student's ids [K, H]
    hf_ds: object = None                       # keeps transformers' ZeRO-3 view alive (see load_teacher)
    flops: "StepFlops | None" = None
    teacher_whole: bool = False                # the teacher is a plain module: it decodes with no collective


def resolve_ds_config(cfg: config_lib.Config, stage: str, on_gpu: bool) -> str:
    """train.ds_config auto: ZeRO-3 for a trained teacher (sft) and on CPU (the tested default); ZeRO-2 for a student
    distilled on GPUs, where ZeRO-3 would all-gather each of its ~100 small tensors every micro-batch."""
    if cfg.train.ds_config != "auto":
        return cfg.train.ds_config
    return "ds_configs/zero2.json" if stage == "distill" and on_gpu else "ds_configs/zero3.json"


def build_models(stage: str, cfg: config_lib.Config, prepared: RunData, run: Path, world: int, use_bf16: bool,
                 on_gpu: bool, device, load_universal: bool = False) -> Models:
    """load_universal: the checkpoint to resume is a universal one (any number of ranks can load it)."""
    from model import StudentConfig, StudentForTranslation
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    trained_ds = deepspeed_config(cfg.train.ds_config, cfg, world, use_bf16, trained=True)
    if load_universal:
        trained_ds["checkpoint"] = {**trained_ds.get("checkpoint", {}), "load_universal": True}
    if stage == "sft":
        teacher, hf_ds = load_teacher(cfg.train.teacher, trained_ds, dtype, cfg.train.trust_remote_code)
        return Models(build_engine(teacher, trained_ds, cfg, prepared.total_steps), hf_ds=hf_ds)

    parameters = teacher_parameters(prepared.teacher_config, cfg.train.trust_remote_code)
    placement, why = place_teacher(cfg.distill.teacher_placement, parameters, dtype, world,
                                   free_memory_per_rank(on_gpu))
    teacher, rows, hf_ds = load_frozen_teacher(cfg, prepared, placement, dtype, device, world, use_bf16)
    log.info("teacher placement: %s: %s; %s", placement, why,
             f"a plain {str(dtype).removeprefix('torch.')} module on {device} (no ZeRO engine, no hooks): seq-KD "
             "and scoring run it directly, each rank alone" if placement == "resident" else
             f"a ZeRO-3 engine, buckets scaled to width {prepared.teacher_config.hidden_size}: every forward "
             "gathers its layers through ZeRO-3's hooks, so seq-KD decodes with all ranks in lockstep")
    torch.manual_seed(cfg.train.seed)  # identical initial student on every rank
    builder = prepared.builder
    student_cfg = StudentConfig.from_model_config(cfg.model, prepared.vocab.size, builder.pad_id, builder.bos_id,
                                                  builder.eos_id)
    if is_main():
        student_cfg.save_pretrained(run / "student_config")
    student = StudentForTranslation(student_cfg)
    flops = StepFlops.of(prepared.teacher_config, parameters, student, prepared.vocab.size)
    engine = build_engine(student, trained_ds, cfg, prepared.total_steps)
    log.info("student: %s preset, %s decoder, %.2fM parameters, %s; teacher: %s", cfg.model.preset,
             cfg.model.decoder, flops.student_parameters / 1e6, cfg.train.ds_config, cfg.train.teacher)
    return Models(engine, teacher, rows, hf_ds, flops, teacher_whole=placement == "resident")


def step_loss(stage: str, models: Models, batch: dict, cfg: config_lib.Config, timer: StepTimer) -> LossParts:
    if stage == "distill":
        return distill_step(models.engine, models.teacher, models.teacher_rows, batch, cfg.distill, timer)
    return sft_step(models.engine, batch, timer)


# ----------------------------------------------------------------------------- throughput

# Dense bf16 peak per GPU (vendor data sheets, no sparsity), by a part of torch.cuda.get_device_name(). The first
# match wins, so a variant with another peak comes before the name it contains ("H100 PCIe" before "H100", "H200"
# before "H20", "A100" before "A10"; an SXM H100 reports "NVIDIA H100 80GB HBM3", a GH200 matches "H200"). None:
# a card whose peak we do not know for sure, so no MFU is shown for it rather than a wrong one.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
                   ("L40S", 362e12), ("L40", 181e12), ("L20", 119e12), ("A10G", None), ("A10", 125e12),
                   ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 6000 Ada", 364e12), ("A6000", 155e12))


@dataclass
class StepFlops:
    """Model FLOPs of one distillation micro-batch, from parameter counts (attention's T^2 terms are left
    out: sequences here are short). Teacher: forward only; student: forward and backward (x3)."""
    teacher_per_token: float        # 2 x teacher parameters outside its embedding and output layer
    teacher_head_per_target: float  # 2 x K x teacher width: the kept rows, at target positions
    student_per_source: float       # 6 x encoder parameters
    student_per_target: float       # 6 x (decoder parameters + the K x width output layer)
    student_parameters: int

    @classmethod
    def of(cls, teacher_config, teacher_parameters: int, student, kept: int) -> "StepFlops":
        width = teacher_config.hidden_size
        embeddings = teacher_config.vocab_size * width * (1 if teacher_config.tie_word_embeddings else 2)
        encoder = sum(p.numel() for name, p in student.named_parameters() if name.startswith("encoder"))
        decoder = sum(p.numel() for name, p in student.named_parameters() if name.startswith("decoder"))
        out_layer = student.config.vocab_size * student.config.d_model
        return cls(2.0 * (teacher_parameters - embeddings), 2.0 * kept * width, 6.0 * encoder,
                   6.0 * (decoder + out_layer), sum(p.numel() for p in student.parameters()))

    def __call__(self, teacher_tokens: float, source_tokens: float, target_tokens: float) -> float:
        return (self.teacher_per_token * teacher_tokens + self.teacher_head_per_target * target_tokens
                + self.student_per_source * source_tokens + self.student_per_target * target_tokens)


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of the GPU named so (torch.cuda.get_device_name), for MFU; None on CPU (no name) or for a
    card not in PEAK_BF16_FLOPS: no MFU rather than a wrong one."""
    if not device_name:
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


def gpu_name(on_gpu: bool) -> str | None:
    return torch.cuda.get_device_name() if on_gpu else None


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    quiet_unless_terminal()
    args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    check_paths(args, cfg)
    if args.stage == "export":
        return export_checkpoint(args, cfg)

    from deepspeed.accelerator import get_accelerator
    from torch.utils.tensorboard import SummaryWriter

    # ---- set-up: processes, run folder, logging
    procs = start_processes()
    rank, world, device, on_gpu = procs.rank, procs.world, procs.device, procs.on_gpu
    accelerator = get_accelerator()
    use_bf16 = cfg.train.bf16 == "on" or (cfg.train.bf16 == "auto" and on_gpu and accelerator.is_bf16_supported())
    cfg.train.ds_config = resolve_ds_config(cfg, args.stage, on_gpu)
    run = Path(cfg.train.out)
    ckpt_dir = run / "checkpoints"
    setup_logging(run)
    log.info("stage %s | %d rank(s) on %s | bf16 %s | run %s", args.stage, world, device, use_bf16, run)
    if is_main():
        if (run / "config.json").is_file() and args.resume:
            saved = json.loads((run / "config.json").read_text())
            defaults = config_lib.Config().to_dict()  # a field newer than the run's config.json: its default
            changed = [f"{s}.{k}" for s, v in cfg.to_dict().items() for k, x in v.items()
                       if s in ("model", "data", "distill") and saved.get(s, {}).get(k, defaults[s][k]) != x]
            if changed:
                raise SystemExit(f"train_ds.py: --resume with a different config ({', '.join(changed)}); "
                                 f"resume with the flags of the original run (see {run}/config.json)")
        cfg.save(run / "config.json")
        (run / "run.json").write_text(json.dumps({"stage": args.stage, "world_size": world}) + "\n")
    dist.barrier()

    # ---- data: tokenizer of the teacher, the vocabulary, aligned examples
    prepared = prepare_data(args.stage, cfg, run, world)
    tokenizer, vocab, builder = prepared.tokenizer, prepared.vocab, prepared.builder
    train_examples, valid_examples = prepared.train_examples, prepared.valid_examples
    batches_per_epoch, total_steps = prepared.batches_per_epoch, prepared.total_steps
    if builder.has_thinking_switch:
        log.info("chat template: the teacher's has a thinking switch (Qwen3-style); thinking is off, so its "
                 "answer starts with the translation")
    if is_main():
        vocab.save(run)
        tokenizer.save_pretrained(run / "tokenizer")
        prepared.teacher_config.save_pretrained(run / "teacher_config")
        if Path(cfg.train.teacher, "generation_config.json").is_file():
            shutil.copy(Path(cfg.train.teacher, "generation_config.json"), run / "teacher_config")

    use_seq_kd = args.stage == "distill" and cfg.distill.seq_kd
    if use_seq_kd:  # a stale cache is refused here, before any model is loaded
        seq_kd_path = seq_kd.cache_path(cfg, run)
        seq_kd_head = seq_kd.cache_header(cfg, train_examples, builder)
        seq_kd_cached = seq_kd.read_cache(seq_kd_path, seq_kd_head)

    # ---- models: the teacher (frozen and placed by memory, or trained in sft) and the student
    resume_tag = args.resume
    if resume_tag == "latest" and (ckpt_dir / "latest").is_file():
        resume_tag = (ckpt_dir / "latest").read_text().strip()
    if resume_tag and not resume_tag.endswith("_universal"):  # ZeRO shards load only on as many ranks as saved them
        saved_ranks = len(list((ckpt_dir / resume_tag).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if saved_ranks and saved_ranks != world:
            raise SystemExit(f"train_ds.py: --resume: {ckpt_dir / resume_tag} was saved by {saved_ranks} ranks and "
                             f"this run has {world}; convert it first (RUN={run} TAG={resume_tag} bash "
                             "scripts/convert_checkpoint.sh), then --resume with any number of ranks"
                             if is_main() else 1)
    if resume_tag and not cfg.train.max_steps:  # --epochs: the schedule keeps the length in steps it started with
        saved_total = saved_client_state(ckpt_dir / resume_tag).get("total_steps")
        if saved_total and saved_total != total_steps:
            log.info("schedule: %d steps, as the run started (%d ranks would make it %d); --grad_accum keeps the "
                     "global batch, and so the epochs", saved_total, world, total_steps)
            prepared.total_steps = total_steps = saved_total
    models = build_models(args.stage, cfg, prepared, run, world, use_bf16, on_gpu, device,
                          load_universal=bool(resume_tag) and resume_tag.endswith("_universal"))
    engine = models.engine
    peak = peak_flops(gpu_name(on_gpu))
    # seq_kd: the teacher's cached translation replaces the reference as target, example by example
    seq_kd_by_key = (seq_kd.teacher_targets(cfg, prepared, models.teacher, models.teacher_rows, seq_kd_head,
                                            seq_kd_cached, seq_kd_path, device,
                                            all_done=None if models.teacher_whole else lockstep(device))
                     if use_seq_kd else {})

    # ---- resume: weights, optimiser, scheduler and the data position
    step, best_bleu, evals_without_gain, history = 0, -1.0, 0, []
    batches_done = 0  # micro-batches consumed by all ranks together: the data position, whatever the rank count
    stream_start = data.StreamPosition()
    if args.resume:
        # the tag `latest` named: under load_universal DeepSpeed would read its own pointer, latest_universal
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=None if resume_tag == "latest" else resume_tag)
        if path is None:
            raise SystemExit(f"train_ds.py: --resume {args.resume}: no checkpoint in {ckpt_dir}")
        step, best_bleu = client["step"], client["best_bleu"]
        stream_start = data.StreamPosition(**client.get("stream", {}))
        evals_without_gain, history = client["evals_without_gain"], client["history"]
        # checkpoints saved before batches_done was: on as many ranks as now (others were refused above)
        batches_done = client.get("batches_done", step * cfg.train.grad_accum * world)
        log.info("resumed from %s at step %d", path, step)

    # ---- stop requests: a pre-empted job saves before it goes
    stop_requested = {"signal": None}

    def request_stop(signum, _frame):
        stop_requested["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    def save(tag_step: int) -> None:
        """Every rank writes its shards under a partial name; once all are done rank 0 renames the folder
        and only then moves `latest`: a crash at any point leaves the previous checkpoint the latest."""
        client = {"step": tag_step, "best_bleu": best_bleu, "evals_without_gain": evals_without_gain,
                  "history": history, "stage": args.stage,
                  "batches_done": batches_done, "total_steps": total_steps}
        if prepared.stream:  # where this rank's stream goes on (the batch after the last one trained)
            client["stream"] = dataclasses.asdict(position)
        tag = f"step{tag_step}"
        engine.save_checkpoint(str(ckpt_dir), tag=tag + PARTIAL, client_state=client, save_latest=False)
        fault("in_save", tag_step)
        dist.barrier()
        if is_main():
            publish_checkpoint(ckpt_dir, tag)
            prune_checkpoints(ckpt_dir, cfg.train.keep)
        dist.barrier()

    # ---- the loop
    writer = SummaryWriter(str(run / "tb")) if is_main() else None
    micro_per_step = cfg.train.grad_accum
    trained_region = "student" if args.stage == "distill" else "teacher"

    def micro_batches(done: int):
        """This rank's micro-batches after the first `done` of all ranks together (epochs reshuffle by seed): a run
        resumed on another number of ranks goes on where the data stopped, repeating fewer than `world` batches."""
        if prepared.stream:
            for at, examples in prepared.stream.batches(stream_start):
                yield at.epoch, at, examples
        epoch, offset = divmod(done // world, batches_per_epoch)
        while True:
            global_batches = data.make_batches(train_examples, cfg.train.micro_batch_size, cfg.data.tokens_per_batch,
                                               cfg.train.seed, epoch, world)
            for position, indices in enumerate(global_batches[rank::world][offset:batches_per_epoch], offset):
                yield epoch, position, seq_kd.with_targets([train_examples[i] for i in indices], seq_kd_by_key)
            epoch, offset = epoch + 1, 0

    def flush(pending: list[StepRecord]) -> None:
        """Write the steps since the last flush: metrics.jsonl, TensorBoard, the progress bar and (rank 0) the log
        line. Their losses stayed on the device until now: the one host sync of a logging interval, whose wall time
        is shared out evenly among its steps (a GPU step's own host time says nothing while kernels queue)."""
        nonlocal flushed_at
        if not pending:
            return
        rows = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                         for v in r.device_values()]) for r in pending])
        dist.all_reduce(rows)
        seconds, flushed_at = time.perf_counter() - flushed_at, time.perf_counter()
        for record_, row in zip(pending, (rows / world).tolist()):
            write_step(record_, row, seconds / len(pending))
        progress.set_postfix(loss=f"{row[0]:.3f}", kd=f"{row[1]:.3f}", ce=f"{row[2]:.3f}")

    def write_step(r: StepRecord, row: list[float], seconds: float) -> None:
        total, kd, ce, target, source, teacher, padded = row[:3] + [c * world for c in row[3:]]
        if not writer:
            return
        ms = r.timer.ms()
        tokens_per_s = (target + source) / seconds
        flops_per_s = models.flops(teacher, source, target) / seconds if models.flops else 0.0
        record(run, {"step": r.step, "loss": total, "kd": kd, "ce": ce, "lr": r.lr, "tokens_per_s": tokens_per_s,
                     "tflops": flops_per_s / 1e12, **({"on_policy": True} if r.on_policy else {}),
                     **({"skipped": r.skipped} if r.skipped else {})})
        scalars = [("loss/total", total), ("loss/kd", kd), ("loss/ce", ce), ("lr", r.lr),
                   ("grad_norm", float(r.grad_norm or 0.0)), ("throughput/tokens_per_s", tokens_per_s),
                   ("throughput/teacher_tokens_per_s", teacher / seconds),
                   ("data/padding_fraction", 1 - (target + source) / max(padded, 1)),
                   ("time/teacher_ms", ms["teacher"]), ("time/student_ms", ms["student"]),
                   ("memory/max_allocated_gb", max_memory_gb(accelerator, on_gpu)),
                   ("faults/skipped_steps", r.skipped_total)]
        if models.flops:
            scalars.append(("throughput/tflops_per_gpu", flops_per_s / world / 1e12))
            if peak:
                scalars.append(("throughput/mfu", flops_per_s / world / peak))
        for name, value in scalars:
            if math.isfinite(value):
                writer.add_scalar(name, value, r.step)
        if r.step % cfg.train.log_every == 0 or r.step == 1:
            eta = (time.perf_counter() - started) / (r.step - first_step) * (total_steps - r.step)
            log.info("step %d/%d | epoch %d | loss %.4f kd %.4f ce %.4f | lr %.2e | %.0f tok/s %s| "
                     "teacher %.0f ms student %.0f ms | eta %.0f s", r.step, total_steps, r.epoch, total, kd, ce,
                     r.lr, tokens_per_s, f"MFU {flops_per_s / world / peak:.1%} " if peak and models.flops else "",
                     ms["teacher"], ms["student"], eta)

    stream = micro_batches(batches_done)
    # in a file, no bar: the step log line says it all
    progress = Progress(total_steps, args.stage, "step", shown=is_main(), initial=step)
    bad_steps, skipped_total, started, first_step = 0, 0, time.perf_counter(), step
    flushed_at, pending = started, []
    while step < total_steps:
        # dropout and any sampling are seeded by (seed, step, rank): a resumed run replays the same noise
        torch.manual_seed(cfg.train.seed + step * world + rank)
        timer = StepTimer(accelerator, on_gpu)
        micro: list[MicroBatch] = []
        on_policy = args.stage == "distill" and seq_kd.is_on_policy_step(cfg.train.seed, step + 1,
                                                                         cfg.distill.on_policy_ratio)
        for _ in range(micro_per_step):
            epoch, position, examples = next(stream)
            if on_policy:
                parts, host = on_policy_loss(models, examples, builder, cfg.distill, device, timer)
            else:
                host = builder.collate(examples)
                parts = step_loss(args.stage, models, to_device(host, device), cfg, timer)
            if fault("loss", step + 1) and rank == 0:
                parts = parts._replace(total=parts.total * float("nan"))
            with timer.region(trained_region):
                # a non-finite loss is not checked here (a host sync every micro-batch): its gradient norm is not
                # finite either, and DeepSpeed then skips the update on every rank (its norm is all-reduced)
                engine.backward(parts.total)
                fault("in_step", step + 1)
                engine.step()
            micro.append(MicroBatch(epoch, position, parts, batch_counts(host)))
        step += 1
        batches_done += micro_per_step * world
        skipped = None if engine.was_step_applied() else skip_reason(micro, step, device)
        bad_steps = bad_steps + 1 if skipped else 0
        skipped_total += bool(skipped)
        pending.append(StepRecord(step, epoch, on_policy, micro, engine.get_lr()[0], engine.get_global_grad_norm(),
                                  timer, skipped, skipped_total))
        progress.update(1)
        if skipped and is_main():
            log.warning("skipped the update: %s (%d in a row, %d in all)", skipped, bad_steps, skipped_total)
        if bad_steps >= cfg.train.max_bad_steps:
            flush(pending)
            raise SystemExit(f"train_ds.py: {bad_steps} steps in a row skipped, the last: {skipped}. The last "
                             f"checkpoint in {ckpt_dir} is untouched; resume from it with a lower --lr, or look "
                             "at that batch's data.")

        last_step = step >= total_steps
        if args.halt_at and step >= args.halt_at:
            stop_requested["signal"] = stop_requested["signal"] or f"--halt_at {args.halt_at}"
        # agreed on over the host group: a pre-empted rank saves with the others, and no GPU work is waited for
        stopping = any_rank(stop_requested["signal"] is not None, "cpu", procs.host_group)
        evaluating = step % cfg.train.eval_every == 0 or last_step
        if step % cfg.train.log_every == 0 or step == 1 or evaluating or stopping or last_step:
            flush(pending)
            pending = []
        if evaluating:
            result = evaluate(args.stage, models, builder, valid_examples, cfg, device, on_gpu)
            history.append({"step": step, **{k: result[k] for k in ("loss", "kd", "ce", "bleu", "chrf")},
                            "directions": result["directions"]})
            improved = result["bleu"] > best_bleu
            if improved:
                best_bleu, evals_without_gain = result["bleu"], 0
                state = consolidated_state(engine)
                if is_main():
                    save_folder(args.stage, state, cfg, run, run / "best", {"step": step, **history[-1]})
            else:
                evals_without_gain += 1
            if writer:
                record(run, {"eval": True, **history[-1]})
                for name in ("loss", "kd", "ce", "bleu", "chrf"):
                    writer.add_scalar(f"eval/{name}", result[name], step)
                for direction, s in result["directions"].items():
                    writer.add_scalar(f"eval/bleu_{direction}", s["bleu"], step)
                log.info("eval step %d | loss %.4f | BLEU %.2f chrF %.2f %s| e.g. %s", step, result["loss"],
                         result["bleu"], result["chrf"], "(best) " if improved else "", result["examples"][:1])
            if cfg.train.patience and evals_without_gain >= cfg.train.patience:
                log.info("early stop: no BLEU gain in %d evaluations", evals_without_gain)
                last_step = True
        if step % cfg.train.save_every == 0 or last_step or stopping:
            save(step)
        if stopping and not last_step:
            log.info("%s received: saved step %d to %s; resume with --resume", stop_requested["signal"], step,
                     ckpt_dir)
            break
        if last_step:
            break

    progress.close()
    if writer:
        writer.close()
    if is_main():
        (run / "history.json").write_text(json.dumps(history, indent=2, ensure_ascii=False) + "\n")
        if not stop_requested["signal"] and (run / "best").is_dir():
            shutil.rmtree(run / "final", ignore_errors=True)
            shutil.copytree(run / "best", run / "final")
            log.info("best model (BLEU %.2f) exported to %s", best_bleu, run / "final")
    dist.barrier()


@dataclass
class MicroBatch:
    """One micro-batch of a step: where it came from, its loss parts (on the device) and its token counts."""
    epoch: int
    position: object  # batch index in the epoch, or a StreamPosition
    parts: LossParts
    counts: tuple[int, int, int, int]  # target, source, teacher and padded tokens (batch_counts)


@dataclass
class StepRecord:
    """A trained step waiting for the next flush (train_ds.main): its values stay on the device until then."""
    step: int
    epoch: int
    on_policy: bool
    micro: list[MicroBatch]
    lr: float
    grad_norm: object  # a float or a device tensor, as DeepSpeed keeps it
    timer: StepTimer
    skipped: str | None
    skipped_total: int

    def device_values(self) -> list:
        """[loss, kd, ce] averaged over the micro-batches (device tensors), then the token counts summed."""
        n = len(self.micro)
        losses = [sum(m.parts[i].detach().double() for m in self.micro) / n for i in range(3)]
        return losses + [float(sum(m.counts[i] for m in self.micro)) for i in range(4)]


def skip_reason(micro: list[MicroBatch], step: int, device) -> str:
    """Why DeepSpeed skipped step's update (its gradient norm was not finite), naming the first micro-batch whose
    loss was not finite on any rank. Only a skipped step pays this sync; every rank skips together."""
    flags = torch.stack([(~torch.isfinite(m.parts.total.detach())).to(torch.float64) for m in micro]).to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad = [i for i, flag in enumerate(flags.tolist()) if flag]
    if not bad:
        return f"non-finite gradient at step {step}, epoch {micro[-1].epoch} batch {micro[-1].position}"
    first = micro[bad[0]]
    return f"non-finite loss at step {step}, epoch {first.epoch} batch {first.position}"


def record(run: Path, entry: dict) -> None:
    """Append one JSON line to RUN/metrics.jsonl (steps and evaluations; a resumed run appends again)."""
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


def max_memory_gb(accelerator, on_gpu: bool) -> float:
    if on_gpu:
        return accelerator.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


if __name__ == "__main__":
    try:
        main()
    except (config_lib.ConfigError, corpus.CorpusError, vocabulary.VocabMismatchError) as exc:
        sys.exit(f"train_ds.py: {exc}")  # a start-up problem the message explains: no traceback
