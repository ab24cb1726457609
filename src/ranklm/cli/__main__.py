"""``python -m ranklm.cli`` (and ``torchrun --nproc-per-node N -m ranklm.cli compress ...``)."""

from . import entry

entry()
