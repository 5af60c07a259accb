"""Stage 1: inputs read onto one grid and written as a cube."""
