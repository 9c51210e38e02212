"""Named extension points: a decorator that registers, a lookup that lists.

  REWARDS = registry.Registry("reward", "rl.rewards", "rewards.REWARDS")

  @REWARDS.register("brevity")
  def brevity(responses, spec, **options): ...

  REWARDS.get("brevity")   # KeyError naming every registered reward

Rewards (`faithful_rl.rewards.REWARDS`, `rl.rewards`), dataset formats
(`faithful_rl.data.formats.FORMATS`, `data.format`) and losses
(`faithful_rl.losses.registry`, `rl.loss`, `rl.ease.loss`) are chosen by
name this way, so a new one is a file that registers itself (imported
before training) and its name in a config.
"""

from __future__ import annotations

from typing import Callable


class Registry:
  """Functions by name, for one kind of extension point.

  Args:
    kind: what the entries are ("reward"), for error messages.
    key: the config key that names them ("rl.rewards"), for error messages.
    where: the registry's import path, for error messages.
  """

  def __init__(self, kind: str, key: str, where: str):
    self.kind, self.key, self.where = kind, key, where
    self._entries: dict[str, Callable] = {}

  def register(self, name: str, fn: Callable | None = None):
    """Registers `fn` under `name` (as a decorator when `fn` is None).

    Registering a name again replaces the earlier entry (a notebook may
    re-run its cell).
    """

    def add(f: Callable) -> Callable:
      self._entries[name] = f
      return f

    return add if fn is None else add(fn)

  def get(self, name: str) -> Callable:
    """The entry registered under `name`; a KeyError lists the known ones."""
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(
          f"no {self.kind} named {name!r} ({self.key}); registered:"
          f" {self.names()}. Register one with {self.where}.register(name)"
          " before training."
      ) from None

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
