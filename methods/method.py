"""What a method declares (methods/registry.py composes them): its flags (Flag), how they become its
options and its checks (Method), and for a step 3 method the options dataclass that builds its pass
(MethodOptions, given the PassInputs). Below every method module and the registry, which import it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class FlagError(ValueError):
    """Flag values that do not fit together (one line naming the problem and the fix)."""


@dataclass(frozen=True)
class Flag:
    """One command-line flag, as argparse's add_argument takes it. names: the flag, then its aliases
    (the names the original repositories use). selects: a flag choosing among the methods whose
    Method.selector is its dest; its choices are "none" and their names, in registry order."""
    names: tuple[str, ...]
    dest: str
    group: str  # the argument group's title
    help: str = ""
    default: Any = None
    type: Callable | None = None
    choices: tuple | None = None
    action: str | None = None  # "store_true" for on/off flags
    metavar: str | None = None
    selects: bool = False

    def add_to(self, group, choices: tuple | None = None) -> None:
        keywords: dict[str, Any] = {"dest": self.dest, "default": self.default, "help": self.help}
        if self.action is not None:
            keywords["action"] = self.action
        for key, value in (("type", self.type), ("choices", choices or self.choices), ("metavar", self.metavar)):
            if value is not None:
                keywords[key] = list(value) if key == "choices" else value
        group.add_argument(*self.names, **keywords)


def no_check(values: dict) -> dict:
    return {}


@dataclass(frozen=True)
class Method:
    """A method of step 3. options: the flag values (a plain dict) -> its options; called only when
    the method is chosen (its selector flag names it, or it has no selector). check: the flag values
    -> the values it resolves (defaults that depend on other flags), raising FlagError on bad input;
    it runs whether or not the method is chosen (its own flags given without it are refused there).
    summary: the saved compression block -> the line step 3 prints for it (None: nothing). record_defaults:
    the fields every compression record has, None when the method did not run."""
    name: str
    flags: tuple[Flag, ...] = ()
    options: Callable[[dict], Any] | None = None
    check: Callable[[dict], dict] = no_check
    selector: str | None = None  # dest of the flag that chooses it (--update closed_form)
    step: int = 3  # the step whose options it gives (step 3: a pass of compress_model)
    summary: Callable[[dict], str | None] | None = None
    label: Callable[[dict], str] | None = None  # the record -> its part of the method's name ("+closed_form")
    record_defaults: dict = field(default_factory=dict)

    def chosen(self, values: dict) -> bool:
        return self.options is not None and (self.selector is None or values.get(self.selector) == self.name)


@dataclass
class PassInputs:
    """What the passes of one step 3 share: the plan, step 1's statistics (or None) and the records
    they fill (per module, per layer)."""
    plan: Any
    stats: Any = None
    records: dict = field(default_factory=dict)
    layer_records: dict = field(default_factory=dict)


class MethodOptions:
    """What the pipeline asks of a method's options dataclass (defaults: a pass that needs no windows).
    slot: its key in pipeline.steps.CompressOptions and in the compression record; role: its name in
    messages ("the update")."""
    slot = ""
    role = ""

    @property
    def windows_needed(self) -> int:
        """Calibration windows the walk must carry for this pass (0: none)."""
        return 0

    def heldout_positions(self) -> list[int]:
        """Positions, among the carried windows, of those this pass only measures on."""
        return []

    @property
    def walk_label(self) -> str | None:
        """What the walk's progress line adds for this pass ("closed_form" -> compress+closed_form)."""
        return None

    def record_fields(self, records: dict, layer_records: dict) -> dict:
        """Fields of the compression record this pass adds once the walk is done."""
        return {}

    def to_dict(self) -> dict:
        raise NotImplementedError

    def make_pass(self, inputs: PassInputs):
        """The pass over the layer walk (utils.layerwise) these options configure."""
        raise NotImplementedError
