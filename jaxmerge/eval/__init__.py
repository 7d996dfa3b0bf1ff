"""Tasks, prompts and metrics: what a merge is scored on."""
