"""Is a generated kernel still Metal? The emulator compiles kernels as C++20, which accepts much
that Metal's dialect (C++14 with restrictions) rejects. Two checks on the exact source MLX
generates (``generated_source``):

- ``compile_errors``: the emulator's translation unit, against ``dialect.h`` (the Metal names
  the kernels use, declared in C++14) instead of the C++20 shim, compiled with
  ``-std=c++14 -pedantic-errors -fno-exceptions -fno-rtti -fsyntax-only``: C++17 / C++20
  constructs (if constexpr, structured bindings, fold expressions, inline variables, ...),
  exceptions and RTTI fail.
- ``dialect_violations``: a token-level check, comments and string literals stripped, for
  what C++14 allows and Metal does not: lambdas, recursion (a function calling itself), goto,
  new / delete, try / catch / throw, virtual, derived classes, thread_local, ``double``, the
  C++ standard library (``std::``, ``#include <...>`` other than ``<metal_*>``), and pointer
  or reference parameters without an address space (device, constant, threadgroup, thread).

Neither proves that Apple's compiler accepts a kernel (mutual recursion, Metal's own type
rules, ... are not checked); they make an edit that leaves the dialect fail here first.
"""

import re
import subprocess

from .emulator import COMPILER, HERE, parse_generated, translation_unit

FLAGS = ["-std=c++14", "-pedantic-errors", "-fno-exceptions", "-fno-rtti", "-fsyntax-only", "-Wno-attributes"]
ADDRESS_SPACES = {"device", "constant", "threadgroup", "thread", "threadgroup_imageblock", "ray_data",
                  "object_data"}
FORBIDDEN = {
    "goto": "goto",
    "new": "new", "delete": "delete",
    "try": "exceptions", "catch": "exceptions", "throw": "exceptions",
    "virtual": "virtual functions",
    "thread_local": "thread_local",
    "double": "double",
    "typeid": "RTTI", "dynamic_cast": "RTTI",
}

_TOKEN = re.compile(
    r'(?P<skip>//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\')'
    r"|(?P<include>^[ \t]*#[ \t]*include[ \t]*<[^>\n]*>)"
    r"|(?P<ident>[A-Za-z_]\w*)"
    r"|(?P<number>\.?\d(?:[\w.]|[eEpP][+-])*)"
    r"|(?P<punct>::|->|\.\.\.|[-+*/%&|^<>=!]=|<<|>>|&&|\|\||\+\+|--|\S)",
    re.S | re.M,
)


def tokens(text):
    """(kind, text) of every token, comments and string / character literals left out;
    an ``#include <...>`` line is one token (``include``)."""
    out = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind != "skip":
            out.append((kind, m.group(kind)))
    return out


def _matching(toks, i, open_, close):
    """Index of the token closing the bracket opened at toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        depth += toks[j][1] == open_
        depth -= toks[j][1] == close
        if depth == 0:
            return j
    return len(toks) - 1


def _parameters(toks):
    """The parameters (token lists) of a parenthesised list, split at top-level commas."""
    params, current, depth = [], [], 0
    for kind, t in toks:
        depth += t in "(<[{"
        depth -= t in ")>]}"
        if t == "," and depth == 0:
            params.append(current)
            current = []
        else:
            current.append((kind, t))
    if current:
        params.append(current)
    return params


def _functions(toks):
    """(name, parameter tokens, body tokens) of every function defined at namespace scope:
    ``name ( ... ) [const] {`` outside any brace."""
    out, depth, i = [], 0, 0
    while i < len(toks):
        t = toks[i][1]
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
        elif depth == 0 and toks[i][0] == "ident" and i + 1 < len(toks) and toks[i + 1][1] == "(":
            close = _matching(toks, i + 1, "(", ")")
            j = close + 1
            while j < len(toks) and toks[j][1] in ("const", "noexcept"):
                j += 1
            if j < len(toks) and toks[j][1] == "{":
                end = _matching(toks, j, "{", "}")
                out.append((t, toks[i + 2:close], toks[j + 1:end]))
                i = end + 1
                continue
            i = close
        i += 1
    return out


def dialect_violations(text):
    """What in this Metal source Metal's dialect rejects (see the module docstring), one line
    each; [] when none."""
    toks = tokens(text)
    found = []
    for i, (kind, t) in enumerate(toks):
        prev = toks[i - 1][1] if i else ""
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "include" and not re.search(r"<metal_\w+>", t):
            found.append(f"the C++ standard library: {t.strip()}")
        elif kind == "ident" and t in FORBIDDEN:
            found.append(f"{FORBIDDEN[t]}: `{t}`")
        elif t == "std" and nxt == "::":
            found.append("the C++ standard library: `std::`")
        elif t in ("class", "struct") and prev != "enum" and i + 2 < len(toks) and toks[i + 2][1] == ":":
            found.append(f"a derived class: `{t} {nxt} :`")
        elif t == "[" and nxt != "[" and prev != "[" and (prev == "return" or not (
                toks[i - 1][0] in ("ident", "number") or prev in ("]", ")"))):
            found.append("a lambda: `[` opening a capture list")
    for name, params, body in _functions(toks):
        if any(kind == "ident" and t == name and j + 1 < len(body) and body[j + 1][1] == "("
               for j, (kind, t) in enumerate(body)):
            found.append(f"recursion: `{name}` calls itself")
        for param in _parameters(params):
            words = {t for kind, t in param if kind == "ident"}
            if any(t in ("*", "&") for _, t in param) and not words & ADDRESS_SPACES:
                found.append(f"a pointer or reference parameter without an address space in `{name}`: "
                             f"`{' '.join(t for _, t in param)}`")
    return found


def compile_errors(text, name):
    """The compiler's messages when the kernel's translation unit does not compile as C++14
    against dialect.h (see the module docstring); None when it does."""
    cpp = translation_unit(parse_generated(text, name), name)
    cpp = cpp.replace('#include "shim.h"', '#include "dialect.h"').replace('#include "runtime.h"\n', "")
    r = subprocess.run([COMPILER, *FLAGS, "-I", str(HERE), "-x", "c++", "-"], input=cpp, capture_output=True,
                       text=True)
    return r.stderr if r.returncode else None
