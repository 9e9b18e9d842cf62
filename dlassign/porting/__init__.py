"""torchvision checkpoints into Flax variables and back, through the name tables that each
architecture declares beside its module (`dlassign.models`)."""

from dlassign.porting.convert import flax_to_torch, guess_architecture, table, torch_to_flax
from dlassign.porting.io import (
    read_state_dict,
    torchvision_state_dict,
    unwrap_state_dict,
    write_state_dict,
)

__all__ = ["flax_to_torch", "guess_architecture", "read_state_dict", "table", "torch_to_flax",
           "torchvision_state_dict", "unwrap_state_dict", "write_state_dict"]
