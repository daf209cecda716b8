"""geovr.student.training: the trainer as components (torchtitan's manner), each in its own module.

config        `TrainConfig` (section `train`), `TrainInputs`
distributed   the process group and device (`DistEnv`), DDP / FSDP2 wrapping, gradient sync
optimizer     AdamW over the two parameter groups, the warmup + cosine schedule, grad clipping
state         resume state that saves and loads itself: counters, RNG states
checkpoint    training checkpoints: the student checkpoint plus optimizer and resume state
metrics       per-step statistics, their reduction over ranks, metrics.jsonl / TensorBoard / console
flops         model FLOPs of a step and the device peak (MFU)
damage        damaged samples of a step over all ranks, and the policy that stops a run
step          one optimizer step's forward/backward over this rank's micro-batches
trainer       `train()`: builds the components and runs the loop
"""
