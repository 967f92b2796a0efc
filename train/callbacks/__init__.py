"""The Lightning callbacks and loggers of a training run (train/trainer.py puts the callbacks on the Trainer, in
this order; train/job.py adds the run's own checkpoint, evaluation and preemption callbacks between the guard and the
progress bar):

- `StepSeed` (rng.py): reseeds torch before every micro-batch from (seed, rank, index), so dropout masks do not
  depend on what ran before; `RNGState` (rng.py): every RNG state in each checkpoint, restored on resume.
- `Throughput` (throughput.py): tokens/s over each logging interval, and MFU on known GPUs.
- `LossGuard` (train/trainer.py, with the Trainer it guards): skips non-finite updates, rolls loss spikes back to
  the last checkpoint; `ValidateLastStep` (train/trainer.py): the last step validates inside fit.
- `HarnessEval` (train/eval/evaluate.py), `BestCheckpoint` and `StepCheckpoint` (train/checkpoint/callbacks.py).
- `LostRank` (ranks.py): a rank that died, named in the error with the resume command.
- `Preemption` (preemption.py): SIGUSR1 / SIGTERM -> a checkpoint at the next step boundary, stop, SLURM requeue.
- `StepProgressBar` (progress.py): Lightning's bar, counting optimizer steps.
- loggers.py: run_dir/metrics.csv (always), W&B and TensorBoard (the logger group).
"""
