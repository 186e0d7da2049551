"""The teacher: its folder checked before anything loads, loaded from a local Hugging Face folder, placed by memory
(resident, sharded or offloaded), its output layer cut to the student's kept ids, and its forward passes.

The frozen teacher of a distillation is never trained: it is either a plain module on every rank or a ZeRO-3 engine
of its own beside the student's (a DeepSpeed engine holds one model and its optimiser; the frozen one has none).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import config as config_lib
import engine as engine_lib
from vocabulary import VocabMismatchError

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
            raise VocabMismatchError(
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


def load_frozen_teacher(cfg: config_lib.Config, prepared, placement: str, dtype: torch.dtype,
                        device: torch.device, world: int, use_bf16: bool):
    """(teacher body, its output rows for the kept ids [K, H] on device, hf_ds to keep alive or None).

    Resident: a plain module loaded straight onto this rank's device. Otherwise: partitioned while it loads, inside
    a ZeRO-3 engine of its own (a frozen model next to a trained one needs its own)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    path, trust = cfg.train.teacher, cfg.train.trust_remote_code
    if placement == "resident":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust,
                                                     device_map={"": str(device)})
        body, rows = split_teacher_head(model, prepared.vocab.teacher_ids, path)
        return body.eval(), rows.to(device), None
    ds = engine_lib.deepspeed_config(cfg.train.teacher_ds_config, cfg, world, use_bf16, trained=False)
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
    """The frozen teacher's final hidden states [B, T, H] at the T target positions (see ExampleBuilder.collate)."""
    out = teacher_body(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                       position_ids=batch["teacher_position_ids"], use_cache=False)
    return out.last_hidden_state[:, -target_len:]
