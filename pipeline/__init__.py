"""The step drivers: what compress.py's steps call, above the methods (methods/) and below the CLI.

pipeline/steps.py profiles and compresses; pipeline/session.py holds what chained steps hand each
other (Session) and loads a step's model (ensure_model). Imports run one way: compress.py and the
other top-level modules -> pipeline -> methods -> utils -> component -> gptq, with no cycle and
nothing importing compress.py (tests/test_imports.py).
"""
