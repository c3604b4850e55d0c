"""The step drivers: what compress.py's steps call, above the methods (methods/) and below the CLI.

Imports run one way: compress.py -> pipeline -> methods -> utils, component, gptq (tests/test_imports.py).
"""
