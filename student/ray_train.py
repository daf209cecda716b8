"""Ray Train launch of the trainer, for cluster jobs (KubeRay RayJob, `ray job submit`).

`train_with_ray(...)` starts a `ray.train.torch.TorchTrainer` with one worker per GPU (or CPU
workers with gloo): Ray Train makes the process group and places the workers; each worker runs
the same `student.training.trainer.train` as under `torchrun` (DDP or FSDP2, checkpoints, exact `--resume`,
metrics.jsonl written by rank 0 into the shared run directory) and reports each step's metrics to
Ray Train. The run directory, store and model must be on storage every node sees.

Ray's own checkpoint handling is not used: resume is the trainer's (`RUN/checkpoints`), so a
Ray job and a torchrun job can continue each other's runs with the same number of workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from geovr.student.config import DataConfig, StudentConfig
from geovr.student.training.config import TrainConfig, TrainInputs
from geovr.student.training.trainer import train
from geovr.teacher_cache.config import from_dict, to_dict


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the trainer on this worker's rank of the group Ray Train made."""
    import ray.train
    import ray.train.torch
    import torch

    # The trainer picks cuda:LOCAL_RANK; Ray Train knows which of the visible GPUs is this worker's.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else None
    local_rank = device.index if device is not None else ray.train.get_context().get_local_rank()
    os.environ["LOCAL_RANK"] = str(local_rank)
    inputs = TrainInputs(**{k: Path(v) if k != "resume" else v for k, v in config["inputs"].items()})
    train(
        inputs,
        from_dict(TrainConfig, config["train"], where="train"),
        from_dict(DataConfig, config["data"], where="data"),
        from_dict(StudentConfig, config["student"], where="student"),
        on_step=lambda record: ray.train.report({k: v for k, v in record.items() if v is not None}),
    )


def train_with_ray(
    inputs: TrainInputs,
    cfg: TrainConfig,
    data_cfg: DataConfig,
    student_cfg: StudentConfig,
    num_workers: int,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
) -> dict[str, Any]:
    """Run the trainer on `num_workers` Ray Train workers of the connected Ray cluster (RAY_ADDRESS,
    or a local one); returns the run summary (RUN/summary.json). `use_gpu` None: GPUs when
    `train.device` is "cuda", or is "auto" and the cluster has GPUs."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    if use_gpu is None:
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    run_dir = inputs.run_dir.resolve()
    payload = {
        "inputs": {
            "store": str(inputs.store.resolve()),
            "qa": str(inputs.qa.resolve()),
            "model": str(inputs.model.resolve()),
            "run_dir": str(run_dir),
            "resume": inputs.resume,
        },
        "train": to_dict(cfg),
        "data": to_dict(data_cfg),
        "student": to_dict(student_cfg),
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent / f"{run_dir.name}.ray")),
    )
    trainer.fit()
    return json.loads((run_dir / "summary.json").read_text())
