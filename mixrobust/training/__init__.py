"""Training base classifiers: the LightningModule, the objectives (standard, PGD-AT, TRADES, Gaussian noise), optimizers."""
