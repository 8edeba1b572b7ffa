"""Chat templates rendered in jinja2's immutable sandbox with a work budget (loop steps and bytes built)."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


TEMPLATE_STEPS = 1_000_000  # range() items a chat template may loop over in one render
TEMPLATE_SIZE = 32_000_000  # bytes (a character 1, a list item 32) its filters and `*` may build in one render


class _BudgetedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox bounds one range() but not nested loops or `'x' * 10**10`: count what a render builds."""

    intercepted_binops = frozenset(["*", "**", "%"])
    MAX_ARG = 100_000  # largest number a filter argument or a format width may be

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spent = 0
        self.steps = 0
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)
        for name, f in list(self.filters.items()):
            self.filters[name] = self._guard(name, f)

    def _guard(self, name, f):
        @functools.wraps(f)  # keeps jinja's pass_context/pass_environment markers
        def guarded(*args, **kwargs):
            first = 2 if getattr(f, "jinja_pass_arg", None) else 1  # skip the context and the filtered value
            options = list(args[first:]) + list(kwargs.values())
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > self.MAX_ARG
                   for v in options):
                raise jinja2.sandbox.SecurityError(f"chat template passes a huge number to the {name} filter")
            strings = [v for v in list(args) + list(kwargs.values()) if isinstance(v, str)]
            if name == "replace" and len(strings) >= 3:
                self._spend((len(strings[-3]) + 1) * len(strings[-1]))
            if name == "format" and strings:
                self._check_widths(strings[0])
            out = f(*args, **kwargs)
            if isinstance(out, str):
                self._spend(len(out))
            elif isinstance(out, list):
                self._spend(32 * len(out))
            return out

        return guarded

    def _check_widths(self, fmt: str) -> None:
        for n in re.findall(r"%[-+ #0]*(\d+)|\{[^{}]*:[^{}]*?(\d+)[^{}]*\}", fmt):
            if any(x and int(x) > self.MAX_ARG for x in n):
                raise jinja2.sandbox.SecurityError("chat template formats with a huge width")

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self._check_widths(value.__self__)
        return wrapped

    def _spend(self, n: int) -> None:
        self.spent += max(int(n), 0)
        if self.spent > TEMPLATE_SIZE:
            raise jinja2.sandbox.SecurityError("chat template exceeds its work budget (a hostile or broken template)")

    def _range(self, *args):
        r = range(*args)
        self.steps += len(r)
        if self.steps > TEMPLATE_STEPS:
            raise jinja2.sandbox.SecurityError("chat template exceeds its work budget (a hostile or broken template)")
        return r

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.sandbox.SecurityError("chat template raises to a power beyond 64")
        if operator == "%" and isinstance(left, str):
            self._check_widths(left)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._spend(len(seq) * n * (1 if isinstance(seq, str) else 32))
        return super().call_binop(context, operator, left, right)


def compile_template(source: str) -> jinja2.Template:
    env = _BudgetedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
