"""Several processes: DDP's two collectives done by hand (for stage 1, which backpropagates in
pieces and so is not wrapped in DDP), FSDP's gathered reads and sharded writes of the trainable
weights and optimizer state, and FSDP on CPU processes (which accelerate alone runs as DDP).

Under FSDP (``accelerate launch`` with a ``distributed_type: FSDP`` config) ``prepare`` shards
the model in place: its parameters become DTensors holding each process's shard. Reading them
whole (best weights, checkpoints) is then a collective every process joins.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from linearize.log import get_logger
from linearize.models.trainable import load_trainable_state, trainable_state

log = get_logger(__name__)


def broadcast_parameters(params: list[Tensor], accelerator: Accelerator) -> None:
    """Start every process from rank 0's values (what DDP does when it wraps a model)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().clone(), from_process=0))


def average_gradients(params: list[Tensor], accelerator: Accelerator) -> None:
    """Mean of each gradient over processes, in one flat all-reduce (what DDP does)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).to(p.dtype)


def is_sharded(accelerator) -> bool:
    """Whether ``accelerator.prepare`` shards the model (FSDP)."""
    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def full_state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one


def gathered_trainable(model: nn.Module, accelerator) -> dict[str, Tensor]:
    """:func:`trainable_state` on the main process, ``{}`` on the others. Under FSDP the shards
    are gathered: every process must call it."""
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=full_state_options(cpu_offload=True))  # main only
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return {n: full[n] for n in names} if accelerator.is_main_process else {}
    return trainable_state(model) if accelerator.is_main_process else {}


def gathered_optimizer_state(model: nn.Module, optimizer, accelerator) -> dict:
    """The optimizer's state dict (under FSDP gathered whole onto the main process, keyed by
    parameter name; every process must call it)."""
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, inner_optimizer(optimizer), options=full_state_options(cpu_offload=True))
    return optimizer.state_dict() if accelerator.is_main_process else {}


def load_trainable(model: nn.Module, tensors: dict[str, Tensor], accelerator) -> None:
    """:func:`load_trainable_state`; under FSDP each process keeps its shard of ``tensors``."""
    if not is_sharded(accelerator):
        load_trainable_state(model, tensors)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}")
    set_model_state_dict(model, tensors, options=full_state_options(strict=False))


def fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Honour an FSDP launch config when the processes run on CPU.

    accelerate (1.15, ``AcceleratorState.__init__`` in accelerate/state.py) sets
    ``distributed_type = FSDP`` only inside its branch for GPU-like types (MULTI_GPU, MULTI_XPU,
    MULTI_NPU, ...), not MULTI_CPU: a CPU launch with ``distributed_type: FSDP`` silently trains
    under DDP. torch's FSDP2 (``fully_shard``) runs on CPU with gloo, and accelerate's FSDP2
    ``prepare`` works there once the state says FSDP, so that is set here, as a GPU launch would.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants_fsdp or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise ValueError(
            "an FSDP launch on CPU processes needs fsdp_config.fsdp_version: 2 (FSDP2, as in "
            "configs/accelerate/fsdp.yaml); FSDP1 is not supported here"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # Both singletons: every AcceleratorState() copies PartialState's shared fields over its own.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    log.info("FSDP2 on %d CPU processes (accelerate alone would run them as DDP)", accelerator.num_processes)
