"""Regular expressions from artifact configs, matched without backtracking.

PEFT reads some config strings as Python regular expressions over module names (a string
`target_modules` or `feedforward_modules`: `re.fullmatch`; `rank_pattern`/`alpha_pattern` keys:
`re.match(rf"(.*\\.)?({key})$", name)`). Python's `re` backtracks and holds the GIL, so a key such
as `(.*.*)*X` would run for hours inside a push, a pull or the server, and no timeout thread can
stop it. Here such a string is parsed by Python's own parser (so it means exactly what it means to
PEFT) and matched by a DFA built lazily from it: time linear in the name, whatever the pattern.

A pattern is also refused, with one clear line, when PEFT's backtracking `re` would not match it in
bounded time either (a repetition of something that itself repeats or branches, or too many
repetitions), when it uses what this matcher does not implement (back-references, lookarounds,
flags, `\\b`), or when it is long. Push, pull and load all use this module, so no artifact is stored
that the runtime would refuse.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable

from re import _constants as sre  # type: ignore[attr-defined]  # the parser's node kinds
from re import _parser as sre_parse  # type: ignore[attr-defined]  # Python's own regex parser

MAX_LENGTH = 1024  # characters of one pattern as written in a config (hub.train lists layers: ~4 per layer)
MAX_REPEATS = 6  # repetitions (`*`, `+`, `{m,n}` with n > 1) in one pattern: PEFT's `re` is polynomial in their number
MAX_CHOICES = 4096  # ways the alternations of one pattern multiply to: PEFT's `re` may try each of them
_MAX_PROGRAM = 4096  # instructions after expanding counted repetitions
_MAX_CACHED = 65536  # DFA transitions kept per pattern (the cache is dropped and rebuilt past this)

_CHAR, _SPLIT, _JMP, _ASSERT, _MATCH = range(5)
_START, _END, _DOLLAR = range(3)  # `^`/`\A`; `\Z`; `$` (the end, or before a final newline)
_ANCHORS = {sre.AT_BEGINNING: _START, sre.AT_BEGINNING_STRING: _START, sre.AT_END: _DOLLAR,
            sre.AT_END_STRING: _END}
_CATEGORIES = {name: re.compile(f"[{cls}]") for name, cls in (
    (sre.CATEGORY_DIGIT, r"\d"), (sre.CATEGORY_NOT_DIGIT, r"\D"), (sre.CATEGORY_SPACE, r"\s"),
    (sre.CATEGORY_NOT_SPACE, r"\S"), (sre.CATEGORY_WORD, r"\w"), (sre.CATEGORY_NOT_WORD, r"\W"))}
_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT)  # greedy or lazy: the same set of names matches


class PatternError(ValueError):
    """A pattern that is malformed, unsupported, or could not be matched in bounded time by PEFT."""


def _is_char(c: str) -> Callable[[str], bool]:
    return lambda ch: ch == c


def _in_range(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda ch: lo <= ord(ch) <= hi


def _in_category(category: re.Pattern[str]) -> Callable[[str], bool]:
    return lambda ch: category.fullmatch(ch) is not None


def _char_test(op, av) -> Callable[[str], bool]:
    """A one-character test for a LITERAL, NOT_LITERAL, ANY or IN node."""
    if op is sre.LITERAL:
        return _is_char(chr(av))
    if op is sre.NOT_LITERAL:
        c = chr(av)
        return lambda ch: ch != c
    if op is sre.ANY:
        return lambda ch: ch != "\n"
    negate = False
    tests: list[Callable[[str], bool]] = []
    for item_op, item in av:
        if item_op is sre.NEGATE:
            negate = True
        elif item_op is sre.LITERAL:
            tests.append(_is_char(chr(item)))
        elif item_op is sre.RANGE:
            tests.append(_in_range(item[0], item[1]))
        elif item_op is sre.CATEGORY and item in _CATEGORIES:
            tests.append(_in_category(_CATEGORIES[item]))
        else:
            raise PatternError(f"character class item {item_op} {item} is not supported")
    return lambda ch: any(t(ch) for t in tests) != negate


def _repeats_or_branches(nodes) -> bool:
    """Whether a sub-pattern holds a repetition (`?` too) or an alternation: what makes a repetition of it
    ambiguous, e.g. (a?a?)* splits a run of a's in exponentially many ways."""
    return any(op in _REPEATS or op is sre.BRANCH or op is sre.SUBPATTERN and _repeats_or_branches(av[3])
               for op, av in nodes)


class _Compiler:
    """Parsed nodes -> a Thompson program (a list of instructions; jumps are indexes)."""

    def __init__(self) -> None:
        self.program: list[list] = []
        self.repeats = 0
        self.choices = 1

    def add(self, *instruction) -> int:
        if len(self.program) >= _MAX_PROGRAM:
            raise PatternError(f"expands to more than {_MAX_PROGRAM} steps (counted repetitions too large)")
        self.program.append(list(instruction))
        return len(self.program) - 1

    def emit(self, nodes) -> None:
        for op, av in nodes:
            if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
                self.add(_CHAR, _char_test(op, av))
            elif op is sre.SUBPATTERN:
                if av[1] or av[2]:
                    raise PatternError("inline flags such as (?i) are not supported")
                self.emit(av[3])
            elif op is sre.BRANCH:
                self.branch(av[1])
            elif op in _REPEATS:
                self.repeat(*av)
            elif op is sre.AT and av in _ANCHORS:
                self.add(_ASSERT, _ANCHORS[av])
            else:
                name = {sre.GROUPREF: "back-references", sre.GROUPREF_EXISTS: "conditional groups",
                        sre.ASSERT: "lookarounds", sre.ASSERT_NOT: "lookarounds", sre.AT: "\\b, \\B and other anchors"
                        }.get(op, str(op).lower().replace("_", " "))
                raise PatternError(f"{name} are not supported")

    def branch(self, alternatives) -> None:
        self.choices *= len(alternatives)
        if self.choices > MAX_CHOICES:
            raise PatternError(f"its alternations multiply to more than {MAX_CHOICES} ways")
        ends = []
        for alternative in alternatives[:-1]:
            split = self.add(_SPLIT, None, None)
            self.program[split][1] = split + 1
            self.emit(alternative)
            ends.append(self.add(_JMP, None))
            self.program[split][2] = len(self.program)
        self.emit(alternatives[-1])
        for jump in ends:
            self.program[jump][1] = len(self.program)

    def repeat(self, low: int, high: int, body) -> None:
        if high > 1:
            self.repeats += 1
            if self.repeats > MAX_REPEATS:
                raise PatternError(f"more than {MAX_REPEATS} repetitions")
            if _repeats_or_branches(body):
                raise PatternError("a repetition of something that itself repeats or branches, e.g. (a*)* or "
                                   "(a|b)*, takes exponential time in PEFT's matcher")
        for _ in range(low):
            self.emit(body)
        if high == sre.MAXREPEAT:
            loop = self.add(_SPLIT, None, None)
            self.program[loop][1] = loop + 1
            self.emit(body)
            self.add(_JMP, loop)
            self.program[loop][2] = len(self.program)
            return
        exits = []
        for _ in range(high - low):
            split = self.add(_SPLIT, None, None)
            self.program[split][1] = split + 1
            exits.append(split)
            self.emit(body)
        for split in exits:
            self.program[split][2] = len(self.program)


class Pattern:
    """One compiled pattern: `match` and `fullmatch` as Python's `re` answers them, in linear time."""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise PatternError(f"{pattern!r} is not a string")
        if len(pattern) > MAX_LENGTH:
            raise PatternError(f"longer than {MAX_LENGTH} characters")
        try:
            parsed = sre_parse.parse(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise PatternError(f"not a valid regular expression ({e})") from None
        if parsed.state.flags & ~(sre.SRE_FLAG_UNICODE):
            raise PatternError("inline flags such as (?i) are not supported")
        compiler = _Compiler()
        compiler.emit(parsed)
        compiler.add(_MATCH)
        self.program = compiler.program
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._reached: dict[tuple[frozenset[int], bool, bool, bool], tuple[frozenset[int], bool]] = {}
        self._start = self._closure((0,), start=True, end=False, dollar=False)

    def _closure(self, pcs: Iterable[int], start: bool, end: bool, dollar: bool) -> frozenset[int]:
        """The threads reachable without consuming a character, given which anchors hold here; an end
        anchor that does not hold (yet) stays as a thread, for `_reach` to try where it may hold."""
        out, todo, seen = set(), list(pcs), set()
        while todo:
            pc = todo.pop()
            if pc in seen:
                continue
            seen.add(pc)
            kind, *args = self.program[pc]
            if kind == _SPLIT:
                todo += args
            elif kind == _JMP:
                todo.append(args[0])
            elif kind == _ASSERT:
                anchor = args[0]
                if anchor == _START and start or anchor == _END and end or anchor == _DOLLAR and (end or dollar):
                    todo.append(pc + 1)
                elif anchor != _START:
                    out.add(pc)
            else:
                out.add(pc)
        return frozenset(out)

    def _step(self, state: frozenset[int], ch: str) -> frozenset[int]:
        key = (state, ch)
        found = self._steps.get(key)
        if found is None:
            moved = [pc + 1 for pc in state if self.program[pc][0] == _CHAR and self.program[pc][1](ch)]
            found = self._closure(moved, start=False, end=False, dollar=False)
            if len(self._steps) >= _MAX_CACHED:
                self._steps.clear()
            self._steps[key] = found
        return found

    def _reach(self, state: frozenset[int], start: bool, end: bool, dollar: bool) -> tuple[frozenset[int], bool]:
        """`state` with the anchors that hold at this position passed, and whether it has matched (cached)."""
        key = (state, start, end, dollar)
        found = self._reached.get(key)
        if found is None:
            reach = self._closure(state, start=start, end=end, dollar=dollar)
            found = reach, any(self.program[pc][0] == _MATCH for pc in reach)
            if len(self._reached) >= _MAX_CACHED:
                self._reached.clear()
            self._reached[key] = found
        return found

    def _run(self, text: str, prefix: bool) -> bool:
        state, last = self._start, len(text) - 1
        for pos, ch in enumerate(text):
            before_final_newline = pos == last and ch == "\n"  # where `$` holds too
            if prefix and self._reach(state, pos == 0, False, before_final_newline)[1]:
                return True
            if before_final_newline:
                state = self._reach(state, pos == 0, False, True)[0]
            state = self._step(state, ch)
            if not state:
                return False
        return self._reach(state, not text, True, True)[1]

    def match(self, text: str) -> bool:
        """`re.match(pattern, text) is not None`."""
        return self._run(text, prefix=True)

    def fullmatch(self, text: str) -> bool:
        """`re.fullmatch(pattern, text) is not None`."""
        return self._run(text, prefix=False)


@functools.lru_cache(maxsize=1024)
def compile(pattern: str) -> Pattern:  # noqa: A001  (mirrors re.compile)
    """A compiled pattern (cached: a load matches the same patterns against every module; a merge's rank_pattern
    may hold one key per module)."""
    return Pattern(pattern)


def fullmatch(pattern: str, name: str) -> bool:
    """PEFT's test of a module name against a string `target_modules`/`feedforward_modules`."""
    return compile(pattern).fullmatch(name)


def _key_pattern(key: str) -> str:
    return rf"(.*\.)?({key})$"


@functools.lru_cache(maxsize=4096)
def _fixed(key: str) -> tuple[str | None, ...] | None:
    """A key of plain characters and `.` only (a module path, as merges write them): per position the character,
    or None for `.`; None for any other key."""
    try:
        nodes = sre_parse.parse(key)
    except re.error:
        return None  # `compile` says why
    if not all(op is sre.LITERAL or op is sre.ANY for op, _ in nodes):
        return None
    return tuple(chr(av) if op is sre.LITERAL else None for op, av in nodes)


def _key_matches(key: str, name: str) -> bool:
    r"""`re.match(rf"(.*\.)?({key})$", name)`: by string comparison for a fixed key (the common case: thousands
    of module-path keys times modules stay cheap), else by the compiled pattern."""
    fixed = _fixed(key)
    if fixed is None:
        return compile(_key_pattern(key)).match(name)
    for text in (name, name[:-1]) if name.endswith("\n") else (name,):  # `$`: the end, or before a final newline
        head, tail = text[:len(text) - len(fixed)], text[len(text) - len(fixed):]
        if len(tail) == len(fixed) and (not head or head[-1] == "." and "\n" not in head) and all(
                ch == want if want is not None else ch != "\n" for ch, want in zip(tail, fixed)):
            return True
    return False


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first `rank_pattern`/`alpha_pattern` key that names this module, as PEFT's `get_pattern_key` picks it."""
    return next((key for key in keys if _key_matches(key, name)), None)


def check(pattern: str) -> None:
    """PatternError unless `pattern` is one this module matches (and PEFT's `re` matches in bounded time)."""
    compile(pattern)


def check_key(key: str) -> None:
    """`check` for a `rank_pattern`/`alpha_pattern` key, alone and as PEFT embeds it."""
    compile(key)
    compile(_key_pattern(key))
