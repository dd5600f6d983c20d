"""The one YAML reader: configs (`--config`), experiment and arms study files, and task files.

A file is composed into YAML nodes with PyYAML's SafeLoader and the plain data is built from those nodes by
its safe constructors (no Python objects, exactly what `yaml.safe_load` returns). The nodes stay with the
data, so an error can name the true line of any key path: the key's own mark, not the first line that
happens to start with `key:` (a nested key of the same name written earlier cannot shadow it).

Hostile files are refused with one InputError naming the file before anything walks the data: a few
anchors and aliases that refer to each other ("billion laughs") describe billions of values in a few
lines, and anything that walks, copies or prints the data would expand them. Aliases are allowed
(`<<: *defaults` is useful in a study file) as long as the document they expand to stays small.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
    >>> _ = p.write_text("plan:\\n  lr: 0.1\\nlr: 3\\n")
    >>> doc = read_yaml(p)
    >>> doc.data, doc.line("lr"), doc.line("plan.lr")
    ({'plan': {'lr': 0.1}, 'lr': 3}, 3, 2)
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aftune.io import InputError

__all__ = ["MAX_DEPTH", "MAX_NODES", "YamlDoc", "read_yaml", "read_yaml_mapping"]

# Values (scalars, lists, mappings) a document may hold once its aliases are expanded. The largest file
# aftune ships holds a few hundred; a 9-level "billion laughs" holds 9^9.
MAX_NODES = 100_000
# Nesting levels; aftune's files use four or five.
MAX_DEPTH = 100
# libyaml's parser when PyYAML has it: the same nodes and marks, in C, and it bounds nesting itself. PyYAML's
# pure-Python scanner takes seconds on a few thousand nested brackets (and recurses in the composer).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_INDEX = re.compile(r"\[(\d+)\]")

Key = str | Sequence[str | int]


def _parts(key: Key) -> list[str]:
    """'grids[0].methods' -> ['grids', '0', 'methods']; a sequence is taken as the parts already."""
    if isinstance(key, str):
        return [p for p in _INDEX.sub(r".\1", key).split(".") if p != ""]
    return [str(p) for p in key]


@dataclass(frozen=True)
class YamlDoc:
    """A YAML file read by `read_yaml`: its plain data and where each key was written."""

    path: str  # as given: error messages quote it
    data: Any
    root: yaml.Node | None  # None for an empty file

    def line(self, key: Key) -> int | None:
        """The 1-based line of the key at `key` (dotted, `name[i]` for list items), or of its closest
        parent written in the file; None when not even its first part is.

        A part may itself hold dots (an arm named `a.b`): the longest run of parts that names a key wins.
        Keys compare as written, then with `-` read as `_` (flag names are accepted either way).
        """
        parts, node, line = _parts(key), self.root, None
        while parts and node is not None:
            found = _child(node, parts)
            if found is None:
                break
            node, mark_line, used = found
            line, parts = mark_line + 1, parts[used:]
        return line

    def error(self, key: Key, message: str) -> InputError:
        """An InputError naming the file, the line of `key` (or its closest parent) and the key."""
        field = key if isinstance(key, str) else ".".join(map(str, key))
        return InputError(message, self.path, self.line(key), field or None)


def _child(node: yaml.Node, parts: list[str]) -> tuple[yaml.Node, int, int] | None:
    """(child node, line of its key or item, parts used) for the first part(s) of `parts` under `node`."""
    if isinstance(node, yaml.SequenceNode):
        if parts[0].isdigit() and int(parts[0]) < len(node.value):
            item = node.value[int(parts[0])]
            return item, item.start_mark.line, 1
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    for used in range(len(parts), 0, -1):
        want = ".".join(parts[:used])
        for norm in (str, lambda s: s.replace("-", "_")):
            # reversed: with a repeated key the last one holds the value, as in the data
            for k, v in reversed(node.value):
                if isinstance(k, yaml.ScalarNode) and norm(str(k.value)) == norm(want):
                    return v, k.start_mark.line, used
    return None


def _too_deep(path: str) -> InputError:
    return InputError(f"refusing a file nested more than {MAX_DEPTH} levels deep", path)


def _check_size(root: yaml.Node, path: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH, whose aliases expand past MAX_NODES values, or whose
    aliases refer to a node that contains them."""
    sizes: dict[int, int] = {}  # id(node) -> expanded size; shared (aliased) nodes are counted once each
    open_: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise InputError("refusing a recursive alias (an anchor used inside its own value)", path)
        if depth > MAX_DEPTH:
            raise _too_deep(path)
        open_.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_NODES:
                raise InputError(
                    f"refusing a file whose anchors and aliases expand to more than {MAX_NODES:,} values "
                    "(a 'billion laughs' file?); write the values out instead",
                    path,
                )
        open_.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root, 0)


def read_yaml(path: str | os.PathLike, what: str = "file") -> YamlDoc:
    """Read a YAML file safely: one InputError naming the file (and line) for a missing, non-UTF-8,
    malformed or hostile file. `what` names the file in the "does not exist" message ("config file")."""
    shown = str(path)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} does not exist", shown)
    try:
        text = p.read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=_LOADER)
        if root is None:
            return YamlDoc(shown, None, None)
        _check_size(root, shown)
        # Built from the nodes just checked, by the safe constructors: what yaml.safe_load would return.
        data = yaml.SafeLoader("").construct_document(root)
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e})", shown) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or e
        raise InputError(f"not valid YAML ({problem})", shown, None if mark is None else mark.line + 1) from None
    except RecursionError:  # the pure-Python composer, before MAX_DEPTH could be checked
        raise _too_deep(shown) from None
    return YamlDoc(shown, data, root)


def read_yaml_mapping(path: str | os.PathLike, what: str = "file") -> YamlDoc:
    """`read_yaml` for a file that must hold a mapping of keys to values (an empty file is {})."""
    doc = read_yaml(path, what)
    if doc.data is None:
        return YamlDoc(doc.path, {}, None)
    if not isinstance(doc.data, dict):
        kind = type(doc.data).__name__
        raise InputError(f"expected a mapping of keys to values, got {kind}", doc.path)
    return doc
