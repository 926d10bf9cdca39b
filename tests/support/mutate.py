"""Hypothesis strategies that break the shipped config/proxy.yaml the ways people and
attackers do: deleted keys, wrong types, huge and tiny numbers, unicode, deep nesting,
anchors and aliases, duplicate keys, tabs and NUL bytes."""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "config" / "proxy.yaml").read_text()
LINES = SHIPPED.splitlines(keepends=True)

# Values that have broken YAML loaders and validators before.
NASTY_VALUES = [
    "~",
    "true",
    "[]",
    "{}",
    "-1",
    "0",
    "1e309",
    "-1e309",
    ".nan",
    "9" * 5000,
    "18446744073709551617",
    "0.0000000001",
    "1e-320",
    "0x1F",
    "0o17",
    "2024-13-45",
    "12:30:00",
    "'€ ünïcödé 🙂'",
    "\"\\0\"",
    "\"\\x85\\u2028\"",
    "'\\t'",
    "*nope",
    "&a x",
    "!!binary AAAA",
    "!!python/object:os.system x",
    "!custom x",
    "[" * 30 + "1" + "]" * 30,
    "{a: " * 30 + "1" + "}" * 30,
    "${MISSING_VARIABLE}",
    "${file:/dev/zero}",
    "${file:/nonexistent/secret}",
    "${X:-${Y}}",
    "'${'",
    "1h",
    "-5s",
    "150%",
    "10GiB",
    "0ms",
    "x" * 70_000,
    "|\n  multi\n  line",
]

# Whole lines to insert anywhere.
NASTY_LINES = [
    "\t\n",
    "\0\n",
    "<<: *nope\n",
    "x: &loop [*loop]\n",
    "a: &a [1, 2]\nb: [*a, *a, *a]\n",
    "version: 1\n",
    "routes: []\n",
    "routes: ~\n",
    "---\n",
    "...\n",
    "? [complex, key]\n: value\n",
    "%YAML 1.1\n",
    "\ufeff\n",
    "    \u00a0: x\n",
]


def _bomb(levels: int) -> str:
    lines = ["x-bomb:\n", "  a0: &a0 [x]\n"]
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n")
    return "".join(lines)


@st.composite
def _mutation(draw: st.DrawFn, lines: list[str]) -> list[str]:
    kind = draw(st.sampled_from(["delete", "value", "duplicate", "insert", "indent", "bomb"]))
    index = draw(st.integers(0, max(0, len(lines) - 1)))
    out = list(lines)
    if kind == "delete" and out:
        del out[index]
    elif kind == "value" and out:
        line = out[index]
        key, sep, _ = line.partition(": ")
        value = draw(
            st.one_of(
                st.sampled_from(NASTY_VALUES),
                st.integers().map(str),
                st.floats().map(repr),
                st.text(max_size=12).map(repr),
            )
        )
        out[index] = f"{key}{sep or ': '}{value}\n"
    elif kind == "duplicate" and out:
        out.insert(index, out[index])
    elif kind == "insert":
        out.insert(index, draw(st.sampled_from(NASTY_LINES)))
    elif kind == "indent" and out:
        out[index] = draw(st.sampled_from(["\t", " ", "   "])) + out[index]
    elif kind == "bomb":
        out.insert(0, _bomb(draw(st.integers(2, 9))))
    return out


@st.composite
def mutated_config(draw: st.DrawFn) -> str:
    """The shipped config with one to three mutations applied."""
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 3))):
        lines = draw(_mutation(lines))
    return "".join(lines)
