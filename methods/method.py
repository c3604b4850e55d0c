"""What a method declares (methods/registry.py composes them): its flags (Flag), how they become its
options and its checks (Method); for a step 2 method the options that make its plan (AllocationOptions,
given the PlanInputs), for a step 3 method the options dataclass that builds its pass (MethodOptions,
given the PassInputs). Below every method module and the registry, which import it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class FlagError(ValueError):
    """Flag values that do not fit together (one line naming the problem and the fix)."""


@dataclass(frozen=True)
class Flag:
    """One command-line flag, as argparse's add_argument takes it. names: the flag, then its aliases
    (the names the original repositories use). selects: a flag choosing among the methods whose
    Method.selector is its dest; its choices are "none" (unless offers_none is False: one of them is
    always chosen) and their names, in registry order."""
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
    offers_none: bool = True

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
    """A method of step 2 (an allocation: options are AllocationOptions), 3 or 8. options: the flag values (a plain dict) -> its options; called only when
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
    step: int = 3  # the step whose options it gives (2: a plan, 3: a pass of compress_model, 8: quantization)
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


@dataclass
class PlanInputs:
    """What step 2's driver hands an allocation method: the model (weights loaded, on the CPU), the device
    to walk it on, and what the method's options declared they need: step 1's statistics (opened and
    checked against the model), the calibration windows, the sensitivity table (measured or reused).
    decompose: step 3's DecomposeOptions (what a search compresses its candidates with); windows_info:
    where the windows come from ({"dataset": ..., "seed": ...}) for the record."""
    model: Any
    device: Any
    stats: Any = None
    windows: Any = None
    table: Any = None
    decompose: Any = None
    windows_info: dict = field(default_factory=dict)


class AllocationOptions:
    """What step 2's driver asks of an allocation method's options (defaults: a plan from the model's
    shapes alone). The driver opens what they declare, calls make_plan, rounds the ranks
    (--rank_multiple) and saves the plan."""
    needs_stats = False  # step 1's statistics (PlanInputs.stats)
    needs_whitening = False  # ranks by whitened losses: refused with --whitening none

    @property
    def sensitivity(self) -> Any:
        """The sensitivity table it reads (methods.sensitivity.SensitivityOptions; None: none): measured
        by the driver, or reused from --sensitivity_path, and recorded in the plan's detail."""
        return None

    @property
    def windows_needed(self) -> int:
        """Calibration windows of --dataset it reads (0: none)."""
        return 0

    @property
    def window_len(self) -> int | None:
        """Tokens per window (None: --model_seq_len)."""
        return None

    def make_plan(self, inputs: PlanInputs) -> Any:
        """The plan (utils.plan.Plan, its detail what the record keeps); ValueError when the inputs
        cannot give one (the message says why)."""
        raise NotImplementedError
