"""torch state dict <-> Flax variables, one rule per layer kind, every key and shape checked.

Rules (torch tensor name -> Flax collection/leaf, layout change):

* conv:   weight [O, I, kh, kw] -> params/kernel [kh, kw, I, O]; bias -> params/bias
* linear: weight [O, I] -> params/kernel [I, O]; bias -> params/bias
* bn:     weight -> params/scale, bias -> params/bias, running_mean -> batch_stats/mean,
          running_var -> batch_stats/var; num_batches_tracked is dropped (Flax has no counter)

All layout changes are transposes, so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dlassign.errors import PortingError
from dlassign.models import TorchEntry, architecture, architectures, get_model


@dataclasses.dataclass(frozen=True)
class Rule:
    suffix: str
    collection: str
    leaf: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


_same = lambda a: a
RULES = {
    "conv": [Rule("weight", "params", "kernel", lambda w: np.transpose(w, (2, 3, 1, 0)),
                  lambda k: np.transpose(k, (3, 2, 0, 1))),
             Rule("bias", "params", "bias", _same, _same)],
    "linear": [Rule("weight", "params", "kernel", lambda w: np.transpose(w),
                    lambda k: np.transpose(k)),
               Rule("bias", "params", "bias", _same, _same)],
    "bn": [Rule("weight", "params", "scale", _same, _same),
           Rule("bias", "params", "bias", _same, _same),
           Rule("running_mean", "batch_stats", "mean", _same, _same),
           Rule("running_var", "batch_stats", "var", _same, _same)],
}
DROPPED = {"bn": ("num_batches_tracked",)}


def table(arch: str) -> list[TorchEntry]:
    """The torch name table an architecture declares (`models.registry.Architecture`).

    Raises:
      PortingError: the architecture has no torch counterpart.
    """
    spec = architecture(arch)
    if not spec.portable:
        portable = ", ".join(n for n, a in architectures().items() if a.portable)
        raise PortingError(f"architecture {arch!r} has no torch name table; portable "
                           f"architectures: {portable}")
    return spec.torch_table()


def _input_side(arch: str) -> int:
    return architecture(arch).smallest_input()


def target_shapes(arch: str, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {(collection, *module path, leaf): shape} of a model's variables (no compute)."""
    model = get_model(arch, num_classes=num_classes)
    size = _input_side(arch)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, size, size, 3))))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}


@dataclasses.dataclass(frozen=True)
class Mapping:
    torch_key: str
    flax_key: tuple[str, ...]
    rule: Rule
    head: bool


def mappings(arch: str, shapes: dict[tuple[str, ...], tuple[int, ...]]
             ) -> tuple[list[Mapping], set[str]]:
    """Every tensor mapping of an architecture, and the torch keys that are dropped."""
    out, dropped = [], set()
    for entry in table(arch):
        for rule in RULES[entry.kind]:
            key = (rule.collection, *entry.flax, rule.leaf)
            if key in shapes:  # e.g. ResNet convs have no bias
                out.append(Mapping(f"{entry.torch}.{rule.suffix}", key, rule, entry.head))
        dropped.update(f"{entry.torch}.{s}" for s in DROPPED.get(entry.kind, ()))
    covered = {m.flax_key for m in out}
    uncovered = sorted("/".join(k) for k in shapes if k not in covered)
    if uncovered:  # a table bug, not a user error
        raise AssertionError(f"name table for {arch} misses Flax variables {uncovered[:5]}")
    return out, dropped


def _list(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def guess_architecture(keys: set[str]) -> str | None:
    """The architecture whose torch names match `keys` best, or None."""
    best, best_score = None, 0.0
    for arch in (n for n, a in architectures().items() if a.portable):
        expected, dropped = mappings(arch, target_shapes(arch, 10))
        names = {m.torch_key for m in expected} | dropped
        score = len(names & keys) / len(names | keys)
        if score > best_score:
            best, best_score = arch, score
    return best if best_score > 0.5 else None


def torch_to_flax(state_dict: dict[str, np.ndarray], arch: str, num_classes: int | None = None,
                  replace_head: bool = False, rng: jax.Array | None = None) -> dict:
    """Converts a torchvision (or LeNet-5) state dict into Flax `{"params", "batch_stats"}`.

    Args:
      state_dict: torch names to numpy arrays (see `io.read_state_dict`).
      arch: an architecture with a torch name table.
      num_classes: classes of the Flax model; default: the checkpoint's head size.
      replace_head: allow the head's shape to differ (a 1000-class ImageNet head into a 10-class
        model); the head is then freshly initialised. Nothing else may differ.
      rng: key for the replaced head's initialisation.

    Returns:
      Variables as numpy arrays, in the state dict's dtype.

    Raises:
      PortingError: missing or unexpected keys (with the architecture they look like), or a
        shape that differs, naming the key and both shapes.
    """
    keys = set(state_dict)
    head_keys = [m for m in mappings(arch, target_shapes(arch, 10))[0] if m.head]
    if num_classes is None:
        weight = next((m.torch_key for m in head_keys if m.rule.suffix == "weight"), None)
        if weight not in state_dict:
            raise PortingError(f"state dict has no {weight!r}; it is not a {arch} checkpoint"
                               + _guess_hint(keys, arch))
        num_classes = int(np.shape(state_dict[weight])[0])
    shapes = target_shapes(arch, num_classes)
    maps, dropped = mappings(arch, shapes)
    expected = {m.torch_key for m in maps}
    missing, unexpected = expected - keys, keys - expected - dropped
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
        raise PortingError(f"state dict does not fit {arch}: {'; '.join(parts)}"
                           + _guess_hint(keys, arch))
    flat, replaced = {}, []
    for m in maps:
        value = np.asarray(state_dict[m.torch_key])
        want = shapes[m.flax_key]
        if value.ndim != len(want):
            want_torch = m.rule.to_torch(np.empty(want, np.int8)).shape
            raise PortingError(f"{m.torch_key}: checkpoint has a {value.ndim}-d tensor of shape "
                               f"{tuple(value.shape)}, {arch} needs {len(want)}-d "
                               f"{tuple(want_torch)}")
        converted = m.rule.to_flax(value)
        if converted.shape != want:
            if m.head and replace_head:
                replaced.append(m.flax_key)
                continue
            want_torch = m.rule.to_torch(np.empty(want, np.int8)).shape
            hint = (" (the classification head: pass replace_head=True / --replace_head to "
                    "re-initialise it for a new class count)" if m.head else "")
            raise PortingError(f"{m.torch_key}: checkpoint has shape {tuple(value.shape)}, "
                               f"{arch} with {num_classes} classes needs {tuple(want_torch)}"
                               f"{hint}")
        flat[m.flax_key] = converted
    if replaced:
        model = get_model(arch, num_classes=num_classes)
        size = _input_side(arch)
        fresh = traverse_util.flatten_dict(jax.jit(model.init)(
            rng if rng is not None else jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
        dtype = np.asarray(next(iter(state_dict.values()))).dtype
        for key in replaced:
            flat[key] = np.asarray(fresh[key]).astype(dtype)
    variables = traverse_util.unflatten_dict(flat)
    variables.setdefault("batch_stats", {})
    return variables


def _guess_hint(keys: set[str], arch: str) -> str:
    guess = guess_architecture(keys)
    return f"; the keys look like a {guess} checkpoint" if guess and guess != arch else ""


def flax_to_torch(variables: dict, arch: str, num_batches_tracked: int = 0
                  ) -> dict[str, np.ndarray]:
    """The reverse export: Flax variables to a torch state dict (numpy arrays, torch names).

    BatchNorm layers get a `num_batches_tracked` entry (int64) so that torch's strict
    `load_state_dict` accepts the result.
    """
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}
    shapes = {k: v.shape for k, v in flat.items()}
    maps, dropped = mappings(arch, shapes)
    out = {}
    for m in maps:
        out[m.torch_key] = np.ascontiguousarray(m.rule.to_torch(flat[m.flax_key]))
    for key in sorted(dropped):
        out[key] = np.asarray(num_batches_tracked, np.int64)
    return out
