"""The methods of steps 2, 3 and 8 as data: each method module declares a Method (its flags, how they become
its options, its checks, its summary line); a step 2 method's options declare what its plan needs and
make it, a step 3 method's options dataclass declares the pass it contributes; this module composes
them, so the pipeline and the CLI hold no if/elif per method.

    registry = Registry.builtin()                          # allocation, ..., decompose, ..., refine, quantize
    registry.add_flags(parser, groups, "decomposition")    # the CLI's argument groups (compress.py)
    values = registry.resolve(flag_values)                 # checks, defaults that depend on other flags
    allocation = registry.allocation(values)               # step 2: the --allocation method's options
    plan = allocation.make_plan(plan_inputs)               # given what it declared it needs (compress.py)
    chosen = registry.options(values)                      # step 3: the chosen methods' options, in walk order
    passes = [o.make_pass(inputs) for o in chosen]         # what pipeline.steps.compress_model walks

A new method is one module: its options (an AllocationOptions with make_plan, or a MethodOptions
dataclass with make_pass), its Method, and one entry in builtin_methods() (or
Registry.builtin().with_method(...) without touching this file).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from methods.method import (AllocationOptions, Flag, FlagError, Method, MethodOptions, PassInputs,  # noqa: F401
                            PlanInputs, no_check)  # (re-exported)


def builtin_methods() -> tuple[Method, ...]:
    """Step 2's flags (the sizes and allocation first: other checks read them), then its allocation
    methods in --allocation's order; step 3's methods in walk order: decomposition, update (closed form
    or anchored), refinement; then step 8's quantization."""
    from methods import allocation, anchored, closed_form, decompose, quantize, refine, sensitivity
    return (allocation.METHOD, sensitivity.METHOD,
            allocation.UNIFORM, sensitivity.ASVD, allocation.V2_METHOD, sensitivity.DUO,
            decompose.METHOD, closed_form.METHOD, anchored.METHOD, refine.METHOD, quantize.METHOD)


@dataclass(frozen=True)
class Registry:
    methods: tuple[Method, ...]

    @classmethod
    def builtin(cls) -> "Registry":
        return cls(builtin_methods())

    def with_method(self, method: Method) -> "Registry":
        """This registry and `method` after its methods (its pass runs after theirs in the walk)."""
        if any(m.name == method.name for m in self.methods):
            raise ValueError(f"a method named {method.name!r} is already registered")
        return Registry(self.methods + (method,))

    def _choices(self, flag: Flag) -> tuple | None:
        if not flag.selects:
            return None
        return (("none",) if flag.offers_none else ()) + tuple(m.name for m in self.methods if m.selector == flag.dest)

    def group_titles(self) -> list[str]:
        """The argument groups the methods' flags go to, in the order they first appear."""
        titles: list[str] = []
        for method in self.methods:
            for flag in method.flags:
                if flag.group not in titles:
                    titles.append(flag.group)
        return titles

    def add_flags(self, parser: argparse.ArgumentParser, groups: dict, title: str | None = None) -> None:
        """Add the flags of argument group `title` (groups[title], made when missing), in registry
        order; title None: every group not in `groups` yet, each made after the ones before it."""
        titles = [title] if title is not None else [t for t in self.group_titles() if t not in groups]
        for name in titles:
            if name not in groups:
                groups[name] = parser.add_argument_group(name)
            for method in self.methods:
                for flag in method.flags:
                    if flag.group == name:
                        flag.add_to(groups[name], self._choices(flag))

    def resolve(self, values: dict) -> dict:
        """The flag values (a plain dict) after every method's check, with what they resolve (a default
        that depends on another flag) filled in; FlagError on the first bad one."""
        values = dict(values)
        for method in self.methods:
            values.update(method.check(values))
        return values

    def options(self, values: dict, step: int = 3) -> list:
        """The options of the chosen methods of `step`, in walk order, from resolved flag values."""
        chosen = [m.options(values) for m in self.methods if m.step == step and m.chosen(values)]
        return [o for o in chosen if o is not None]

    def allocation(self, values: dict):
        """The options of step 2's allocation method that --allocation chooses (methods.method
        .AllocationOptions), from resolved flag values."""
        chosen = self.options(values, step=2)
        if len(chosen) != 1:
            raise ValueError(f"--allocation {values.get('allocation')} chooses {len(chosen)} registered "
                             f"allocation methods; register exactly one under that name")
        return chosen[0]

    def record_defaults(self) -> dict:
        defaults: dict = {}
        for method in self.methods:
            defaults.update(method.record_defaults)
        return defaults

    def method_name(self, record: dict) -> str:
        """The name of what step 3 did, from its record: each method's label in order (svd-llm+closed_form)."""
        return "".join(m.label(record) for m in self.methods if m.label is not None)

    def summary_lines(self, compression: dict) -> list[str]:
        lines = [m.summary(compression) for m in self.methods if m.summary is not None]
        return [line for line in lines if line]
