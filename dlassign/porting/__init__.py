"""torchvision checkpoints into Flax variables and back, through explicit name tables."""

from dlassign.porting.convert import flax_to_torch, guess_architecture, torch_to_flax
from dlassign.porting.io import (
                                 read_state_dict,
                                 torchvision_state_dict,
                                 unwrap_state_dict,
                                 write_state_dict,
)
from dlassign.porting.tables import TABLES, Entry, table

__all__ = ["TABLES", "Entry", "flax_to_torch", "guess_architecture", "read_state_dict",
           "table", "torch_to_flax", "torchvision_state_dict", "unwrap_state_dict",
           "write_state_dict"]
