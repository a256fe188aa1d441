"""The DDP helper: which rank this process is, and the process group it may own (torchrun sets the env)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    owns_group: bool = False  # this call created the process group, so it destroys it at the end

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.enabled:
            dist.all_reduce(t)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_pref: str) -> tuple[DistEnv, torch.device]:
    """(rank info, this rank's device). Not launched by torchrun (or one rank): no process group."""
    env_ws = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and env_ws > 1
    if device_pref == "auto":
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_type = torch.device(device_pref).type
    if not launched:
        return DistEnv(), torch.device(device_pref if device_pref != "auto" else dev_type)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev_type == "cuda" else "gloo")
        owns = True
    d = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, enabled=True,
                owns_group=owns)
    if dev_type == "cuda":
        torch.cuda.set_device(local)
        return d, torch.device("cuda", local)
    return d, torch.device("cpu")
