"""A checkpoint that resumes at any world size: per trainable parameter its full fp32 master value and both
Adam moments, with the optimizer's step count, the LR schedule, each rank's RNG state and DeepSpeed's step
counters; nothing in it depends on how ZeRO partitioned the states (stage 0-3, any world size).

DeepSpeed's own checkpoint stores each rank's flat partition and refuses another data-parallel size; its
universal-checkpoint conversion is an offline step with open ZeRO-3 bugs. Here every state is gathered
through DeepSpeed's tensor-fragment API (``safe_get_full_*``), one parameter at a time, and set back the
same way into whatever partitions the new world has; ``verify`` then gathers again and compares bit for
bit before the first resumed step.

Files (in the checkpoint's directory): ``state.safetensors`` (rank 0: ``NAME``, ``NAME::exp_avg``,
``NAME::exp_avg_sq``), ``meta.json`` (rank 0), ``rng-RANK.safetensors`` (every rank). Frozen parameters
are not in it: they come again from the stage's start (the previous export, or the seeded build).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MOMENTS = ("exp_avg", "exp_avg_sq")
STATE, META = "state.safetensors", "meta.json"


class ReshardMismatch(RuntimeError):
    """A state read back after a resume differs from the checkpoint's."""


def _trainable(ds_model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in ds_model.module.named_parameters() if p.requires_grad]


def _partitioned(p) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _full(ds_model, p, key: str | None) -> torch.Tensor:
    """The full fp32 master value (key None) or moment of a parameter, on every rank (a collective under
    ZeRO-3: every rank calls it for the same parameters in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _partitioned(p):
        value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    else:  # no ZeRO partitioning: the parameter is its own master; the optimizer's state is keyed by it
        value = p.detach() if key is None else _base_optimizer(ds_model).state[p][key]
    return (
        value.detach()
        .to("cpu", torch.float32, copy=True)
        .reshape(p.ds_shape if hasattr(p, "ds_id") else p.shape)
    )


def _set(ds_model, p, key: str | None, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "ds_id"):
        _set_zero3(p, key, value)
        return
    if _partitioned(p):
        device = _base_device(ds_model)
        if key is None:
            safe_set_full_fp32_param(p, value.to(device))
        else:
            safe_set_full_optimizer_state(p, value.to(device), key)
        return
    if key is None:
        with torch.no_grad():
            p.copy_(value)
    else:
        _base_optimizer(ds_model).state[p][key].copy_(value)


def _set_zero3(p, key: str | None, value: torch.Tensor) -> None:
    """This rank's slice of a ZeRO-3 parameter's fp32 master (key None) or moment. DeepSpeed's own
    ``set_full_hp_param`` (0.19.8) slices the full value without its partition padding, so it fails for a
    parameter whose size the world size does not divide; the slice is taken here the way the gather
    (``_fp32_state_allgather``) lays it out: partition r holds elements [r*n, (r+1)*n), the tail padded.
    Private API of DeepSpeed 0.19.8: ``_get_fp32_opt_state_partition``, ``_get_param_partition_rank``."""
    optimizer = p._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    flat = value.flatten().to(part.device, part.dtype)
    start = part.numel() * optimizer._get_param_partition_rank(p)
    count = max(0, min(part.numel(), flat.numel() - start))
    part.data.zero_()
    part.data[:count].copy_(flat[start : start + count])


def _base_device(ds_model) -> torch.device:
    return ds_model.device


def _base_optimizer(ds_model):
    """The torch optimizer whose state holds Adam's step count (ZeRO wraps it; stage 0 may not)."""
    optimizer = ds_model.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _ensure_moments(ds_model) -> None:
    """Adam's state for every tensor the optimizer steps, zeros where it has none yet (torch creates it at
    a tensor's first step with a gradient: before a resume's first step, or a partition that has had no
    gradient), then DeepSpeed's ZeRO-1/2 links each parameter's fragment of it (its private
    ``_lazy_init_hp_params_optimizer_state``, DeepSpeed 0.19.8; ZeRO-3 reads the state directly)."""
    base, optimizer = _base_optimizer(ds_model), ds_model.optimizer
    # ZeRO-3 steps its flat fp32 partitions one sub-group at a time, putting each in the torch optimizer's
    # groups only for its step; ZeRO-1/2 and stage 0 keep theirs in the groups
    flat = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    for t in flat if flat is not None else [t for g in base.param_groups for t in g["params"]]:
        state = base.state[t]
        if "exp_avg" not in state:
            state["step"] = state.get("step", torch.tensor(0.0))
            for key in MOMENTS:
                state[key] = torch.zeros_like(t, memory_format=torch.preserve_format)
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _optimizer_step(ds_model) -> float:
    """Adam's step count (every tensor the optimizer steps has the same)."""
    return max(
        (float(s["step"]) for s in _base_optimizer(ds_model).state.values() if "step" in s), default=0.0
    )


@contextlib.contextmanager
def _gathered_weight(p, modify: bool):
    """The parameter's full model weight (ZeRO-3 gathers it; ``modify``: rank 0's change is kept)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0 if modify else None):
            yield p
    else:
        yield p


def save(ds_model, directory: str, step: int, rank: int, world: int, extra: dict | None = None) -> None:
    """Every rank: gather each trainable parameter's states (collectives), rank 0 writes them with the
    meta; every rank writes its RNG state."""
    _ensure_moments(ds_model)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _trainable(ds_model):
        states = {name: _full(ds_model, p, None), **{f"{name}::{k}": _full(ds_model, p, k) for k in MOMENTS}}
        if rank == 0:  # the others took part in the gathers only
            tensors.update(states)
    save_file({"cpu": torch.get_rng_state()}, os.path.join(directory, f"rng-{rank}.safetensors"))
    if rank != 0:
        return
    save_file(tensors, os.path.join(directory, STATE))
    schedule = ds_model.lr_scheduler.state_dict() if ds_model.lr_scheduler is not None else None
    meta = {
        "step": step,
        "world": world,
        "optimizer_step": _optimizer_step(ds_model),
        "schedule": {k: v for k, v in (schedule or {}).items() if k != "lr_lambdas"},
        "group_lrs": [g["lr"] for g in _base_optimizer(ds_model).param_groups],
        "global_steps": ds_model.global_steps,
        "global_samples": ds_model.global_samples,
        "parameters": [n for n, _ in _trainable(ds_model)],
        **(extra or {}),
    }
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f)


def load(ds_model, directory: str, rank: int) -> dict:
    """Every rank: set each trainable parameter's master value, model weight and moments from the full
    tensors (each rank keeps its own partition), the step counts, the schedule and this rank's RNG (rank r
    takes the saved rank r mod the saved world's). Returns the meta."""
    with open(os.path.join(directory, META)) as f:
        meta = json.load(f)
    _ensure_moments(ds_model)
    names = [n for n, _ in _trainable(ds_model)]
    if names != meta["parameters"]:
        missing = sorted(set(meta["parameters"]) ^ set(names))[:5]
        raise ReshardMismatch(
            f"{directory}: expected the checkpoint's {len(meta['parameters'])} trainable parameters, found "
            f"{len(names)} (differing: {missing})"
        )
    with safe_open(os.path.join(directory, STATE), framework="pt") as state:
        for name, p in _trainable(ds_model):
            value = state.get_tensor(name)
            for key in MOMENTS:
                _set(ds_model, p, key, state.get_tensor(f"{name}::{key}"))
            _set(ds_model, p, None, value)
            with _gathered_weight(p, modify=True), torch.no_grad():
                p.data.copy_(value.reshape(p.data.shape).to(p.dtype))
    for s in _base_optimizer(ds_model).state.values():
        if "step" in s:
            s["step"] = torch.full_like(torch.as_tensor(s["step"]), meta["optimizer_step"])
    if ds_model.lr_scheduler is not None and meta["schedule"]:
        ds_model.lr_scheduler.load_state_dict({**ds_model.lr_scheduler.state_dict(), **meta["schedule"]})
    for group, lr in zip(_base_optimizer(ds_model).param_groups, meta["group_lrs"], strict=True):
        group["lr"] = lr
    ds_model.global_steps, ds_model.global_samples = meta["global_steps"], meta["global_samples"]
    ds_model.micro_steps = meta["global_steps"] * ds_model.gradient_accumulation_steps()
    rng = os.path.join(directory, f"rng-{rank % meta['world']}.safetensors")
    with safe_open(rng, framework="pt") as f:
        torch.set_rng_state(f.get_tensor("cpu"))
    return meta


def verify(ds_model, directory: str, rank: int) -> None:
    """Every rank, after ``load`` and before the first resumed step: gather every state again and compare
    it with the checkpoint's, bit for bit (rank 0 compares; every rank takes part in the gathers). Raises
    ReshardMismatch naming the first state that differs."""
    with open(os.path.join(directory, META)) as f:
        meta = json.load(f)
    problems: list[str] = []
    with safe_open(os.path.join(directory, STATE), framework="pt") as state:
        for name, p in _trainable(ds_model):
            got = {None: _full(ds_model, p, None), **{k: _full(ds_model, p, k) for k in MOMENTS}}
            with _gathered_weight(p, modify=False):
                weight = p.data.detach().to("cpu", torch.float32, copy=True)
            if rank != 0:
                continue
            want = state.get_tensor(name)
            for key, value in got.items():
                label = name if key is None else f"{name}::{key}"
                if not torch.equal(value, state.get_tensor(label)):
                    problems.append(label)
            if not torch.equal(weight.reshape(want.shape), want.to(p.dtype).float()):
                problems.append(f"{name} (model weight)")
    with safe_open(os.path.join(directory, f"rng-{rank % meta['world']}.safetensors"), framework="pt") as f:
        if not torch.equal(torch.get_rng_state(), f.get_tensor("cpu")):
            problems.append(f"rank {rank}'s RNG state")
    if rank == 0:
        if _optimizer_step(ds_model) != meta["optimizer_step"]:
            problems.append(f"optimizer step {_optimizer_step(ds_model)} != {meta['optimizer_step']}")
        lrs = [g["lr"] for g in _base_optimizer(ds_model).param_groups]
        if lrs != meta["group_lrs"]:
            problems.append(f"learning rates {lrs} != {meta['group_lrs']}")
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        shared: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shared, problems)  # every rank stops, none waits in a step
        problems = [p for ranks in shared for p in ranks]
    if problems:
        raise ReshardMismatch(
            f"{directory}: after the resume at another world size, expected every state equal to the "
            f"checkpoint's (saved at world {meta['world']}), found {len(problems)} different: "
            f"{', '.join(problems[:5])}"
        )
