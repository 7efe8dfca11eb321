"""Chat templates: jinja2 in an immutable sandbox, configured as transformers configures it, rendered
under limits on loop sizes, value sizes and output length; every failure is a TokenizerError."""

from __future__ import annotations

import functools
import json
import threading
from datetime import datetime
from typing import Any

from .errors import TokenizerError

MAX_TEMPLATE_OUTPUT = 4_000_000  # characters a chat template may render
MAX_TEMPLATE_ITEMS = 1_000_000  # range() items, and the length of strings/lists made with * or +, per render
_budget = threading.local()


def _range(*args: int) -> range:
    r = range(*args)
    left = getattr(_budget, "left", MAX_TEMPLATE_ITEMS) - len(r)
    if left < 0:
        raise TokenizerError(f"chat template loops over more than {MAX_TEMPLATE_ITEMS} range() items")
    _budget.left = left
    return r


@functools.lru_cache(maxsize=1)
def _jinja_env():
    """A sandboxed jinja2 environment configured as transformers configures it, with limits on loop
    sizes, on strings or lists grown by * and +, and on the rendered length."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body, and where the render
        tracks them records the characters it covers (as transformers' AssistantTracker)."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller) -> str:
            text = caller()
            spans = getattr(_budget, "spans", None)
            if spans is not None:  # the characters rendered before this block: the chunks yielded so far
                spans.append((_budget.rendered, _budget.rendered + len(text)))
            return text

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            def size(x):
                return len(x) if isinstance(x, (str, list, tuple)) else None

            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if size(seq) is not None and isinstance(n, int) and size(seq) * n > MAX_TEMPLATE_ITEMS:
                        raise TokenizerError(
                            f"chat template builds a value longer than {MAX_TEMPLATE_ITEMS} items"
                        )
            elif operator == "+" and size(left) is not None and size(right) is not None:
                if size(left) + size(right) > MAX_TEMPLATE_ITEMS:
                    raise TokenizerError(
                        f"chat template builds a value longer than {MAX_TEMPLATE_ITEMS} items"
                    )
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise TokenizerError(f"chat template raises a number to the power {right}")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str):
        raise TokenizerError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def bounded(filter_name):
        builtin = jinja2.filters.FILTERS[filter_name]

        def f(value, width=80, *args, **kwargs):
            if isinstance(width, int) and width > MAX_TEMPLATE_ITEMS:
                raise TokenizerError(f"chat template asks {filter_name} for a width of {width}")
            return builtin(value, width, *args, **kwargs)

        return f

    env = Limited(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.filters["center"] = bounded("center")
    env.filters["indent"] = bounded("indent")
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _range
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    return _jinja_env().from_string(template)


def render_chat_template(template: str, messages: list[dict[str, Any]], **context: Any) -> str:
    """Render a chat template under the limits above; every failure becomes TokenizerError."""
    return render_tracked(template, messages, **context)[0]


def render_tracked(template: str, messages: list[dict[str, Any]], **context: Any) -> tuple[str, list]:
    """(the rendered text, the (start, end) characters of each {% generation %} block in it)."""
    _budget.spans, _budget.rendered = [], 0
    try:
        compiled = _compile(template)
        _budget.left = MAX_TEMPLATE_ITEMS
        out, n = [], 0
        for chunk in compiled.generate(messages=messages, **context):
            n += len(chunk)
            if n > MAX_TEMPLATE_OUTPUT:
                raise TokenizerError(f"chat template output exceeds {MAX_TEMPLATE_OUTPUT} characters")
            out.append(chunk)
            _budget.rendered = n
        return "".join(out), _budget.spans
    except TokenizerError:
        raise
    except Exception as e:  # jinja2's TemplateError, and what the template's Python operations raise
        raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {e}") from None
    finally:
        _budget.spans = None
