"""Stage 4: metrics against known deposits, comparison methods, targets and the report."""
