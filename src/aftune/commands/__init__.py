"""The command layer: one module per `aftune` command, each a plain script over the library below it.

Commands read a config dataclass (aftune.config), check it, call the library, write their outputs and
return a summary; `aftune.cli` parses flags and prints. Nothing below this package imports from it.
"""
