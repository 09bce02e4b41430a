"""Training: the loop (``loop``), its resumable state (``checkpoint``) and ``torchrun`` set-up (``distributed``)."""
from vitshrink.train.checkpoint import (CHECKPOINT_FORMAT, SUMMARY_COLUMNS, Checkpointing, load_checkpoint,
                                        save_checkpoint)
from vitshrink.train.distributed import Dist, init_distributed, select_device
from vitshrink.train.loop import Evaluation, Schedule, TrainEnv, TrainResult, evaluate_split, train, train_step

__all__ = ["CHECKPOINT_FORMAT", "SUMMARY_COLUMNS", "Checkpointing", "Dist", "Evaluation", "Schedule", "TrainEnv",
           "TrainResult", "evaluate_split", "init_distributed", "load_checkpoint", "save_checkpoint",
           "select_device", "train", "train_step"]
