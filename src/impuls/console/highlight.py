"""A tiny syntax highlighter for the code view: comments, strings, numbers, keywords and
definitions of Python, JavaScript, Go and JSON, as ``<span class="tok-...">`` around escaped
text.  It reads tokens with one regular expression per language; what it does not know stays
plain text (never dropped, always escaped)."""

from __future__ import annotations

import re

from markupsafe import Markup, escape

_PY_KEYWORDS = (
    "False None True and as assert async await break class continue def del elif else except "
    "finally for from global if import in is lambda nonlocal not or pass raise return try while "
    "with yield match case"
)
_JS_KEYWORDS = (
    "async await break case catch class const continue debugger default delete do else export "
    "extends false finally for function if import in instanceof let new null of return static "
    "super switch this throw true try typeof undefined var void while with yield"
)
_GO_KEYWORDS = (
    "break case chan const continue default defer else fallthrough for func go goto if import "
    "interface map package range return select struct switch type var nil true false iota"
)


def _words(words: str) -> str:
    return r"\b(?:" + "|".join(sorted(words.split(), key=len, reverse=True)) + r")\b"


_NUMBER = r"\b(?:0[xX][0-9a-fA-F_]+|\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?)\b"

_LANGUAGES: dict[str, re.Pattern[str]] = {
    "python": re.compile(
        r"(?P<comment>#[^\n]*)"
        r"|(?P<string>(?i:[rbuf]{0,2})(?:\"\"\"[\s\S]*?(?:\"\"\"|$)|'''[\s\S]*?(?:'''|$)"
        r"|\"(?:\\.|[^\"\\\n])*\"?|'(?:\\.|[^'\\\n])*'?))"
        r"|(?P<decorator>@[A-Za-z_][\w.]*)"
        r"|(?<=\bdef )(?P<def>[A-Za-z_]\w*)|(?<=\bclass )(?P<class>[A-Za-z_]\w*)"
        rf"|(?P<keyword>{_words(_PY_KEYWORDS)})"
        rf"|(?P<number>{_NUMBER})"),
    "javascript": re.compile(
        r"(?P<comment>//[^\n]*|/\*[\s\S]*?(?:\*/|$))"
        r"|(?P<string>\"(?:\\.|[^\"\\\n])*\"?|'(?:\\.|[^'\\\n])*'?|`(?:\\.|[^`\\])*`?)"
        r"|(?<=\bfunction )(?P<def>[A-Za-z_$][\w$]*)|(?<=\bclass )(?P<class>[A-Za-z_$][\w$]*)"
        rf"|(?P<keyword>{_words(_JS_KEYWORDS)})"
        rf"|(?P<number>{_NUMBER})"),
    "go": re.compile(
        r"(?P<comment>//[^\n]*|/\*[\s\S]*?(?:\*/|$))"
        r"|(?P<string>\"(?:\\.|[^\"\\\n])*\"?|`[^`]*`?|'(?:\\.|[^'\\\n])*'?)"
        r"|(?<=\bfunc )(?P<def>[A-Za-z_]\w*)"
        rf"|(?P<keyword>{_words(_GO_KEYWORDS)})"
        rf"|(?P<number>{_NUMBER})"),
    "json": re.compile(
        r"(?P<key>\"(?:\\.|[^\"\\\n])*\"(?=\s*:))"
        r"|(?P<string>\"(?:\\.|[^\"\\\n])*\"?)"
        r"|(?P<keyword>\b(?:true|false|null)\b)"
        r"|(?P<number>-?\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b)"),
}

_EXTENSIONS = {".py": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
               ".ts": "javascript", ".go": "go", ".json": "json"}


def language_of(filename: str) -> str:
    """The language of a file by its extension ("" when the highlighter does not know it)."""
    for ext, language in _EXTENSIONS.items():
        if filename.endswith(ext):
            return language
    return ""


def highlight(code: str, language: str) -> Markup:
    """``code`` as escaped HTML, its tokens wrapped in ``<span class="tok-KIND">``."""
    pattern = _LANGUAGES.get(language)
    if pattern is None:
        return escape(code)
    out: list[str] = []
    pos = 0
    for match in pattern.finditer(code):
        kind = match.lastgroup
        if kind is None or match.start() == match.end():
            continue
        out.append(str(escape(code[pos:match.start()])))
        out.append(f'<span class="tok-{kind}">{escape(match.group())}</span>')
        pos = match.end()
    out.append(str(escape(code[pos:])))
    return Markup("".join(out))
