"""The process group, through Lightning Fabric, and thin collectives for DDP and single runs alike.

``make_fabric`` builds a process's :class:`lightning_fabric.Fabric` (accelerator, devices,
nodes, strategy, precision) and joins the process group that ``--devices N``, ``torchrun`` or
SLURM started; a run builds one (:func:`medcore.cli.run_setup.start_run`) and hands it to its
Trainers. Every collective here puts its tensor on the device the process group needs (CUDA
for NCCL), never a host tensor.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from medcore.config import TrainerConfig

if TYPE_CHECKING:
    from lightning_fabric import Fabric


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def process_rank() -> int:
    """This process's rank, also before the process group is joined (the launcher's
    environment: ``RANK``, SLURM's ``SLURM_PROCID``); cheap enough for a signal handler."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def cleanup_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """The device a tensor must be on for this process group's collectives (CUDA for NCCL)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_world() -> tuple[int, int, int]:
    """(world size, local world size, node count) that a launcher put in the environment:
    ``--devices N`` (medcore.cli.launch), torchrun or SLURM; ``(1, 1, 1)`` in a plain process."""
    if "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    ):
        world = int(os.environ["SLURM_NTASKS"])
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
        return world, max(1, world // nodes), nodes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 1, 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return world, local, max(1, world // local)


def fabric_precision(device: torch.device, trainer: TrainerConfig) -> str:
    """Fabric's precision string for a device: ``trainer.precision`` when set, else from the
    AMP fields.

    bf16-mixed where the device supports it, 16-mixed (with a GradScaler) otherwise, 32-true
    when AMP is off; CPU autocast is opt-in (``amp_dtype: bf16``).
    """
    from medcore.runtime.device import amp_policy

    if trainer.precision is not None:
        return trainer.precision
    policy = amp_policy(device, trainer.amp, trainer.amp_dtype)
    if not policy.enabled:
        return "32-true"
    return "bf16-mixed" if policy.dtype == torch.bfloat16 else "16-mixed"


def make_fabric(device: torch.device, trainer: TrainerConfig | None = None) -> Fabric:
    """A Fabric on ``device`` with the strategy and precision of ``trainer`` (a config's
    ``trainer:`` section; the defaults when None), joined to the launched process group, if any.

    The world comes from the environment (``launched_world``); an already initialised process
    group (a test harness) is joined as it is.
    """
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy, FSDPStrategy

    trainer = trainer or TrainerConfig()
    strategy: Any = trainer.strategy
    world, local, nodes = launched_world()
    if is_initialized() and world <= 1:
        world, local, nodes = dist.get_world_size(), dist.get_world_size(), 1
    if world > 1:
        if strategy == "fsdp":
            strategy = FSDPStrategy(state_dict_type="full")
        else:
            strategy = DDPStrategy(
                find_unused_parameters=trainer.find_unused_parameters,
                timeout=datetime.timedelta(seconds=600),
            )
        devices: Any = local
    else:
        if strategy == "fsdp":
            # FSDP over one device shards nothing: a plain single-device job, said out loud.
            print(
                "note: trainer.strategy=fsdp with one process: nothing to shard, "
                "training on one device (use --devices N)",
                file=sys.stderr,
            )
        strategy = "auto"
        devices = [device.index or 0] if device.type == "cuda" else 1
    fabric = Fabric(
        accelerator=device.type,
        devices=devices,
        num_nodes=nodes,
        strategy=strategy,
        precision=fabric_precision(device, trainer),  # type: ignore[arg-type]
    )
    fabric.launch()
    return fabric


def is_fsdp(fabric: Fabric) -> bool:
    """Whether ``fabric`` shards the model (FSDP over more than one process)."""
    from lightning_fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (returns ``value`` itself in a single process)."""
    if not is_initialized():
        return value
    out = value.detach().to(collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / get_world_size()).to(value.device)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (e.g. rank 0's evaluation metrics)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own slice.

    torch.distributed.all_gather cuts the graph; contrastive losses need gradients to flow
    back through the gathered features (each rank's loss touches every rank's features).
    The backward all-reduces the incoming gradients so every rank receives the sum of the
    contributions its features made to all ranks' losses.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [b, ...] from all ranks along dim 0, keeping the autograd graph."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)
