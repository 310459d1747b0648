"""Ray jobs and batch commands, one verb per module: ``python -m pipelines.<verb> --config ...``."""
