"""mixrobust's Hydra sweeper plugin (``hydra/sweeper: checked``): the basic sweeper, checking every job first."""
