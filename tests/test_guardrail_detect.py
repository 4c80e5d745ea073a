"""proxy.guardrails.detect: each built-in kind on real shapes and near misses, overlaps, redaction, custom patterns
and the speed budget (a 4 KB prompt in well under 50 µs on the dev box)."""

from __future__ import annotations

import random
import re
import timeit
from collections.abc import Callable

import pytest

from proxy.guardrails import detect
from proxy.guardrails.detect import KINDS, Detector, Match

ALL = Detector(KINDS["pii"] + KINDS["secrets"])

# Secrets are assembled at run time so that secret scanners do not flag this file.
OPENAI = "sk-" + "proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUvWxYz01"
ANTHROPIC = "sk-" + "ant-api03-" + "x7Yb2Kq9Lm4Np8Rs1Tu6Vw3Za5Cd0Ef" + "-" + "AbCdEf_123"
GITHUB = "gh" + "p_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
GITHUB_PAT = "github" + "_pat_" + "11ABCDEFG0123456789abc_" + "x" * 59
GOOGLE = "AI" + "za" + "SyD-1234567890abcdefghijklmnopqrstu"
SLACK = "xo" + "xb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
STRIPE = "sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_RESTRICTED = "rk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc"
HUGGING_FACE = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"
AWS = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_TEMPORARY = "ASIA" + "Y34FZKBOKMUTVV7A"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkphbmUifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
    "-----END RSA PRIVATE KEY-----"
)


def kinds(text: str, detector: Detector = ALL) -> list[tuple[str, str]]:
    """What `detector` finds in `text`, as (kind, matched text)."""
    return [(m.kind, text[m.start : m.end]) for m in detector.find(text)]


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("EMAIL", "jane.doe+tag@mail.example.co.uk"),
        ("EMAIL", "j_smith@example.com"),
        ("PHONE", "+44 20 7946 0958"),
        ("PHONE", "+1 (415) 555-2671"),
        ("PHONE", "+33 1 23 45 67 89"),
        ("PHONE", "+14155552671"),
        ("PHONE", "(415) 555-2671"),
        ("PHONE", "415-555-2671"),
        ("PHONE", "415.555.2671"),
        ("CARD", "4111 1111 1111 1111"),
        ("CARD", "4111-1111-1111-1111"),
        ("CARD", "4111111111111111"),
        ("CARD", "3782 822463 10005"),  # Amex grouping
        ("CARD", "5555555555554444"),
        ("IBAN", "GB82 WEST 1234 5698 7654 32"),
        ("IBAN", "DE89370400440532013000"),
        ("IBAN", "NO93 8601 1117 947"),  # the shortest, 15 characters
        ("SSN", "123-45-6789"),
        ("NINO", "AB 12 34 56 C"),
        ("NINO", "AB123456C"),
        ("NINO", "JG 10 37 59 A"),
        ("PRIVATE_KEY", PEM),
        ("PRIVATE_KEY", PEM.replace("RSA ", "OPENSSH ")),
        ("PRIVATE_KEY", PEM.replace("RSA ", "")),
        ("API_KEY", OPENAI),
        ("API_KEY", "sk-" + "A" * 48),  # legacy OpenAI key
        ("API_KEY", ANTHROPIC),
        ("API_KEY", AWS),
        ("API_KEY", AWS_TEMPORARY),
        ("API_KEY", GOOGLE),
        ("API_KEY", GITHUB),
        ("API_KEY", GITHUB_PAT),
        ("API_KEY", SLACK),
        ("API_KEY", STRIPE),
        ("API_KEY", STRIPE_RESTRICTED),
        ("API_KEY", HUGGING_FACE),
        ("API_KEY", JWT),
    ],
)
def test_each_kind_found_alone_and_in_a_sentence(kind: str, value: str) -> None:
    assert kinds(value) == [(kind, value)]
    text = f"Please use ({value}), thanks."
    assert kinds(text) == [(kind, value)]
    assert kinds(text, Detector([kind])) == [(kind, value)]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "foo@bar is not an address, nor is @handle or a@b.c",
        "In 2023 we had 40 users; in 2024 about 1200.",
        "The release is on 2024-01-15 or 15/01/2024 at 10:30.",
        "Upgrade from 1.2.3 to 10.0.19041.1234 (v2.10.3).",
        "The server is at 192.168.100.200 and 10.0.0.255:8080.",
        "Call 4155552671 or 555-2671 or 12345.",  # a bare 10-digit run, and short numbers
        "Scores went +100 to +2024, or +12.3% (+1,234,567).",
        "2024-01-15 10:32:11.482 INFO GET /api/v1/users/48213 200 12.4ms 192.168.10.24 req_id=7f3a9c2e",
        "| 2023-Q4 | 1,234,567 | 89.5% | +12.3% | 4,411 |",
        "4111111111111112",  # 16 digits failing Luhn
        "4111 1111 1111 1112",
        "0000 0000 0000 0000",  # passes Luhn, but no issuer number starts with 0
        "411111111111111111111111",  # a longer run than any card
        "ID 12344111111111111111 has a card-like tail",
        "GB83 WEST 1234 5698 7654 32",  # wrong check digits
        "DE88370400440532013000",
        "gb82 west 1234 5698 7654 32",  # country code letters must be upper-case
        "000-12-3456, 666-12-3456, 900-12-3456, 123-00-4567, 123-45-0000",
        "DA123456C AO123456C BG123456C GB123456C AB123456E",  # NINO prefix and suffix exclusions
        "task-manager, risk-assessment, desk-top, sk-short, ghp_short, AKIA1234, hf_abc",
        "mask-" + "a" * 30,  # sk- inside a word
        "xAKIAIOSFODNN7EXAMPLE and AKIAIOSFODNN7EXAMPLEX",  # no word boundary
        "550e8400-e29b-41d4-a716-446655440000 and 123e4567-e89b-12d3-a456-426614174000",  # UUIDs
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        "café naïve — 北京 🙂 " * 5,
    ],
)
def test_near_misses_find_nothing(text: str) -> None:
    assert ALL.find(text) == []


def test_a_uuid_is_neither_card_phone_nor_key() -> None:
    uuid = "426614174000-1111-4111-1111-111111111111"
    for kind in ("CARD", "PHONE", "API_KEY"):
        assert Detector([kind]).find(uuid) == []


def test_cards_win_over_phones_and_dates_are_not_phones() -> None:
    text = "Card 4111 1111 1111 1111, phone 415-555-2671, due 2024-01-15, SSN 123-45-6789."
    assert kinds(text) == [
        ("CARD", "4111 1111 1111 1111"),
        ("PHONE", "415-555-2671"),
        ("SSN", "123-45-6789"),
    ]


def test_a_private_key_without_end_line_runs_to_the_end() -> None:
    text = "key:\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yBq"
    assert ALL.find(text) == [Match(5, len(text), "PRIVATE_KEY")]


def test_the_private_key_block_ends_at_its_matching_end_line() -> None:
    text = f"a\n{PEM}\nb -----END OPENSSH PRIVATE KEY-----"
    assert kinds(text) == [("PRIVATE_KEY", PEM)]


def test_positions_are_str_indices_after_non_ascii_text() -> None:
    text = f"Ünïcödé 🙂 — card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, key {OPENAI}, bye"
    assert kinds(text) == [
        ("CARD", "4111 1111 1111 1111"),
        ("IBAN", "GB82 WEST 1234 5698 7654 32"),
        ("API_KEY", OPENAI),
    ]


def test_several_emails_close_together() -> None:
    text = "a@x.io,b.c@y.org;@z; d@e ...e.f@g.com"
    assert kinds(text) == [("EMAIL", "a@x.io"), ("EMAIL", "b.c@y.org"), ("EMAIL", "e.f@g.com")]


def test_overlapping_candidates_keep_the_earlier_then_the_longer() -> None:
    # The phone is inside the email, which starts at the same place and is longer.
    assert kinds("mail 415-555-2671@example.com") == [("EMAIL", "415-555-2671@example.com")]
    # A custom match starting earlier wins over the card inside it.
    detector = Detector(KINDS["pii"], {"order": r"order 4111"})
    assert kinds("order 4111 1111 1111 1111", detector) == [("ORDER", "order 4111")]
    # A custom match starting at the same place but shorter loses.
    detector = Detector(KINDS["pii"], {"group": r"\d{4} \d{4}"})
    assert kinds("4111 1111 1111 1111 and 1234 5678", detector) == [
        ("CARD", "4111 1111 1111 1111"),
        ("GROUP", "1234 5678"),
    ]


def test_redact_is_byte_exact() -> None:
    assert ALL.redact("mail jane@example.com now") == ("mail [EMAIL] now", [Match(5, 21, "EMAIL")])
    text = f"Call +44 20 7946 0958 or jane@example.com.\nKey: {OPENAI}\nCard 4111-1111-1111-1111"
    redacted, matches = ALL.redact(text)
    assert redacted == "Call [PHONE] or [EMAIL].\nKey: [API_KEY]\nCard [CARD]"
    assert [m.kind for m in matches] == ["PHONE", "EMAIL", "API_KEY", "CARD"]


def test_redact_returns_the_same_str_when_nothing_matched() -> None:
    text = "".join(["nothing ", "to see here, version 1.2.3, task-manager"])
    redacted, matches = ALL.redact(text)
    assert redacted is text and matches == []
    empty = ""
    assert ALL.redact(empty)[0] is empty
    assert Detector().redact("jane@example.com")[0] == "jane@example.com"  # no kinds chosen


def test_only_the_chosen_kinds_are_found() -> None:
    text = f"jane@example.com 415-555-2671 {AWS}"
    assert kinds(text, Detector(["EMAIL"])) == [("EMAIL", "jane@example.com")]
    assert kinds(text, Detector(KINDS["secrets"])) == [("API_KEY", AWS)]
    assert Detector().find(text) == []


def test_custom_patterns_use_the_upper_cased_name() -> None:
    detector = Detector(patterns={"project_code": r"PRJ-\d{4}", "empty": r"x*"})
    text = "See PRJ-0042 and PRJ-7 and PRJ-1234."
    assert detector.find(text) == [Match(4, 12, "PROJECT_CODE"), Match(27, 35, "PROJECT_CODE")]
    assert detector.redact(text)[0] == "See [PROJECT_CODE] and PRJ-7 and [PROJECT_CODE]."


def test_bad_configuration_raises_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"guardrail pattern 'broken' .*missing \), unterminated subpattern"):
        Detector(patterns={"broken": r"(PRJ-\d+"})
    with pytest.raises(ValueError, match=r"unknown guardrail kinds \['PASSPORT'\]"):
        Detector(["EMAIL", "PASSPORT"])
    with pytest.raises(ValueError, match="non-empty name"):
        Detector(patterns={"": "x"})


def reference(pattern: re.Pattern[str], check: Callable[[str], bool] | None, text: str) -> list[tuple[int, int]]:
    """Every match of `pattern` that passes `check`, searched at every position of `text`: no skeletons."""
    spans, pos = [], 0
    while (m := pattern.search(text, pos)) is not None:
        if check is None or check(m[0]):
            spans.append(m.span())
            pos = m.end()
        else:
            pos = m.start() + 1
    return spans


PIECES = (
    *"0123456789",
    *(" ", "-", ".", "(", ")", "+", "/", ", ", ") ", " (", "a", "AB", "GB", "Q", "C", "x "),
    *("4111 1111 1111 1111", "4111111111111111", "3782 822463 10005", "123-45-6789", "415-555-2671"),
    *("(415) 555-2671", "415.555.2671", "+44 20 7946 0958", "+33 1 23 45 67 89", "+1 (415) (555) 2671"),
    *("GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "AB 12 34 56 C", "JG103759A"),
)


@pytest.mark.parametrize("kind", ["CARD", "SSN", "PHONE", "IBAN", "NINO"])
def test_skeleton_prefilters_never_miss_what_the_exact_pattern_finds(kind: str) -> None:
    """The skeleton shapes only choose where the exact patterns run; a shape narrower than its pattern loses matches."""
    if kind in detect._DIGIT_KINDS:
        pattern, check = re.compile(detect._DIGIT_KINDS[kind][1], re.ASCII), detect._CHECKS.get(kind)
    else:
        (_, pattern, check), *_ = (letter for letter in detect._LETTER_KINDS if letter[0] == kind)
    detector, rng, found = Detector([kind]), random.Random(kind), 0
    for _ in range(3000):
        text = "".join(rng.choices(PIECES, k=rng.randint(1, 12)))
        expected = reference(pattern, check, text)
        assert [(m.start, m.end) for m in detector.find(text)] == expected, text
        found += len(expected)
    assert found > 50  # the random texts do hold matches


PROMPT = (
    "I'm working on a task-manager app for our team and need help restructuring the onboarding flow. "
    "Right now new users land on a dashboard that shows every project at once, which is overwhelming. "
    "In the 2023 user survey, about 40 percent of respondents said they gave up within the first week. "
    "We are on version 1.2.3 of the backend and plan to ship 2.0 by 2024-01-15, after the risk-assessment "
    "review is finished. The frontend uses React 18 and TypeScript, and the API is a small Flask service. "
    "Could you propose a step-by-step flow (three to five screens) that introduces projects, tasks and "
    "comments gradually? Please also suggest copy for each screen, keeping the tone friendly but concise. "
    "Our designers prefer short sentences, active voice, and no jargon. We also want to measure whether "
    "the new flow works, so include two or three metrics we could track, such as the share of users who "
    "create their first task within 10 minutes. For context, the median session lasts 7 minutes and most "
    "people use the app on a laptop during work hours. Avoid anything that needs a large refactor: the "
    "team is four engineers and we have roughly 6 weeks. If you think the dashboard itself should change, "
    "explain why and sketch the layout in words. Finally, list the risks you see, ordered by impact. "
)
CLEAN_4K = (PROMPT * 4)[:4096]
MATCHES_4K = (
    "Contact jane.doe@example.com or call +44 20 7946 0958. "
    + CLEAN_4K[:1200]
    + "The card on file is 4111 1111 1111 1111. "
    + CLEAN_4K[1200:2600]
    + f"Staging uses OPENAI_API_KEY={OPENAI} and IBAN GB82 WEST 1234 5698 7654 32. "
    + CLEAN_4K[2600:]
)[:4096]


def best_us(detector: Detector, text: str, number: int = 200) -> float:
    return min(timeit.repeat(lambda: detector.find(text), number=number, repeat=7)) / number * 1e6


def test_a_4kb_prompt_is_checked_in_microseconds() -> None:
    assert [m.kind for m in ALL.find(MATCHES_4K)] == ["EMAIL", "PHONE", "CARD", "API_KEY", "IBAN"]
    assert ALL.find(CLEAN_4K) == []
    with_matches, clean = best_us(ALL, MATCHES_4K), best_us(ALL, CLEAN_4K)
    print(f"\nDetector(pii + secrets).find on 4 KB: {with_matches:.1f} µs with 5 matches, {clean:.1f} µs without")
    # The budget is 50 µs on the dev box; the bound here is loose so a slow or busy CI machine does not flake.
    assert with_matches < 500 and clean < 500
