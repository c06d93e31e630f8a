"""Turn the single-device `Transformer` into the training model, in torchtitan's fixed order:
activation checkpointing, then `torch.compile`, then FSDP2 sharding; then materialise the weights.

The model code knows nothing of this; each step here works block by block and keeps parameter names
unchanged, so checkpoints, Hugging Face export and `init_from` see the same names in every set-up.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moxin_lightning.model.transformer import Transformer


def checkpoint_activations(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's `forward` is replaced on the instance (not wrapped in another module), so names stay the same."""
    for block in model.blocks:
        forward = block.forward

        def checkpointed(*args: Any, _forward=forward, **kwargs: Any) -> torch.Tensor:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def compile_blocks(model: Transformer) -> None:
    """`torch.compile` each block: identical blocks share one compiled graph, and FSDP2 then shards
    compiled blocks (compiling whole sharded models breaks the graph at every all-gather)."""
    for block in model.blocks:
        block.compile()


def shard(model: Transformer, mesh: Any, param_dtype: torch.dtype | None) -> None:
    """FSDP2 `fully_shard` per block, then the root (embedding, final norm and head).

    `param_dtype` (bf16 when training bf16-mixed) is the dtype parameters are gathered in; gradients are
    reduced in fp32 and the sharded master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for index, block in enumerate(model.blocks):
        # the last block's parameters are gathered again right away by the backward pass: keep them
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(model.blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def initialise(model: Transformer, seed: int) -> None:
    """Random initial weights that depend only on (seed, parameter name).

    Each parameter's full tensor is drawn from its own generator and every rank keeps its shard of it, so
    1 process, 2 processes, DDP and FSDP2 all start from bit-identical weights."""
    for name, param in model.named_parameters():
        std = model.initial_std(name)
        full = torch.empty(param.shape, dtype=param.dtype, device="cpu")
        if std is None:
            full.fill_(1.0)
        else:
            generator = torch.Generator().manual_seed(_seed_for(seed, name))
            full.normal_(0.0, std, generator=generator)
        _copy_full_into(param, full)


def _copy_full_into(param: nn.Parameter, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param.data, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def load_full_state(model: Transformer, state: dict[str, torch.Tensor], *, distributed: bool) -> None:
    """Load a full (unsharded) state dict into a plain or sharded model.

    With several processes only rank 0 needs to hold `state` (others pass {}): it is broadcast shard by shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=distributed)
    set_model_state_dict(model, state, options=options)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on the CPU (a collective when the model is sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Within: every FSDP2-sharded module of `model` holds its full weights and forwards without collectives.
    Afterwards: resharded, and FSDP2's records of the forwards run within cleared. A no-op without FSDP2.

    WHY: a sharded block gathers its weights in each forward, a collective every rank must join. Decoding and
    evaluation run a number of forwards that depends on each rank's data (rollouts end at different lengths), so
    inside them ranks would wait on each other's all-gathers forever. Gathered once up front, they run alone; each
    rank holds the whole model meanwhile, as under DDP."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not sharded:
        yield
        return
    root = sharded[0]
    if not hasattr(root, "reset_iter_state"):
        raise RuntimeError(
            f"decoding or evaluating under FSDP2 needs FSDPModule.reset_iter_state, which torch {torch.__version__} "
            "lacks; upgrade torch or use DDP"
        )
    resharding = [_reshards_after_forward(module) for module in sharded]
    try:
        for module in sharded:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        yield
    finally:
        for module, reshard in zip(sharded, resharding, strict=True):
            module.set_reshard_after_forward(reshard, recurse=False)
        root.reset_iter_state()  # reshards every module, forgets the forwards run above (backward prefetch order)


def _reshards_after_forward(module: Any) -> bool:
    groups = module._get_fsdp_state()._fsdp_param_groups  # no public getter for the setting
    return any(group.post_forward_mesh_info is not None for group in groups)
