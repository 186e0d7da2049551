"""What a run trains, stage by stage: its models, the loss of a micro-batch, how it decodes for evaluation, and the
Hugging Face folder it exports.

    sft       fine-tune the teacher itself on the corpus (causal-LM loss on the target)
    distill   train the student from the frozen teacher (fused KD + CE; seq-KD and on-policy steps, seq_kd.py)

train_ds.py runs either through the same loop: `STAGES[name](cfg)`.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import config as config_lib
import data
import engine as engine_lib
import seq_kd
import teacher as teacher_lib
from kd_loss import LossParts, fused_distill_loss
from step_log import StepFlops, StepTimer
from vocabulary import VocabMap

log = logging.getLogger("train_ds")


@dataclass
class Models:
    """The trained model's engine and, when distilling, the frozen teacher's body and output rows."""
    engine: object
    teacher: object = None                     # distill: a plain module (resident) or a ZeRO-3 engine (sharded)
    teacher_rows: torch.Tensor | None = None   # distill: teacher output rows for the student's ids [K, H]
    hf_ds: object = None                       # keeps transformers' ZeRO-3 view alive (see teacher.load_teacher)
    flops: StepFlops | None = None
    teacher_whole: bool = False                # the teacher is a plain module: it decodes with no collective


class Stage(abc.ABC):
    """What the sft and distill stages share: evaluation and the exported folder. A subclass says what it trains."""
    name: str
    trained_region: str       # the StepTimer region its backward and optimiser step count to
    model_config: str         # RUN/<this> holds the config of the model it exports
    trims_vocabulary: bool    # its model predicts over the student's kept ids, not the teacher's whole vocabulary

    def __init__(self, cfg: config_lib.Config):
        self.cfg = cfg

    # ---- set by each stage
    @abc.abstractmethod
    def build_models(self, prepared: data.RunData, run: Path, world: int, use_bf16: bool, on_gpu: bool, device,
                     load_universal: bool = False) -> Models:
        """The trained model's engine and whatever else the stage's loss needs (a frozen teacher)."""

    @abc.abstractmethod
    def batch_loss(self, models: Models, batch: dict, timer: StepTimer) -> LossParts:
        """The loss of a collated batch on the device (training and validation)."""

    @abc.abstractmethod
    def decodes_whole(self, models: Models, on_gpu: bool) -> bool:
        """Whether the trained model may be gathered whole for decoding (see engine.whole_model)."""

    @abc.abstractmethod
    def translate(self, model, builder: data.ExampleBuilder, chunk: list, batch: dict, device, whole: bool) -> list:
        """Greedy translations of one batch of examples (chunk, collated as batch)."""

    @abc.abstractmethod
    def folder_weights(self, state_dict: dict, model_config) -> dict:
        """The weights as the exported folder stores them (model_config may be updated to say so)."""

    @abc.abstractmethod
    def copy_run_files(self, run: Path, folder: Path) -> None:
        """The stage's own files, once the folder holds everything else (a model card reads the metrics)."""

    # ---- shared (a stage that trains on something besides the corpus says so)
    def check_targets_cache(self, prepared: data.RunData, run: Path) -> None:
        """Refuse a stale cache of training targets before any model loads."""

    def training_targets(self, prepared: data.RunData, models: Models, device) -> dict[str, list[int]]:
        """{example key: target ids} that replace the reference (seq_kd.with_targets); {}: the corpus as it is."""
        return {}

    def is_on_policy_step(self, step: int) -> bool:
        return False

    def micro_batch_loss(self, models: Models, examples: list, builder: data.ExampleBuilder, on_policy: bool, device,
                         timer: StepTimer) -> tuple[LossParts, dict]:
        """The loss of one training micro-batch, and the host lists of the batch it trained on."""
        host = builder.collate(examples)
        return self.batch_loss(models, engine_lib.to_device(host, device), timer), host

    def translate_shard(self, model, builder: data.ExampleBuilder, examples: list, device, batch_size: int,
                        whole: bool) -> list[str]:
        """Greedy translations of this rank's examples. whole: the model is hook-free on every rank (see
        engine.whole_model), so each rank decodes alone; otherwise every rank runs the same number of forward
        passes."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))  # batches that pad little
        outputs: list[str] = [""] * len(examples)
        for start in range(0, len(examples), batch_size):
            picked = order[start:start + batch_size]
            chunk = [examples[i] for i in picked]
            batch = engine_lib.to_device(builder.collate(chunk), device)
            for i, text in zip(picked, self.translate(model, builder, chunk, batch, device, whole)):
                outputs[i] = text
        return outputs

    def evaluate(self, models: Models, builder: data.ExampleBuilder, valid_examples: list, device,
                 on_gpu: bool) -> dict:
        """Validation loss over the subset, then greedy BLEU/chrF per direction, computed once on rank 0. Decoding
        runs on the whole, hook-free model when it fits (decodes_whole), else through ZeRO-3's hooks, in lockstep."""
        from inference.metrics import score
        cfg = self.cfg
        rank, world = dist.get_rank(), dist.get_world_size()
        engine = models.engine
        engine.eval()
        timer = StepTimer(None, False)
        losses = []
        with torch.no_grad():
            # small enough that every rank gets a batch even from a small validation subset
            size = max(1, min(cfg.train.micro_batch_size, len(valid_examples) // world))
            for indices in data.make_batches(valid_examples, size, 0, 0, 0, world)[rank::world]:
                batch = engine_lib.to_device(builder.collate([valid_examples[i] for i in indices]), device)
                parts = self.batch_loss(models, batch, timer)
                losses.append(torch.stack([parts.total, parts.kd, parts.ce]).double())
            mean = torch.stack(losses).mean(0).tolist() if losses else [0.0, 0.0, 0.0]
            loss, kd, ce = engine_lib.mean_across_ranks(mean, device)
            # an equal share per rank (the last rank pads by repeating) keeps every rank's generate in step
            share = math.ceil(len(valid_examples) / world)
            mine = (valid_examples[rank * share:(rank + 1) * share] or valid_examples[:1])
            mine = mine + [mine[-1]] * (share - len(mine))
            with engine_lib.whole_model(engine, allowed=self.decodes_whole(models, on_gpu)) as whole:
                hyps = self.translate_shard(engine.module, builder, mine, device, cfg.train.micro_batch_size, whole)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, hyps)
        result = {"loss": loss, "kd": kd, "ce": ce}
        if rank == 0:
            flat = [h for part in gathered for h in part][:len(valid_examples)]
            per_direction = {}
            for direction in cfg.data.directions:
                d = data.direction_index(direction)
                pick = [i for i, ex in enumerate(valid_examples) if ex.direction == d]
                per_direction[direction] = score([flat[i] for i in pick],
                                                 [valid_examples[i].reference for i in pick], direction.split("-")[1])
            result["directions"] = per_direction
            result["bleu"] = sum(s["bleu"] for s in per_direction.values()) / len(per_direction)
            result["chrf"] = sum(s["chrf"] for s in per_direction.values()) / len(per_direction)
            result["examples"] = [(ex.source_text, hyp, ex.reference) for ex, hyp in zip(valid_examples[:5], flat)]
        box = [result]
        dist.broadcast_object_list(box, src=0)
        engine.train()
        return box[0]

    def save_folder(self, state_dict: dict, run: Path, out: Path, metrics: dict) -> None:
        """Write a Hugging Face folder (config.json, model.safetensors, tokenizer, the stage's own files, the run's
        config and metrics), under a temporary name first so that `out` is never half written.

        The weights go straight to safetensors: building a model here would, for the teacher, start a ZeRO-3
        partitioned init (a collective) on rank 0 alone while the other ranks wait elsewhere.
        """
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoTokenizer

        import model  # noqa: F401 -- registers the student's config class with AutoConfig
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model_config = AutoConfig.from_pretrained(run / self.model_config)
        state_dict = self.folder_weights(state_dict, model_config)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        model_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(run / "tokenizer").save_pretrained(tmp)
        self.cfg.save(tmp / "training_config.json")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
        self.copy_run_files(run, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)


class SftStage(Stage):
    """Fine-tune the teacher itself: causal-LM loss on the assistant turn (the target) only."""
    name, trained_region, model_config, trims_vocabulary = "sft", "teacher", "teacher_config", False

    def build_models(self, prepared, run, world, use_bf16, on_gpu, device, load_universal=False) -> Models:
        cfg = self.cfg
        trained_ds = engine_lib.trained_deepspeed_config(cfg, world, use_bf16, load_universal)
        dtype = torch.bfloat16 if use_bf16 else torch.float32
        teacher, hf_ds = teacher_lib.load_teacher(cfg.train.teacher, trained_ds, dtype, cfg.train.trust_remote_code)
        return Models(engine_lib.build_engine(teacher, trained_ds, cfg, prepared.total_steps), hf_ds=hf_ds)

    def batch_loss(self, models, batch, timer) -> LossParts:
        with timer.region("teacher"):
            labels = batch["teacher_labels"]
            positions = batch["target_positions"]
            logits = teacher_lib.teacher_logits(models.engine, batch, labels.shape[1]).float()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).index_select(0, positions),
                                                   labels.flatten().index_select(0, positions), reduction="sum")
            ce = ce / max(len(positions), 1)
        return LossParts(ce, ce.new_zeros(()), ce.detach(), len(positions))

    def decodes_whole(self, models, on_gpu) -> bool:
        """A trained teacher decodes whole when its weights take at most half of the free memory."""
        module = models.engine.module
        return engine_lib.model_bytes(module) <= 0.5 * teacher_lib.free_memory_per_rank(on_gpu)

    def translate(self, model, builder, chunk, batch, device, whole) -> list:
        from inference.translator import teacher_generate
        return teacher_generate(model, builder.tokenizer, [ex.prompt_ids for ex in chunk], builder.max_target_len,
                                device, synced_gpus=not whole)

    def folder_weights(self, state_dict, model_config) -> dict:
        """The fine-tuned teacher keeps its training precision, and its config says which."""
        model_config.dtype = next(v.dtype for v in state_dict.values() if v.is_floating_point())
        if getattr(model_config, "tie_word_embeddings", False):
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        return state_dict

    def copy_run_files(self, run, folder) -> None:
        if (run / "teacher_config" / "generation_config.json").is_file():
            shutil.copy(run / "teacher_config" / "generation_config.json", folder / "generation_config.json")


class DistillStage(Stage):
    """Train the student from the frozen teacher, placed by memory beside it."""
    name, trained_region, model_config, trims_vocabulary = "distill", "student", "student_config", True

    def build_models(self, prepared, run, world, use_bf16, on_gpu, device, load_universal=False) -> Models:
        from model import StudentConfig, StudentForTranslation
        cfg = self.cfg
        dtype = torch.bfloat16 if use_bf16 else torch.float32
        trained_ds = engine_lib.trained_deepspeed_config(cfg, world, use_bf16, load_universal)
        parameters = teacher_lib.teacher_parameters(prepared.teacher_config, cfg.train.trust_remote_code)
        placement, why = teacher_lib.place_teacher(cfg.distill.teacher_placement, parameters, dtype, world,
                                                   teacher_lib.free_memory_per_rank(on_gpu))
        teacher, rows, hf_ds = teacher_lib.load_frozen_teacher(cfg, prepared, placement, dtype, device, world,
                                                               use_bf16)
        log.info("teacher placement: %s: %s; %s", placement, why,
                 f"a plain {str(dtype).removeprefix('torch.')} module on {device} (no ZeRO engine, no hooks): seq-KD "
                 "and scoring run it directly, each rank alone" if placement == "resident" else
                 f"a ZeRO-3 engine, buckets scaled to width {prepared.teacher_config.hidden_size}: every forward "
                 "gathers its layers through ZeRO-3's hooks, so seq-KD decodes with all ranks in lockstep")
        torch.manual_seed(cfg.train.seed)  # identical initial student on every rank
        builder = prepared.builder
        student_cfg = StudentConfig.from_model_config(cfg.model, prepared.vocab.size, builder.pad_id, builder.bos_id,
                                                      builder.eos_id)
        if engine_lib.is_main():
            student_cfg.save_pretrained(run / "student_config")
        student = StudentForTranslation(student_cfg)
        flops = StepFlops.of(prepared.teacher_config, parameters, student, prepared.vocab.size)
        engine = engine_lib.build_engine(student, trained_ds, cfg, prepared.total_steps)
        log.info("student: %s preset, %s decoder, %.2fM parameters, %s; teacher: %s", cfg.model.preset,
                 cfg.model.decoder, flops.student_parameters / 1e6, cfg.train.ds_config, cfg.train.teacher)
        return Models(engine, teacher, rows, hf_ds, flops, teacher_whole=placement == "resident")

    def batch_loss(self, models, batch, timer) -> LossParts:
        labels = batch["labels"]
        with timer.region("teacher"), torch.no_grad():  # never inference_mode: its tensors cannot meet ZeRO-3's model
            hidden = teacher_lib.teacher_hidden(models.teacher, batch, labels.shape[1])
        with timer.region("student"):
            out = models.engine(source_ids=batch["source_ids"], source_mask=batch["source_mask"],
                                direction=batch["direction"], decoder_input_ids=batch["decoder_input_ids"],
                                output_loss=lambda s_hidden, s_weight: fused_distill_loss(
                                    s_hidden, s_weight, hidden, models.teacher_rows, labels, self.cfg.distill,
                                    batch["target_positions"]))
        return out.loss_parts

    def __init__(self, cfg: config_lib.Config):
        super().__init__(cfg)
        self.seq_kd_cache: tuple[Path, dict, dict] | None = None  # (path, header, entries), by check_targets_cache

    def check_targets_cache(self, prepared, run) -> None:
        if self.cfg.distill.seq_kd:
            path = seq_kd.cache_path(self.cfg, run)
            header = seq_kd.cache_header(self.cfg, prepared.train_examples, prepared.builder)
            self.seq_kd_cache = path, header, seq_kd.read_cache(path, header)

    def training_targets(self, prepared, models, device) -> dict[str, list[int]]:
        """seq_kd: the teacher's cached translation replaces the reference as target, example by example."""
        if not self.cfg.distill.seq_kd:
            return {}
        if self.seq_kd_cache is None:
            raise RuntimeError("DistillStage.training_targets needs check_targets_cache first (it reads the cache)")
        path, header, cached = self.seq_kd_cache
        return seq_kd.teacher_targets(self.cfg, prepared, models.teacher, models.teacher_rows, header, cached, path,
                                      device, all_done=None if models.teacher_whole else engine_lib.lockstep(device))

    def is_on_policy_step(self, step: int) -> bool:
        return seq_kd.is_on_policy_step(self.cfg.train.seed, step, self.cfg.distill.on_policy_ratio)

    def micro_batch_loss(self, models, examples, builder, on_policy, device, timer) -> tuple[LossParts, dict]:
        if on_policy:
            return seq_kd.on_policy_loss(models, examples, builder, self.cfg.distill, device, timer)
        return super().micro_batch_loss(models, examples, builder, on_policy, device, timer)

    def decodes_whole(self, models, on_gpu) -> bool:
        return True  # a student always fits

    def translate(self, model, builder, chunk, batch, device, whole) -> list:
        ids = model.generate(batch["source_ids"], batch["source_mask"], batch["direction"],
                             all_done=None if whole else engine_lib.lockstep(device))
        return [builder.decode(row) for row in ids]

    def folder_weights(self, state_dict, model_config) -> dict:
        """ONNX export and the board start from float32, whatever precision trained it."""
        return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}

    def copy_run_files(self, run, folder) -> None:
        from inference.model_card import write_model_card
        shutil.copy(run / VocabMap.FILE, folder / VocabMap.FILE)
        write_model_card(folder)  # a model card, so the folder can be pushed to a model hub as it is


STAGES: dict[str, type[Stage]] = {"sft": SftStage, "distill": DistillStage}
