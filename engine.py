"""Where a run executes: this rank's device and process group, the collectives the loop agrees through, and the
DeepSpeed engine of the trained model (its JSON filled from our config, AdamW, warm-up + cosine).

Everything here is shared by train_ds.py and the benches under bench/, so a bench measures the run's own set-up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import config as config_lib

log = logging.getLogger("train_ds")


# ----------------------------------------------------------------------------- processes and devices

def has_gpu() -> bool:
    """Whether this machine has an accelerator DeepSpeed drives (its GPU defaults then apply, see config.py)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() != "cpu"


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


def lockstep(device):
    """all_done for a decoding loop whose every step is a collective (ZeRO-3 hooks): done when every rank is."""
    return lambda done: not any_rank(not done, device)


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
    """A port nobody listens on now (each launch gets its own, so parallel or back-to-back runs never share one)."""
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


def to_device(batch: dict, device) -> dict:
    """Long tensors on device. On a GPU they go through pinned memory without blocking: a copy from pageable
    memory would first wait for every kernel queued before it."""
    tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    if torch.device(device).type == "cpu":
        return tensors
    return {k: t.pin_memory().to(device, non_blocking=True) for k, t in tensors.items()}


# ----------------------------------------------------------------------------- the trained model's engine

def resolve_ds_config(cfg: config_lib.Config, stage: str, on_gpu: bool) -> str:
    """train.ds_config auto: ZeRO-3 for a trained teacher (sft) and on CPU (the tested default); ZeRO-2 for a student
    distilled on GPUs, where ZeRO-3 would all-gather each of its ~100 small tensors every micro-batch."""
    if cfg.train.ds_config != "auto":
        return cfg.train.ds_config
    return "ds_configs/zero2.json" if stage == "distill" and on_gpu else "ds_configs/zero3.json"


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


def trained_deepspeed_config(cfg: config_lib.Config, world: int, use_bf16: bool, load_universal: bool) -> dict:
    """The trained model's DeepSpeed config (--ds_config). load_universal: the checkpoint to resume is a universal
    one, which any number of ranks can load."""
    ds = deepspeed_config(cfg.train.ds_config, cfg, world, use_bf16, trained=True)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


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
    deepspeed.initialize in teacher.load_frozen_teacher); with DeepSpeed, accelerate returns the DeepSpeedEngine
    itself."""
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
    # init_processes's deepspeed.init_distributed made the process group; naming its backend lets accelerate count
    # its ranks (with no backend on CPU it counts one: "No backend == no distributed training", accelerate/state.py)
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
