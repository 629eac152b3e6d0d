"""Two-stage training of mPLUG-Owl: per-stage optimizer masks, sharded steps, checkpoints, the loop."""
