"""Training: the trainer and its components (plain step, checkpoints, metrics, validation, preemption) and
the dry run that plans a run without starting it."""
