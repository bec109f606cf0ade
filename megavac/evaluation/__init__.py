"""Evaluation: consolidation of sharded checkpoints, batched beam search, sacrebleu scoring."""
