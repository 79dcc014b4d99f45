"""Self-describing checkpoints: a checkpoint alone rebuilds the classifier it was trained as.

Lightning checkpoints written by `ClassifierModule` carry, under the key ``"mixrobust"``, a plain
record (only strings, numbers, lists and dicts)::

    {"format": 1, "model": {arch, num_classes, input_shape, mean, std, kwargs},
     "objective": {name, ...}, "threat": {norm, eps, step_size} | None, "sigma": float | None,
     "data": "digits" | ... | None, "optimizer": {name, lr, weight_decay, ...} | None,
     "max_epochs": int | None, "split": {seed, val_size} | None}

and the weights under ``state_dict`` with the prefix ``model.``. ``optimizer``, ``max_epochs`` and
``split`` (the validation images the run held out of the training split) are optional (older records
lack them).

Guarantees:

- Files are read with ``torch.load(weights_only=True)``: a checkpoint never executes pickled code.
- Every way a file can be bad (missing, a directory, empty, truncated, corrupt, pickled objects,
  foreign content, an invalid record, weights that do not fit the record) raises ONE
  `CheckpointError` whose message names the file, says what is wrong and how to fix it.
- `read_checkpoint`, `read_record`, `load_classifier` and `check_resume` only ever return a
  checkpoint whose record passed `validate_record`.
"""

from mixrobust.checkpoint.files import freeze, load_classifier, read_checkpoint, read_record
from mixrobust.checkpoint.record import CHECKPOINT_KEY, FORMAT_VERSION, make_record, optimizer_spec, validate_record
from mixrobust.checkpoint.resume import RESUME_KEYS, check_resume

__all__ = [
    "CHECKPOINT_KEY",
    "FORMAT_VERSION",
    "RESUME_KEYS",
    "check_resume",
    "freeze",
    "load_classifier",
    "make_record",
    "optimizer_spec",
    "read_checkpoint",
    "read_record",
    "validate_record",
]
