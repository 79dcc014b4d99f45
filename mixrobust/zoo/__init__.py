"""Bring your own models: RobustBench, timm, torchvision and plain weight files as g and h, offline.

See `mixrobust.zoo.sources` for the source syntax and file layout, `mixrobust.models.zoo` for the
networks, `mixrobust.zoo.weights` for how files are read (never executing pickled code).
"""

from mixrobust.zoo.sources import (
    KINDS,
    Source,
    ZooSettings,
    candidates,
    default_dir,
    describe,
    download,
    fit,
    load,
    load_model,
    locate,
    parse,
    summary,
)

__all__ = ["KINDS", "Source", "ZooSettings", "candidates", "default_dir", "describe", "download", "fit", "load",
           "load_model", "locate", "parse", "summary"]
