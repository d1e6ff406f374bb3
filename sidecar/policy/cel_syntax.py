"""What a CEL expression refers to, read from its syntax tree: variables and the fields it selects.

The CEL engine (``common-expression-language``) compiles an expression and lists the identifiers
of its syntax tree (``Program.variables()``), but not the tree itself: it cannot say which of them
a comprehension binds (the ``x`` of ``list.all(x, x > 0)``), nor which fields of a variable are
selected. So this module parses the expression into a small tree of its own (CEL's grammar:
literals of every quoting form, comments, members, indexes, calls, lists, maps, messages, every
operator) and walks it with the comprehensions' scopes. A name in a string literal or a comment
is no reference; a variable that a comprehension rebinds is still one where it is not bound.

The two parsers are kept honest against each other: :func:`references` returns every identifier
of its tree, and the caller refuses an expression whose identifiers differ from the engine's, so
an expression this parser reads differently from the engine is a load error, never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})  # receiver.macro(var, ...) binds var
_RAW = r'(?:[rR][bB]?|[bB][rR])(?:"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"[^"\n]*"|\'[^\'\n]*\')'
_COOKED = r'[bB]?(?:"""(?:\\[\s\S]|[^\\])*?"""|\'\'\'(?:\\[\s\S]|[^\\])*?\'\'\'|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\')'
_TOKEN = re.compile("|".join((
    r"(?P<skip>\s+|//[^\n]*)",
    rf"(?P<literal>{_RAW}|{_COOKED}|\d*\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|0[xX][0-9a-fA-F]+[uU]?|\d+[uU]?)",
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)",
    r"(?P<op>==|!=|<=|>=|&&|\|\||[-+*/%!<>?:.,()\[\]{}])",
)))
_HEADER_LITERAL = re.compile(r"^([\"'])([A-Za-z0-9!#$%&*+.^`|~-]+)\1$")  # a quoted token, no escapes
_KEYWORDS = frozenset({"true", "false", "null"})
_BINARY = (("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">=", "in"), ("+", "-"), ("*", "/", "%"))


class CelSyntaxError(ValueError):
    """The expression could not be read (the engine compiled it: the two parsers disagree)."""


@dataclass(frozen=True, slots=True)
class Node:
    """One node of the tree: ``ident`` (a name), ``select`` (``operand.name``), ``call`` (``name``
    with ``children[0]`` as its receiver when ``receiver``), ``index`` (``operand[key]``), ``in``
    (``item in container``), ``literal`` (its source text as ``name``), or ``other`` (operators...)."""

    kind: str
    name: str = ""
    children: tuple[Node, ...] = ()
    receiver: bool = False


@dataclass(slots=True)
class References:
    """What an expression reads: variable -> the fields selected from it, None when used whole."""

    fields: dict[str, set[str] | None] = field(default_factory=dict)
    identifiers: set[str] = field(default_factory=set)  # every name the tree reads, bound or not
    # the header names read as request.headers["name"] or "name" in request.headers (lowercase);
    # None when request.headers is used otherwise (iterated, sized, indexed by a computed key)
    header_keys: set[str] | None = field(default_factory=set)

    def use(self, name: str, selected: str | None) -> None:
        if name == "request" and selected is None:  # request used whole: its headers may be read any way
            self.header_keys = None
        known = self.fields.get(name, set())
        if known is None or selected is None:
            self.fields[name] = None
        else:
            self.fields[name] = known | {selected}


def references(source: str) -> References:
    """The variables ``source`` reads, with their selected fields; raises :class:`CelSyntaxError`."""
    found = References()
    _walk(_Parser(source).parse(), frozenset(), found)
    return found


def _walk(node: Node, bound: frozenset[str], found: References) -> None:
    key = _header_key(node, bound)
    if key is not None:
        found.identifiers.add("request")
        found.use("request", "headers")
        if found.header_keys is not None:
            found.header_keys.add(key)
        return
    if _is_headers(node, bound):
        found.header_keys = None
    if node.kind == "ident":
        found.identifiers.add(node.name)
        if node.name not in bound:
            found.use(node.name, None)
        return
    operand = node.children[0] if node.children else node
    if node.kind == "select" and operand.kind == "ident":
        found.identifiers.add(operand.name)
        if operand.name not in bound:
            found.use(operand.name, node.name)
        return
    if _is_macro(node):
        receiver, variable, *body = node.children
        _walk(receiver, bound, found)
        for child in body:
            _walk(child, bound | {variable.name}, found)
        return
    for child in node.children:
        _walk(child, bound, found)


def _is_headers(node: Node, bound: frozenset[str]) -> bool:
    """``request.headers``, with ``request`` the variable (not a comprehension's)."""
    return (node.kind == "select" and node.name == "headers" and node.children[0].kind == "ident"
            and node.children[0].name == "request" and "request" not in bound)


def _header_key(node: Node, bound: frozenset[str]) -> str | None:
    """The literal name of ``request.headers["name"]`` or ``"name" in request.headers``, else None."""
    if node.kind == "index":
        container, key = node.children
    elif node.kind == "in":
        key, container = node.children
    else:
        return None
    literal = _HEADER_LITERAL.match(key.name) if key.kind == "literal" else None
    return literal.group(2).lower() if literal and _is_headers(container, bound) else None


def _is_macro(node: Node) -> bool:
    """``receiver.all(x, predicate)`` and its kin: the receiver, then the bound variable, then the rest."""
    return (node.kind == "call" and node.receiver and node.name in MACROS and len(node.children) >= 3
            and node.children[1].kind == "ident")


def _tokens(source: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        if m is None:
            raise CelSyntaxError(f"cel: cannot read {source[pos:pos + 10]!r} at offset {pos}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind == "name" and m.group() in _KEYWORDS:
            kind = "literal"
        if kind == "name" and m.group() == "in":
            kind = "op"
        if kind != "skip":
            yield kind, m.group()
    yield "end", ""


class _Parser:
    """Recursive descent over CEL's grammar; only the shape matters, so every operator is ``other``."""

    def __init__(self, source: str) -> None:
        self._tokens = list(_tokens(source))
        self._pos = 0

    def parse(self) -> Node:
        node = self._expr()
        self._expect("end")
        return node

    def _peek(self) -> str:
        return self._tokens[self._pos][1] if self._tokens[self._pos][0] == "op" else self._tokens[self._pos][0]

    def _take(self) -> tuple[str, str]:
        token = self._tokens[self._pos]
        self._pos += 1
        return token

    def _accept(self, op: str) -> bool:
        if self._peek() != op:
            return False
        self._pos += 1
        return True

    def _expect(self, op: str) -> str:
        kind, text = self._take()
        if (text if kind == "op" else kind) != op:
            raise CelSyntaxError(f"cel: expected {op!r}, got {text or 'the end'!r}")
        return text

    def _expr(self) -> Node:
        condition = self._binary(0)
        if not self._accept("?"):
            return condition
        then = self._binary(0)
        self._expect(":")
        return Node("other", children=(condition, then, self._expr()))

    def _binary(self, level: int) -> Node:
        if level == len(_BINARY):
            return self._unary()
        node = self._binary(level + 1)
        while self._peek() in _BINARY[level]:
            kind = "in" if self._take()[1] == "in" else "other"
            node = Node(kind, children=(node, self._binary(level + 1)))
        return node

    def _unary(self) -> Node:
        if self._accept("!") or self._accept("-"):
            return Node("other", children=(self._unary(),))
        return self._member(self._primary())

    def _member(self, node: Node) -> Node:
        while True:
            if self._accept("."):
                name = self._name()
                if self._accept("("):
                    node = Node("call", name, (node, *self._list(")")), receiver=True)
                else:
                    node = Node("select", name, (node,))
            elif self._accept("["):
                node = Node("index", children=(node, self._expr()))
                self._expect("]")
            else:
                return node

    def _primary(self) -> Node:
        if self._accept("("):
            node = self._expr()
            self._expect(")")
            return node
        if self._accept("["):
            return Node("other", children=self._list("]"))
        if self._accept("{"):
            return Node("other", children=self._entries())
        if self._peek() == "literal":
            return Node("literal", self._take()[1])
        root = "." if self._accept(".") else ""  # the engine names a root-scoped .request so, unknown
        return self._named(root + self._name())

    def _named(self, name: str) -> Node:
        """A variable, a global call, or a message (``Name{field: value}``; a qualified name is not read)."""
        if self._accept("("):
            return Node("call", name, self._list(")"))
        if self._peek() == "{":
            self._pos += 1
            return Node("other", children=self._entries(fields=True))
        return Node("ident", name)

    def _name(self) -> str:
        kind, text = self._take()
        if kind != "name":
            raise CelSyntaxError(f"cel: expected a name, got {text or 'the end'!r}")
        return text

    def _list(self, close: str) -> tuple[Node, ...]:
        items: list[Node] = []
        while not self._accept(close):
            items.append(self._expr())
            if not self._accept(","):
                self._expect(close)
                break
        return tuple(items)

    def _entries(self, *, fields: bool = False) -> tuple[Node, ...]:
        """Map entries (keys are expressions) or message fields (keys are names, not variables)."""
        values: list[Node] = []
        while not self._accept("}"):
            if fields:
                self._name()
            else:
                values.append(self._expr())
            self._expect(":")
            values.append(self._expr())
            if not self._accept(","):
                self._expect("}")
                break
        return tuple(values)
