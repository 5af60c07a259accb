"""Stage 5: wiring: stages, clusters, the command line."""
