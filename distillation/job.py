"""What one training stage asks of the workers, as plain JSON-able data.

The driver writes it; every backend (in-process, torchrun, Ray) hands the same
dict to ``trainer.train_worker``, so the three run the identical loop.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainJob:
    stage: str
    stage_dir: str
    init_dir: str                  # the student this stage starts from
    data_file: str                 # torch file: list of examples (see tokens.py)
    objective: Literal["kd", "dpo"]
    teacher_dir: str | None = None  # kd: the teacher
    ref_dir: str | None = None      # dpo: the frozen reference
    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 0
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    length_grouping_steps: int = 0  # see trainer.batch_indices
    data_start: int = 0            # walk position of step 0 (an earlier stage's data_end)
    pad_id: int = 0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    kl_direction: str = "forward"
    beta: float = 0.1               # dpo: trl's loss (losses.dpo_loss_sums)
    dpo_loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    freeze_mlp: bool = False
    freeze_embeddings: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    dtype: str = "float32"         # compute dtype: bfloat16 = autocast, float32 master weights
    compile: bool = False          # torch.compile the decoder layers (trainer.compile_layers)
    pad_multiple: int = 0          # compiled: pad to a multiple of this (0: to max_length)
    device: str = "cpu"
    strategy: str = "ddp"
    seed: int = 0
    threads: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
