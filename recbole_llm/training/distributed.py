"""RecBole's distributed data-parallel training, for plugin models and on CPU processes too.

RecBole 1.2.1 launches DDP itself (``recbole.quick_start.run(..., nproc=N)``, ``world_size``, ``ip``,
``port``, ``group_offset``; each process gets ``local_rank``) but hard-codes the nccl backend and CUDA
devices, so nothing distributed runs without a GPU. With ``import recbole_llm``:

- ``dist_backend`` chooses the torch.distributed backend: ``nccl`` (GPU processes) or ``gloo`` (CPU
  processes). Left at None it is nccl when CUDA is available, else gloo. nccl is RecBole's own path,
  untouched; gloo builds the same process group over TCP and keeps every rank on the CPU;
- RecBole's ``DistributedDataParallel(model, device_ids=[local_rank])`` drops ``device_ids`` for a CPU
  module (torch refuses device ids there);
- processes that ``run`` spawns import recbole_llm before RecBole builds the model, so plugin models are
  known in every rank (``mp.spawn`` pickles the worker function by name: it is this module's).

The plugin trainer adds what its checkpoints need under DDP: every rank uses rank 0's checkpoint file name,
ranks wait for rank 0's save to finish before going on (RecBole lets rank 1 load the best model while rank
0 may still be writing it), and training ends with a check that all ranks hold identical trained weights.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("nccl", "gloo")


def backend_of(config_dict: dict) -> str:
    """The backend a run uses: ``dist_backend``, or nccl with CUDA and gloo without."""
    from recbole_llm.errors import ConfigError
    from recbole_llm.settings import choice

    chosen = config_dict.get("dist_backend")
    if chosen is None:
        return "nccl" if torch.cuda.is_available() and config_dict.get("use_gpu", True) else "gloo"
    try:
        return choice("dist_backend", chosen, BACKENDS)
    except ConfigError as error:
        raise ConfigError(f"{error} (nccl for GPU processes, gloo for CPU ones)") from None


def is_distributed(config) -> bool:
    return not config["single_spec"]


def run_recboles(rank, *args):
    """RecBole's per-process entry point for ``mp.spawn``, which pickles it by name: a new process imports
    this module, and with it ``recbole_llm``, whose import hook installs the plugin when RecBole is imported
    below, before RecBole builds any model."""
    from recbole.quick_start import quick_start  # noqa: F401  (installs the plugin in a fresh process)

    return run_recboles.__wrapped__(rank, *args)  # RecBole's own, kept there by recbole_llm.patches


def init_gloo_device(final: dict) -> bool:
    """RecBole's distributed set-up with the gloo backend (same rendezvous, ranks and bookkeeping as its
    nccl one) for ``Config._init_device``; False where RecBole's own set-up applies (one process, or nccl)."""
    if "local_rank" not in final or backend_of(final) == "nccl":
        return False
    rank = final["local_rank"] + final["offset"]
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="gloo", rank=rank, world_size=final["world_size"],
            init_method=f"tcp://{final['ip']}:{final['port']}",
        )
    if "OMP_NUM_THREADS" not in os.environ:  # ranks share this machine's cores, as torchrun arranges
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, final.get("nproc") or 1)))
    final["gpu_id"] = str(final["gpu_id"])
    final["device"] = torch.device("cpu")
    final["single_spec"] = False
    if final["local_rank"] != 0:
        final["state"] = "error"
        final["show_progress"] = False
        final["verbose"] = False
    return True


def cpu_aware_ddp(module, device_ids=None, **kwargs):
    """RecBole's ``DistributedDataParallel(model, device_ids=[local_rank])``, without device ids for a CPU
    module (torch refuses them there)."""
    from torch.nn.parallel import DistributedDataParallel

    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    return DistributedDataParallel(module, device_ids=None if on_cpu else device_ids, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# what the plugin trainer calls


def share_checkpoint_name(config, saved_model_file: str) -> str:
    """Rank 0's checkpoint file name on every rank (RecBole names it by each rank's clock)."""
    if not is_distributed(config):
        return saved_model_file
    names = [saved_model_file]
    torch.distributed.broadcast_object_list(names, src=0)
    return names[0]


def share_backbone_hash(config, model) -> None:
    """DDP copied rank 0's weights to every rank: its frozen backbone's hash is every rank's."""
    from recbole_llm.model.contract import PluginModel

    if not is_distributed(config) or not isinstance(model, PluginModel) or model.backbone_hash is None:
        return
    hashes = [model.backbone_hash]
    torch.distributed.broadcast_object_list(hashes, src=0)
    model.backbone_hash = hashes[0]


def wait_for_rank_zero(config) -> None:
    """All ranks wait here until rank 0 has finished writing."""
    if is_distributed(config):
        torch.distributed.barrier()


def check_replicas_in_sync(config, model, logger) -> None:
    """Raise unless every rank holds the same trained weights; rank 0 logs the check."""
    if not is_distributed(config):
        return
    from recbole_llm.errors import RecboleLLMError
    from recbole_llm.model.frozen import tensor_sha256

    trained = sorted((name, p) for name, p in model.named_parameters() if p.requires_grad)
    digest = tensor_sha256(trained)
    digests: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RecboleLLMError(f"DDP replicas diverged: trained weights differ between ranks ({digests})")
    if config["local_rank"] == 0:
        logger.info(f"DDP: trained weights identical on all {len(digests)} ranks "
                    f"({len(trained)} tensors, sha256 {digest[:16]})")
