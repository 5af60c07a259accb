"""Stage 3: sliding-window scoring and the writers of its outputs."""
