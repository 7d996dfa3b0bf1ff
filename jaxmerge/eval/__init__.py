"""Tasks, prompts and metrics: what a merge is scored on. Metrics are looked up by name in
`jaxmerge.eval.metric_registry`, where `register_metric` adds new ones."""
