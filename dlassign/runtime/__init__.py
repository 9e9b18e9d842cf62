"""Where runs execute: the device mesh, host settings, checkpoints, atomic files, failpoints."""
