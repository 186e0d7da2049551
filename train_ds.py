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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import config as config_lib
import data
import seq_kd
from kd_loss import LossParts, fused_distill_loss

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
        cfg = config_lib.from_args(args)
    except config_lib.ConfigError as exc:
        parser.error(str(exc))
    return args, cfg


# ----------------------------------------------------------------------------- distributed helpers

def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def mean_across_ranks(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def any_rank(flag: bool, device) -> bool:
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


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
            raise data.VocabMismatchError(
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


def place_teacher(ds: dict, requested: str, parameters: int, dtype: torch.dtype, world: int,
                  free_bytes: int) -> str:
    """Choose where the frozen teacher's weights live, set the teacher's ZeRO-3 config for it, and return
    a line saying which and why.

    resident: every parameter persists whole on every rank (ZeRO-3's persistence threshold above the
    largest), so no all-gather runs per step; sharded: partitions gathered layer by layer each forward;
    offload: partitions in CPU memory. auto keeps 40% of free memory for the student and activations.
    """
    weight_bytes = parameters * torch.finfo(dtype).bits // 8
    budget = int(0.6 * free_bytes)
    gib = 2 ** 30
    sizes = (f"teacher {weight_bytes / gib:.2f} GiB ({parameters / 1e6:.1f}M parameters), "
             f"{free_bytes / gib:.1f} GiB free per rank")
    if requested != "auto":
        placement, why = requested, "as asked (--distill.teacher_placement)"
    elif weight_bytes <= budget:
        placement, why = "resident", "a whole copy fits beside the student"
    elif weight_bytes / world <= budget:
        placement, why = "sharded", f"a whole copy does not fit; a 1/{world} shard does"
    else:
        placement, why = "offload", f"even a 1/{world} shard does not fit"
    zero = ds["zero_optimization"]
    if placement == "resident":
        zero["stage3_param_persistence_threshold"] = parameters
        zero["stage3_max_live_parameters"] = max(zero.get("stage3_max_live_parameters", 0), parameters)
    elif placement == "offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return f"teacher placement: {placement}: {why} ({sizes})"


def teacher_logits(teacher, batch: dict, target_len: int) -> torch.Tensor:
    """Logits [B, T, V] of the whole causal LM at the T target positions only (sft: the trained teacher)."""
    out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                  position_ids=batch["teacher_position_ids"], logits_to_keep=target_len, use_cache=False)
    return out.logits


def teacher_hidden(teacher_body, batch: dict, target_len: int) -> torch.Tensor:
    """The frozen teacher's final hidden states [B, T, H] at the T target positions (see data.collate)."""
    out = teacher_body(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                       position_ids=batch["teacher_position_ids"], use_cache=False)
    return out.last_hidden_state[:, -target_len:]


# ----------------------------------------------------------------------------- steps

def to_device(batch: dict, device) -> dict:
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}


def distill_step(student, teacher, teacher_rows: torch.Tensor, batch: dict, cfg: config_lib.DistillConfig,
                 timings: dict) -> LossParts:
    labels = batch["labels"]
    start = time.perf_counter()
    with torch.no_grad():  # never inference_mode: its tensors cannot meet ZeRO-3's trained model
        hidden = teacher_hidden(teacher, batch, labels.shape[1])
    timings["teacher"] += time.perf_counter() - start
    start = time.perf_counter()
    out = student(source_ids=batch["source_ids"], source_mask=batch["source_mask"], direction=batch["direction"],
                  decoder_input_ids=batch["decoder_input_ids"],
                  output_loss=lambda s_hidden, s_weight: fused_distill_loss(s_hidden, s_weight, hidden,
                                                                            teacher_rows, labels, cfg))
    timings["student"] += time.perf_counter() - start
    return out.loss_parts


def sft_step(teacher, batch: dict, timings: dict) -> LossParts:
    """Causal-LM loss on the assistant turn (the target) only."""
    start = time.perf_counter()
    labels = batch["teacher_labels"]
    logits = teacher_logits(teacher, batch, labels.shape[1]).float()
    keep = labels != data.IGNORE_INDEX
    tokens = int(keep.sum())
    ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum") / max(tokens, 1)
    timings["teacher"] += time.perf_counter() - start
    return LossParts(ce, ce.new_zeros(()), ce.detach(), tokens)


# ----------------------------------------------------------------------------- on-policy KD (seq_kd.py says why)

@contextlib.contextmanager
def whole_student(engine):
    """The trained student's ZeRO-3 parameters gathered whole on every rank, with ZeRO-3's per-module hooks lifted,
    for a sampling loop: otherwise every decoder step all-gathers every layer again (as TRL's
    unwrap_model_for_generation does; the student is small). The hooks come back on exit and the parameters are
    partitioned again. Without ZeRO-3 (or with a DeepSpeed lacking these internals) it does nothing."""
    import deepspeed
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if engine.zero_optimization_stage() != 3 or offload is None or not hasattr(offload, "_register_deepspeed_module"):
        yield
        return
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for param in params:
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def on_policy_loss(models: "Models", examples: list, builder: data.ExampleBuilder, cfg: config_lib.DistillConfig,
                   device, timings: dict) -> tuple[LossParts, dict]:
    """alpha * T^2 * D(teacher, student) on the student's own samples + (1 - alpha) * CE on the reference, in one
    student forward over [samples; references] (one forward and backward per micro-batch, as on other steps)."""
    engine = models.engine
    pad_teacher = builder.tokenizer.pad_token_id
    reference = to_device(data.collate(examples, builder.pad_id, builder.bos_id, builder.vocab.student_of,
                                       pad_teacher), device)
    start = time.perf_counter()
    engine.module.eval()  # sample from the student's distribution, not a dropout-perturbed one
    with whole_student(engine), torch.no_grad():
        samples = engine.module.generate(reference["source_ids"], reference["source_mask"], reference["direction"],
                                         all_done=lambda done: not any_rank(not done, device), temperature=1.0)
    engine.module.train()
    ended = [builder.eos_teacher_id]  # a sample shorter than the limit ended with the end token
    sampled = [dataclasses.replace(e, target_ids=[builder.vocab.teacher_ids[t] for t in ids] +
                                   (ended if len(ids) < builder.max_target_len else []))
               for e, ids in zip(examples, samples)]
    timings["student"] += time.perf_counter() - start
    start = time.perf_counter()
    scored = to_device(data.collate(sampled, builder.pad_id, builder.bos_id, builder.vocab.student_of, pad_teacher),
                       device)
    with torch.no_grad():
        hidden = teacher_hidden(models.teacher, scored, scored["labels"].shape[1])
    timings["teacher"] += time.perf_counter() - start
    start = time.perf_counter()
    both = to_device(data.collate(sampled + list(examples), builder.pad_id, builder.bos_id, builder.vocab.student_of,
                                  pad_teacher), device)
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
    timings["student"] += time.perf_counter() - start
    return out.loss_parts, {**both, "teacher_attention_mask": scored["teacher_attention_mask"]}


# ----------------------------------------------------------------------------- evaluation

def translate_shard(stage: str, model, builder: data.ExampleBuilder, examples: list, device,
                    batch_size: int) -> list[str]:
    """Greedy translations of this rank's examples; every rank runs the same number of forward passes."""
    from inference.translator import teacher_generate
    outputs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = to_device(data.collate(chunk, builder.pad_id, builder.bos_id, builder.vocab.student_of,
                                       builder.tokenizer.pad_token_id), device)
        if stage == "distill":
            ids = model.generate(batch["source_ids"], batch["source_mask"], batch["direction"],
                                 all_done=lambda done: not any_rank(not done, device))
            outputs += [builder.decode(row) for row in ids]
        else:
            prompts = [ex.prompt_ids for ex in chunk]
            outputs += teacher_generate(model, builder.tokenizer, prompts, builder.max_target_len, device,
                                        synced_gpus=True)
    return outputs


def evaluate(stage: str, models: "Models", builder, valid_examples: list, cfg: config_lib.Config, device) -> dict:
    """Validation loss over the subset, then greedy BLEU/chrF per direction, computed once on rank 0."""
    from inference.metrics import score
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = models.engine
    engine.eval()
    timings = {"teacher": 0.0, "student": 0.0}
    losses = []
    with torch.no_grad():
        # small enough that every rank gets a batch even from a small validation subset
        size = max(1, min(cfg.train.micro_batch_size, len(valid_examples) // world))
        for indices in data.make_batches(valid_examples, size, 0, 0, 0, world)[rank::world]:
            batch = to_device(data.collate([valid_examples[i] for i in indices], builder.pad_id, builder.bos_id,
                                           builder.vocab.student_of, builder.tokenizer.pad_token_id), device)
            parts = step_loss(stage, models, batch, cfg, timings)
            losses.append([float(parts.total), float(parts.kd), float(parts.ce)])
        mean = torch.tensor(losses, dtype=torch.float64).mean(0).tolist() if losses else [0.0, 0.0, 0.0]
        loss, kd, ce = mean_across_ranks(mean, device)
        # an equal share per rank (the last rank pads by repeating) keeps every rank's generate in step
        share = math.ceil(len(valid_examples) / world)
        mine = (valid_examples[rank * share:(rank + 1) * share] or valid_examples[:1])
        mine = mine + [mine[-1]] * (share - len(mine))
        model = engine.module
        hyps = translate_shard(stage, model, builder, mine, device, cfg.train.micro_batch_size)
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
    if getattr(model_config, "tie_word_embeddings", False) and stage != "distill":
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    model_config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(run / "tokenizer").save_pretrained(tmp)
    if stage == "distill":
        shutil.copy(run / data.VocabMap.FILE, tmp / data.VocabMap.FILE)
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
    if not args.ckpt:
        raise SystemExit("train_ds.py export: --ckpt RUN/checkpoints is required")
    ckpt = Path(args.ckpt)
    run = ckpt.parent
    if not (run / "run.json").is_file():
        raise SystemExit(f"train_ds.py export: {run}/run.json not found; --ckpt must be a run's checkpoints folder")
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
    vocab: data.VocabMap
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
        raise data.VocabMismatchError(
            f"{cfg.train.teacher}: the tokenizer has {len(tokenizer)} ids but the model has only "
            f"{teacher_config.vocab_size} output rows; the tokenizer files belong to another model: use the ones "
            "saved with this checkpoint")
    streaming = cfg.data.stream_window > 0
    if streaming and (not cfg.train.max_steps or cfg.distill.seq_kd):
        raise config_lib.ConfigError("--data.stream_window needs --max_steps (a stream has no epoch length "
                                     "known in advance) and --seq_kd false (seq_kd translates every scheduled "
                                     "example before step 1, which a stream exists to avoid)")
    try:  # every problem in the splits is listed before step 1, not the first one at hour 30
        splits = data.load_splits(cfg.data.path, ("valid",) if streaming else ("train", "valid"),
                                  cfg.data.on_bad_line, cfg.data.max_chars)
        train_pairs = (data.arrow_sample(cfg.data.path, STREAM_VOCAB_ROWS, cfg.data.max_chars) if streaming
                       else splits["train"].pairs)
    except data.CorpusError as exc:
        raise SystemExit(f"train_ds.py: {exc}") from None
    valid_pairs = splits["valid"].pairs[:cfg.data.valid_subset]
    if stage == "distill":
        if (run / data.VocabMap.FILE).is_file():
            vocab = data.VocabMap.load(run)
            vocab.check_tokenizer(tokenizer, f"teacher {cfg.train.teacher}")
        else:
            texts = [p.zh for p in train_pairs] + [p.en for p in train_pairs]
            vocab = data.build_vocab_map(tokenizer, texts, cfg.data.vocab_size, teacher_config.vocab_size)
    else:
        vocab = data.VocabMap.full(tokenizer, teacher_config.vocab_size)
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
    """The trained model's engine and, when distilling, the frozen teacher's body engine and output rows."""
    engine: object
    teacher: object = None                     # distill: DeepSpeed engine over the teacher's body
    teacher_rows: torch.Tensor | None = None   # distill: teacher output rows for the student's ids [K, H]
    hf_ds: object = None                       # keeps transformers' ZeRO-3 view alive (see load_teacher)
    flops: "StepFlops | None" = None


def build_models(stage: str, cfg: config_lib.Config, prepared: RunData, run: Path, world: int, use_bf16: bool,
                 on_gpu: bool, device, load_universal: bool = False) -> Models:
    """load_universal: the checkpoint to resume is a universal one (any number of ranks can load it)."""
    import deepspeed

    from model import StudentConfig, StudentForTranslation
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    trained_ds = deepspeed_config(cfg.train.ds_config, cfg, world, use_bf16, trained=True)
    if load_universal:
        trained_ds["checkpoint"] = {**trained_ds.get("checkpoint", {}), "load_universal": True}
    if stage == "sft":
        teacher, hf_ds = load_teacher(cfg.train.teacher, trained_ds, dtype, cfg.train.trust_remote_code)
        return Models(build_engine(teacher, trained_ds, cfg, prepared.total_steps), hf_ds=hf_ds)

    teacher_ds = deepspeed_config(cfg.train.teacher_ds_config, cfg, world, use_bf16, trained=False)
    parameters = teacher_parameters(prepared.teacher_config, cfg.train.trust_remote_code)
    log.info(place_teacher(teacher_ds, cfg.distill.teacher_placement, parameters, dtype, world,
                           free_memory_per_rank(on_gpu)))
    teacher, hf_ds = load_teacher(cfg.train.teacher, teacher_ds, dtype, cfg.train.trust_remote_code)
    body, rows = split_teacher_head(teacher, prepared.vocab.teacher_ids, cfg.train.teacher)
    teacher_engine, *_ = deepspeed.initialize(model=body, config=teacher_ds)
    teacher_engine.module.eval()
    torch.manual_seed(cfg.train.seed)  # identical initial student on every rank
    builder = prepared.builder
    student_cfg = StudentConfig.from_model_config(cfg.model, prepared.vocab.size, builder.pad_id, builder.bos_id,
                                                  builder.eos_id)
    if is_main():
        student_cfg.save_pretrained(run / "student_config")
    student = StudentForTranslation(student_cfg)
    flops = StepFlops.of(prepared.teacher_config, parameters, student, prepared.vocab.size)
    engine = build_engine(student, trained_ds, cfg, prepared.total_steps)
    log.info("student: %s preset, %s decoder, %.2fM parameters; teacher: %s", cfg.model.preset, cfg.model.decoder,
             flops.student_parameters / 1e6, cfg.train.teacher)
    return Models(engine, teacher_engine, rows.to(device), hf_ds, flops)


def step_loss(stage: str, models: Models, batch: dict, cfg: config_lib.Config, timings: dict) -> LossParts:
    if stage == "distill":
        return distill_step(models.engine, models.teacher, models.teacher_rows, batch, cfg.distill, timings)
    return sft_step(models.engine, batch, timings)


# ----------------------------------------------------------------------------- throughput

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}  # dense, per GPU


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


def peak_flops(on_gpu: bool) -> float | None:
    """Dense bf16 peak of this GPU, for MFU; None on CPU or an unknown card."""
    if not on_gpu:
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if args.stage == "export":
        return export_checkpoint(args, cfg)

    from deepspeed.accelerator import get_accelerator
    from torch.utils.tensorboard import SummaryWriter

    # ---- set-up: processes, run folder, logging
    init_processes()
    rank, world = dist.get_rank(), dist.get_world_size()
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())
    on_gpu = accelerator.device_name() != "cpu"
    use_bf16 = cfg.train.bf16 == "on" or (cfg.train.bf16 == "auto" and on_gpu and accelerator.is_bf16_supported())
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
    if is_main():
        vocab.save(run)
        tokenizer.save_pretrained(run / "tokenizer")
        prepared.teacher_config.save_pretrained(run / "teacher_config")
        if Path(cfg.train.teacher, "generation_config.json").is_file():
            shutil.copy(Path(cfg.train.teacher, "generation_config.json"), run / "teacher_config")

    use_seq_kd = args.stage == "distill" and cfg.distill.seq_kd
    if use_seq_kd:  # a stale cache is refused here, before any model is loaded
        seq_kd_path = seq_kd.cache_path(cfg, run)
        seq_kd_head = seq_kd.cache_header(cfg, train_examples, vocab)
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
    peak = peak_flops(on_gpu)
    # seq_kd: the teacher's cached translation replaces the reference as target, example by example
    seq_kd_by_key = (seq_kd.teacher_targets(cfg, prepared, models.teacher, models.teacher_rows, seq_kd_head,
                                            seq_kd_cached, seq_kd_path, device,
                                            all_done=lambda done: not any_rank(not done, device))
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

    stream = micro_batches(batches_done)
    progress = None
    if is_main():
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, desc=args.stage, unit="step", dynamic_ncols=True)
    bad_steps, skipped_total, started, first_step = 0, 0, time.perf_counter(), step
    while step < total_steps:
        # dropout and any sampling are seeded by (seed, step, rank): a resumed run replays the same noise
        torch.manual_seed(cfg.train.seed + step * world + rank)
        timings = {"teacher": 0.0, "student": 0.0}
        sums, counts = [0.0, 0.0, 0.0], [0, 0, 0, 0]  # counts: target, source, teacher and padded tokens
        step_start = time.perf_counter()
        skipped = None  # why this step changed no weights, if it did not
        on_policy = args.stage == "distill" and seq_kd.is_on_policy_step(cfg.train.seed, step + 1,
                                                                         cfg.distill.on_policy_ratio)
        for _ in range(micro_per_step):
            epoch, position, examples = next(stream)
            if on_policy:
                parts, batch = on_policy_loss(models, examples, builder, cfg.distill, device, timings)
            else:
                batch = to_device(data.collate(examples, builder.pad_id, builder.bos_id, vocab.student_of,
                                               tokenizer.pad_token_id), device)
                parts = step_loss(args.stage, models, batch, cfg, timings)
            if fault("loss", step + 1) and rank == 0:
                parts = parts._replace(total=parts.total * float("nan"))
            start = time.perf_counter()
            # every rank must agree, or one would run backward's collectives alone and hang
            if any_rank(not bool(torch.isfinite(parts.total.detach())), device):
                skipped = f"non-finite loss at step {step + 1}, epoch {epoch} batch {position}"
            else:
                engine.backward(parts.total)
                fault("in_step", step + 1)
                engine.step()  # DeepSpeed itself skips the update when the gradient norm is not finite
                if not math.isfinite(float(engine.get_global_grad_norm() or 0.0)):
                    skipped = f"non-finite gradient at step {step + 1}, epoch {epoch} batch {position}"
            timings["student" if args.stage == "distill" else "teacher"] += time.perf_counter() - start
            sums = [s + float(v.detach()) for s, v in zip(sums, (parts.total, parts.kd, parts.ce))]
            counts = [c + n for c, n in zip(counts, (parts.tokens, int(batch["source_mask"].sum()),
                                                     int(batch["teacher_attention_mask"].sum()),
                                                     batch["labels"].numel() + batch["source_ids"].numel()))]
        step += 1
        batches_done += micro_per_step * world
        total, kd, ce, *counts_all = mean_across_ranks([s / micro_per_step for s in sums] + counts, device)
        bad_steps = bad_steps + 1 if skipped else 0
        skipped_total += bool(skipped)
        elapsed = time.perf_counter() - step_start
        if writer:
            target_all, source_all, teacher_all, padded_all = (c * world for c in counts_all)
            tokens_per_s = (target_all + source_all) / elapsed
            flops_per_s = models.flops(teacher_all, source_all, target_all) / elapsed if models.flops else 0.0
            record(run, {"step": step, "loss": total, "kd": kd, "ce": ce, "lr": engine.get_lr()[0],
                         "tokens_per_s": tokens_per_s, "tflops": flops_per_s / 1e12,
                         **({"on_policy": True} if on_policy else {}), **({"skipped": skipped} if skipped else {})})
            grad_norm = engine.get_global_grad_norm()
            scalars = [("loss/total", total), ("loss/kd", kd), ("loss/ce", ce), ("lr", engine.get_lr()[0]),
                       ("grad_norm", float(grad_norm or 0.0)), ("throughput/tokens_per_s", tokens_per_s),
                       ("throughput/teacher_tokens_per_s", teacher_all / elapsed),
                       ("data/padding_fraction", 1 - (target_all + source_all) / max(padded_all, 1)),
                       ("time/teacher_ms", timings["teacher"] * 1000),
                       ("time/student_ms", timings["student"] * 1000),
                       ("memory/max_allocated_gb", max_memory_gb(accelerator, on_gpu)),
                       ("faults/skipped_steps", skipped_total)]
            if models.flops:
                scalars.append(("throughput/tflops_per_gpu", flops_per_s / world / 1e12))
                if peak:
                    scalars.append(("throughput/mfu", flops_per_s / world / peak))
            for name, value in scalars:
                if math.isfinite(value):
                    writer.add_scalar(name, value, step)
            progress.update(1)
            progress.set_postfix(loss=f"{total:.3f}", kd=f"{kd:.3f}", ce=f"{ce:.3f}")
            if skipped:
                log.warning("skipped the update: %s (%d in a row, %d in all)", skipped, bad_steps, skipped_total)
            if step % cfg.train.log_every == 0 or step == 1:
                eta = (time.perf_counter() - started) / (step - first_step) * (total_steps - step)
                log.info("step %d/%d | epoch %d | loss %.4f kd %.4f ce %.4f | lr %.2e | %.0f tok/s %s| "
                         "teacher %.0f ms student %.0f ms | eta %.0f s", step, total_steps, epoch, total, kd, ce,
                         engine.get_lr()[0], tokens_per_s,
                         f"MFU {flops_per_s / world / peak:.1%} " if peak and models.flops else "",
                         timings["teacher"] * 1000, timings["student"] * 1000, eta)
        if bad_steps >= cfg.train.max_bad_steps:
            raise SystemExit(f"train_ds.py: {bad_steps} steps in a row skipped, the last: {skipped}. The last "
                             f"checkpoint in {ckpt_dir} is untouched; resume from it with a lower --lr, or look "
                             "at that batch's data.")

        last_step = step >= total_steps
        if args.halt_at and step >= args.halt_at:
            stop_requested["signal"] = stop_requested["signal"] or f"--halt_at {args.halt_at}"
        stopping = any_rank(stop_requested["signal"] is not None, device)
        if step % cfg.train.eval_every == 0 or last_step:
            result = evaluate(args.stage, models, builder, valid_examples, cfg, device)
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

    if progress:
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
    except (config_lib.ConfigError, data.CorpusError, data.VocabMismatchError) as exc:
        sys.exit(f"train_ds.py: {exc}")  # a start-up problem the message explains: no traceback
