"""Built-in content checks: PII and secrets found in a `str` by regular expressions plus validators.

`Detector(kinds, patterns)` is built once per policy; `find(text)` returns every match as `(start, end, kind)`,
sorted and non-overlapping, and `redact(text)` replaces each with `[KIND]`.

Speed comes from not scanning the text once per kind. `re` skips quickly to a literal prefix (≈ 0.3 ns a
char) but slowly to a character class (≈ 4 ns a char: 15 µs for 4 KB), and most kinds start with a class.
So the text is first mapped to skeletons of the same length (ASCII-encoded with `?` for anything else, then
`bytes.translate`), where a class becomes one byte:

- shape: digits → `0`, upper-case letters → `A`. Cards, SSNs and North American phones all start with a run
  of 3+ digits, so one regex with the literal prefix `000` finds where their shapes fit, and only there does
  the exact pattern run on the text; international phones are tried at a `+` followed by 8 digits, IBANs
  and UK NINOs where two capitals precede two digits (`AA ?00`).
- words: `[A-Za-z0-9_-]` → `w`, anything else → space. API keys are tried only at the start of a run of 16+
  `w`, which is also the word boundary that keeps `task-manager` from matching `sk-`.

Emails are tried only around an `@`, private keys only at `-----BEGIN `. Validators (Luhn, mod-97, digit
counts) run on candidates only. Custom patterns are user regexes and scan the whole text, one pass each.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final, NamedTuple, final


class Match(NamedTuple):
    """`text[start:end]` is of type `kind`, also its placeholder: `[kind]`."""

    start: int
    end: int
    kind: str


KINDS: Final[dict[str, tuple[str, ...]]] = {
    "pii": ("EMAIL", "PHONE", "CARD", "IBAN", "SSN", "NINO"),
    "secrets": ("PRIVATE_KEY", "API_KEY"),
}
_BUILT_IN: Final = frozenset(kind for kinds in KINDS.values() for kind in kinds)

_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DIGITS = b"0123456789"
_WORD_CHARS = _DIGITS + _UPPER + _UPPER.lower() + b"_-"
_SHAPE: Final = bytes.maketrans(_DIGITS + _UPPER, b"0" * 10 + b"A" * 26)
_WORDS: Final = bytes(ord("w") if c in _WORD_CHARS else ord(" ") for c in range(256))

# --- Cards, SSNs, phones ----------------------------------------------------------------------------------

# kind: (its shape on the skeleton after the first three digits of a run, its exact pattern on the text).
# A shape may accept more than its pattern, never less.
_DIGIT_KINDS: Final[dict[str, tuple[bytes, str]]] = {
    # 13-19 digits, bare or in groups (4-4-4-4, Amex 4-6-5, 4-4-4-4-3) joined by one kind of separator;
    # never the middle of a longer number.
    "CARD": (
        rb"0{10,16}|0(?: 0{4,6}(?: 0{3,5}){1,3}|-0{4,6}(?:-0{3,5}){1,3})",
        r"(?<![\w.])(?<!\d[ -])(?:\d{13,19}|\d{4}(?: \d{4,6}(?: \d{3,5}){1,3}|-\d{4,6}(?:-\d{3,5}){1,3}))"
        r"(?!\w|[ -]\d)",
    ),
    # 123-45-6789 only; area 000, 666 and 900-999, group 00 and serial 0000 are never issued.
    "SSN": (rb"-00-0000", r"(?<![\w-])(?!000|666|9)\d{3}-(?!00)\d\d-(?!0000)\d{4}(?!\w|-\d)"),
    # A leading + or separators, never a bare run of digits. International: +country code, then 2-6 groups,
    # maybe parenthesised (+44 20 7946 0958, +1 (415) 555-2671, +33 1 23 45 67 89), found from the + (see
    # _INTERNATIONAL) rather than a shape. North American: (415) 555-2671, 415-555-2671, 415.555.2671, with
    # area code and exchange starting 2-9.
    "PHONE": (
        rb"(?:-000-|\.000\.|\) ?000[-. ])0000",
        r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}+(?!\d)"
        r"|(?<!\w)\([2-9]\d\d\) ?[2-9]\d\d[-. ]\d{4}(?!\w|[-.]\d)"
        r"|(?<![\w.+-])[2-9]\d\d(?:-[2-9]\d\d-|\.[2-9]\d\d\.)\d{4}(?!\w|[-.]\d)",
    ),
}
# + then 8 digits, each after at most three of ` .()-`: an international phone may start here; +12.3% may not.
_INTERNATIONAL: Final = re.compile(rb"\+(?=(?:[ .()-]{0,3}0){8})")

_DOUBLED: Final = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # Luhn: a digit doubled, digits of the result summed


def _is_card(candidate: str) -> bool:
    digits = [ord(c) - 48 for c in candidate if c != " " and c != "-"]
    # No issuer number starts with 0; rejecting it also drops 0000 0000 0000 0000, which passes Luhn.
    if not 13 <= len(digits) <= 19 or digits[0] == 0:
        return False
    return (sum(digits[-1::-2]) + sum(_DOUBLED[d] for d in digits[-2::-2])) % 10 == 0


def _is_phone(candidate: str) -> bool:
    # E.164 allows at most 15 digits; fewer than 8 with a country code is a number, not a phone.
    return candidate[0] != "+" or 8 <= sum(c.isdigit() for c in candidate) <= 15


_CHECKS: Final[dict[str, Callable[[str], bool]]] = {"CARD": _is_card, "PHONE": _is_phone}

# --- IBANs, NINOs: tried where the shape has `AA ?00` -----------------------------------------------------

_CAPS_DIGITS: Final = re.compile(rb"AA ?00")
_IBAN: Final = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d\d(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)(?![A-Za-z0-9])",
    re.ASCII,
)
# HMRC: neither letter D F I Q U V, second not O, prefixes BG GB KN NK NT TN ZZ unused; suffix A-D.
_NINO: Final = re.compile(
    r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d\d ?\d\d ?\d\d ?[A-D]"
    r"(?![A-Za-z0-9])",
    re.ASCII,
)
# ISO 7064 mod 97-10: letters count as 10-35.
_IBAN_NUMBERS: Final = str.maketrans({chr(c): str(c - 55) for c in _UPPER})


def _is_iban(candidate: str) -> bool:
    code = candidate.replace(" ", "")
    return 15 <= len(code) <= 34 and int((code[4:] + code[:4]).translate(_IBAN_NUMBERS)) % 97 == 1


_LetterKind = tuple[str, re.Pattern[str], Callable[[str], bool] | None]  # kind, pattern, validator
_LETTER_KINDS: Final[tuple[_LetterKind, ...]] = (("IBAN", _IBAN, _is_iban), ("NINO", _NINO, None))

# --- Secrets ----------------------------------------------------------------------------------------------

_KEY_MIN: Final = 16  # every API key shape below is at least this long
_KEY_RUN: Final = b"w" * _KEY_MIN
_KEY_PREFIXES: Final = ("sk-", "sk_live_", "rk_live_", "AKIA", "ASIA", "AIza", "gh", "github_pat_", "xox", "hf_", "eyJ")
_API_KEY: Final = re.compile(
    "(?:"
    + "|".join(
        (
            r"sk-ant-(?:api|admin)\d\d-[\w-]{20,}",  # Anthropic
            r"sk-[\w-]{20,}",  # OpenAI, sk-proj-… included
            r"(?:AKIA|ASIA)[A-Z0-9]{16}",  # AWS access key id
            r"AIza[\w-]{35}",  # Google API key
            r"gh[pousr]_[A-Za-z0-9]{36}",  # GitHub tokens
            r"github_pat_\w{22,}",  # GitHub fine-grained token
            r"xox[baprs]-[A-Za-z0-9-]{11,}",  # Slack
            r"[sr]k_live_[A-Za-z0-9]{24,}",  # Stripe secret and restricted keys
            r"hf_[A-Za-z]{34}",  # Hugging Face
            r"eyJ[\w-]{10,}\.eyJ[\w-]{10,}\.[\w-]+",  # JWT: base64url of '{"' header and payload
        )
    )
    + r")(?![\w-])",
    re.ASCII,
)
_PEM_BEGIN: Final = re.compile(r"-----BEGIN ((?:RSA |EC |OPENSSH |DSA |ENCRYPTED )?)PRIVATE KEY-----")

# --- Emails: tried around each @ --------------------------------------------------------------------------

_LOCAL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_EMAIL: Final = re.compile(
    r"[A-Za-z0-9_%+-][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
    r"(?![A-Za-z0-9-])"
)


@final
class Detector:
    """Finds the chosen built-in kinds and custom patterns (name → regex, kind = name upper-cased) in text."""

    __slots__ = ("_custom", "_digits", "_email", "_keys", "_letters", "_pem", "_phones")

    def __init__(self, kinds: Iterable[str] = (), patterns: Mapping[str, str] = {}):
        wanted = set(kinds)
        if unknown := wanted - _BUILT_IN:
            raise ValueError(f"unknown guardrail kinds {sorted(unknown)}; expected some of {sorted(_BUILT_IN)}")
        digit_kinds = [kind for kind in _DIGIT_KINDS if kind in wanted]
        self._digits: tuple[re.Pattern[bytes], re.Pattern[str]] | None = None  # (shapes, exact patterns)
        if digit_kinds:
            shapes = b"|".join(_DIGIT_KINDS[kind][0] for kind in digit_kinds)
            exact = "|".join(f"(?P<{kind}>{_DIGIT_KINDS[kind][1]})" for kind in digit_kinds)
            self._digits = (re.compile(rb"000(?<!0000)(?:" + shapes + rb")"), re.compile(exact, re.ASCII))
        self._phones = "PHONE" in wanted
        self._letters = tuple(letter_kind for letter_kind in _LETTER_KINDS if letter_kind[0] in wanted)
        self._email = "EMAIL" in wanted
        self._keys = "API_KEY" in wanted
        self._pem = "PRIVATE_KEY" in wanted
        custom: list[tuple[str, re.Pattern[str]]] = []
        for name, pattern in patterns.items():
            if not name:
                raise ValueError(f"guardrail pattern {pattern!r} needs a non-empty name")
            try:
                custom.append((name.upper(), re.compile(pattern)))
            except re.error as exc:
                raise ValueError(f"guardrail pattern {name!r} is not a valid regular expression: {exc}") from None
        self._custom = tuple(custom)

    def find(self, text: str) -> list[Match]:
        """Every match, sorted by start; of overlapping ones the earlier, then the longer, is kept."""
        if not text:
            return []
        found: list[Match] = []
        if self._digits is not None or self._letters or self._keys:
            ascii_text = text.encode("ascii", "replace")  # one byte a character, so offsets carry over
            if self._digits is not None or self._letters:
                shape = ascii_text.translate(_SHAPE)
                if self._digits is not None:
                    _find_digit_kinds(text, shape, *self._digits, self._phones, found)
                if self._letters:
                    _find_letter_kinds(text, shape, self._letters, found)
            if self._keys:
                _find_api_keys(text, ascii_text.translate(_WORDS), found)
        if self._email:
            _find_emails(text, found)
        if self._pem:
            _find_private_keys(text, found)
        for kind, regex in self._custom:
            found.extend(Match(m.start(), m.end(), kind) for m in regex.finditer(text) if m.end() > m.start())
        if len(found) < 2:
            return found
        found.sort(key=lambda m: (m.start, -m.end))
        kept = [found[0]]
        for match in found[1:]:
            if match.start >= kept[-1].end:
                kept.append(match)
        return kept

    def redact(self, text: str) -> tuple[str, list[Match]]:
        """`text` with each match replaced by `[KIND]`, and the matches; `text` itself when nothing matched."""
        matches = self.find(text)
        if not matches:
            return text, matches
        parts: list[str] = []
        done = 0
        for start, end, kind in matches:
            parts += (text[done:start], "[", kind, "]")
            done = end
        parts.append(text[done:])
        return "".join(parts), matches


def _find_digit_kinds(
    text: str, shape: bytes, shapes: re.Pattern[bytes], exact: re.Pattern[str], phones: bool, found: list[Match]
) -> None:
    pos = 0
    while (candidate := shapes.search(shape, pos)) is not None:
        start = candidate.start()
        m = None
        if start and text[start - 1] == "(":  # (415) 555-2671 starts one character before its digits
            m = exact.match(text, start - 1)
        if m is None:
            m = exact.match(text, start)
        if m is not None and _is_valid(m):
            found.append(Match(m.start(), m.end(), m.lastgroup or ""))
            pos = m.end()
        else:  # another candidate may start inside a rejected one
            pos = start + 1
    if phones:
        for candidate in _INTERNATIONAL.finditer(shape):
            m = exact.match(text, candidate.start())
            if m is not None and _is_valid(m):
                found.append(Match(m.start(), m.end(), "PHONE"))


def _is_valid(m: re.Match[str]) -> bool:
    check = _CHECKS.get(m.lastgroup or "")
    return check is None or check(m[0])


def _find_letter_kinds(text: str, shape: bytes, kinds: tuple[_LetterKind, ...], found: list[Match]) -> None:
    for candidate in _CAPS_DIGITS.finditer(shape):
        for kind, pattern, check in kinds:
            m = pattern.match(text, candidate.start())
            if m is not None and (check is None or check(m[0])):
                found.append(Match(m.start(), m.end(), kind))
                break


def _find_api_keys(text: str, words: bytes, found: list[Match]) -> None:
    # Searching from a space (or the start), the first run of 16 `w` begins a word; the next space ends it.
    start = words.find(_KEY_RUN)
    while start != -1:
        if text.startswith(_KEY_PREFIXES, start) and (m := _API_KEY.match(text, start)) is not None:
            found.append(Match(start, m.end(), "API_KEY"))
        end = words.find(b" ", start + _KEY_MIN)
        start = -1 if end == -1 else words.find(_KEY_RUN, end)


def _find_emails(text: str, found: list[Match]) -> None:
    at = text.find("@")
    while at != -1:
        start = at
        while start and text[start - 1] in _LOCAL_CHARS:
            start -= 1
        while start < at and text[start] == ".":  # an address does not start with a dot: "see...jane@"
            start += 1
        m = _EMAIL.match(text, start)
        if m is None:
            at = text.find("@", at + 1)
            continue
        found.append(Match(start, m.end(), "EMAIL"))
        at = text.find("@", m.end())


def _find_private_keys(text: str, found: list[Match]) -> None:
    begin = text.find("-----BEGIN ")
    while begin != -1:
        m = _PEM_BEGIN.match(text, begin)
        if m is None:
            begin = text.find("-----BEGIN ", begin + 1)
            continue
        footer = f"-----END {m[1]}PRIVATE KEY-----"
        end = text.find(footer, m.end())
        end = len(text) if end == -1 else end + len(footer)  # no END line: the rest is key material
        found.append(Match(begin, end, "PRIVATE_KEY"))
        begin = text.find("-----BEGIN ", end)
