"""Entry-point logic, importable and testable without Hydra: ``train.run(cfg)``, ``evaluate.run(cfg)``."""
