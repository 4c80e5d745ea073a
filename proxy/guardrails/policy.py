"""Guardrail policies: what the gateway checks in requests before a provider sees them, and in answers.

`Guardrails(config)` compiles `guardrails.policies` once (at start-up and at a reload). A request is under
the policies of `guardrails.default`, of its team (`guardrails.teams`) and of its key (the keys API's
`guardrails`), in that order, each once; none → no guardrail work at all.

Request checks see every text part of the request: Chat, Responses and Messages requests are read through
the neutral form the translators share (so one policy covers every SDK: system prompts, tool results and
tool-call arguments included); embeddings, moderations, images and speech by their `input`/`prompt`. What a
match does is the policy's action:

- `block`: 400 `guardrail_blocked`, naming the policy and the kinds found, never the text;
- `redact`: each match is replaced by `[KIND]` in the body the provider gets, and nothing else changes: the
  match's JSON-encoded bytes are replaced where they occur (every occurrence). Only when a match is not found
  as the client encoded it (the client escaped characters orjson does not) is the body re-encoded;
- `log`: the request goes on; the generation record (`guardrails`) and `gateway_guardrail_matches_total`
  say what matched;
- `clamp` (max_tokens): the output bound is lowered to the ceiling.

Answers: a non-streamed answer is checked as it is sent (block, redact or log); a streamed one is checked
when it ends, on the text it carried (up to `guardrails.max_scan_bytes`), for the record only: its events
are already with the client.

Webhooks get the texts (after redaction by the policies before them) as JSON, all webhook policies of a
request at once, each bounded by its `timeout_ms`; down, slow or garbled means `on_error`: `open` (go on, a
WARNING and `gateway_guardrail_errors_total`) or `closed` (503).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, final

import orjson

from proxy.errors import Code, GatewayError
from proxy.guardrails.detect import KINDS, Detector

if TYPE_CHECKING:
    import aiohttp

    from proxy.config import GuardrailPolicy, GuardrailsConfig
    from proxy.store.base import KeyRecord

log = logging.getLogger("proxy.guardrails")

# Members of an answer (any surface) that are not text a person or a model wrote.
_NOT_TEXT: Final = frozenset(
    {
        "id",
        "object",
        "model",
        "role",
        "type",
        "finish_reason",
        "stop_reason",
        "status",
        "system_fingerprint",
        "call_id",
        "name",
        "index",
        "usage",
        "meta",
        "cost",
        "cost_nanos",
        "service_tier",
        "created",
        "created_at",
        "event",
        "signature",
        "b64_json",
        "embedding",
        "logprobs",
    }
)
# Request members read when a surface has no translator into the neutral form.
_INPUTS: Final = ("input", "prompt", "instructions", "system")
# Where each surface's request names its output bound, the first one present wins (else the last is set).
_BOUND_FIELDS: Final = {
    "openai.chat": ("max_completion_tokens", "max_tokens"),
    "openai.responses": ("max_output_tokens",),
    "anthropic.messages": ("max_tokens",),
}
_ERROR_LOG_EVERY_S: Final = 60.0  # a failing webhook is logged at most this often


@final
class Policy:
    """One compiled policy."""

    __slots__ = (
        "action",
        "allow",
        "check",
        "deny",
        "detector",
        "fail_closed",
        "headers",
        "max",
        "name",
        "on_request",
        "on_response",
        "timeout",
        "url",
    )

    def __init__(self, name: str, config: GuardrailPolicy):
        self.name = name
        self.check = config.check
        self.action = config.action
        self.on_request = config.stage in ("request", "both")
        self.on_response = config.stage in ("response", "both")
        self.max = config.max
        self.allow = frozenset(config.allow)
        self.deny = frozenset(config.deny)
        self.url = config.url
        self.headers = dict(config.headers)
        self.timeout = config.timeout_ms / 1000
        self.fail_closed = config.on_error == "closed"
        self.detector: Detector | None = None
        if config.check in KINDS:
            self.detector = Detector(config.kinds or KINDS[config.check])
        elif config.check == "regex":
            self.detector = Detector((), config.patterns)


@final
class Guardrails:
    """The configured policies, and which of them each request is under."""

    __slots__ = (
        "_by_key",
        "_default",
        "_errors",
        "_logged_at",
        "_matches",
        "_teams",
        "max_scan_bytes",
        "policies",
        "session",
    )

    def __init__(self, config: GuardrailsConfig, matches: Any = None, errors: Any = None):
        self.max_scan_bytes = config.max_scan_bytes
        self.policies = {name: Policy(name, policy) for name, policy in config.policies.items()}
        self._default = tuple(self.policies[name] for name in config.default)
        self._teams = {team: tuple(self.policies[n] for n in names) for team, names in config.teams.items()}
        self._by_key: dict[tuple[str, tuple[str, ...]], tuple[Policy, ...]] = {}
        self._matches = matches  # gateway_guardrail_matches_total{policy, stage, action}
        self._errors = errors  # gateway_guardrail_errors_total{policy}
        self.session: aiohttp.ClientSession | None = None
        self._logged_at: dict[str, float] = {}

    def of(self, key: KeyRecord) -> tuple[Policy, ...]:
        """The policies `key`'s requests are under: the default ones, its team's, its own; each once."""
        if not self.policies:
            return ()
        which = (key.team_name, key.guardrails)
        found = self._by_key.get(which)
        if found is None:
            chosen = [*self._default, *self._teams.get(key.team_name, ())]
            chosen += [self.policies[name] for name in key.guardrails if name in self.policies]
            found = self._by_key[which] = tuple(dict.fromkeys(chosen))
        return found

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    # -- requests

    async def check_request(
        self,
        policies: Sequence[Policy],
        surface: str,
        body: bytes,
        bound: int | None,
        model: str,
        key: KeyRecord,
        found: list[dict[str, Any]],
    ) -> bytes:
        """Run the request policies on a request for `model` with output bound `bound` (its max_tokens): the
        body to send on (redacted, clamped, or `body` itself); what matched is added to `found`, a block's
        too. GatewayError 400 `guardrail_blocked` when a policy blocks it (503: a closed webhook could not
        tell)."""
        clamp: Policy | None = None
        texts: list[str] | None = None
        replacements: dict[str, str] = {}  # matched text → its placeholder
        hooks: list[Policy] = []
        for policy in policies:
            if not policy.on_request:
                continue
            check = policy.check
            if check == "models":
                if model in policy.deny or (policy.allow and model not in policy.allow):
                    raise self._block(policy, "request", found, f"the model {model!r} is not allowed")
            elif check == "max_tokens":
                if bound is None or bound > policy.max:
                    if policy.action == "block":
                        if bound is not None:  # no bound named: the provider's default, not a breach
                            why = f"max_tokens {bound} is over its ceiling of {policy.max}"
                            raise self._block(policy, "request", found, why)
                    elif clamp is None or policy.max < clamp.max:
                        clamp = policy
            elif check == "webhook":
                hooks.append(policy)
            else:
                if texts is None:
                    texts = request_texts(surface, body)
                if check == "prompt_tokens":
                    tokens = sum(len(text) for text in texts) // 4
                    if tokens > policy.max:
                        why = f"its prompt of about {tokens} tokens is over {policy.max}"
                        if policy.action == "block":
                            raise self._block(policy, "request", found, why)
                        self._count(policy, "request", policy.action)
                        found.append({"policy": policy.name, "stage": "request", "action": "log", "tokens": tokens})
                    continue
                seen = texts if not replacements else [_apply(t, replacements) for t in texts]  # after redactions
                self._scan(policy, "request", seen, replacements, found)
        if replacements:
            body = redact_body(body, replacements, _redactors(policies))
        if clamp is not None:
            body = _clamp(surface, body, clamp.max)
            self._count(clamp, "request", "clamp")
            found.append({"policy": clamp.name, "stage": "request", "action": "clamp", "max": clamp.max})
        if hooks:
            if texts is None:
                texts = request_texts(surface, body)
            elif replacements:
                texts = [_apply(text, replacements) for text in texts]
            await self._webhooks(hooks, "request", texts, surface, model, key.team_name, key.kid, found)
        return body

    # -- answers

    def check_answer(self, policies: Sequence[Policy], data: bytes, found: list[dict[str, Any]]) -> dict[str, str]:
        """Run the built-in response policies on a whole answer (its JSON, any surface's): the replacements
        of its redaction (matched text → placeholder); what matched is added to `found`. GatewayError 400 when
        a policy blocks it. (Webhooks: `answer_webhooks`.)"""
        replacements: dict[str, str] = {}
        texts: list[str] | None = None
        for policy in policies:
            if not policy.on_response or policy.detector is None:
                continue
            if texts is None:
                texts = answer_texts(data)
            self._scan(policy, "response", texts, replacements, found)
        return replacements

    def _scan(
        self,
        policy: Policy,
        stage: str,
        texts: list[str],
        replacements: dict[str, str],
        found: list[dict[str, Any]],
        action: str = "",
    ) -> None:
        """One detecting policy on `texts`: blocks (GatewayError), or adds its placeholders to `replacements`
        (redact) and what it found to `found`. `action`: in place of the policy's (a stream's is `log`)."""
        assert policy.detector is not None
        action = action or policy.action
        kinds: dict[str, int] = {}
        for text in texts:
            for match in policy.detector.find(text):
                kinds[match.kind] = kinds.get(match.kind, 0) + 1
                if action == "redact":
                    replacements[text[match.start : match.end]] = f"[{match.kind}]"
        if not kinds:
            return
        if action == "block":
            what = "it contains" if stage == "request" else "its answer contains"
            raise self._block(policy, stage, found, f"{what} {_kinds(kinds)}", kinds)
        self._count(policy, stage, action)
        found.append({"policy": policy.name, "stage": stage, "action": action, "kinds": kinds})

    def check_stream(self, policies: Sequence[Policy], events: bytes, found: list[dict[str, Any]]) -> None:
        """What the response policies find in a finished stream's text (`events`: the SSE bytes the client
        got), added to `found` as `log` whatever the action: the events are already with the client."""
        texts = ["".join(stream_texts(events))]
        for policy in policies:
            if policy.on_response and policy.detector is not None:
                self._scan(policy, "response", texts, {}, found, "log")

    async def answer_webhooks(
        self,
        policies: Sequence[Policy],
        data: bytes,
        surface: str,
        model: str,
        who: tuple[str, str],
        found: list[dict[str, Any]],
    ) -> None:
        """The webhook response policies' verdicts on a whole answer (its JSON), added to `found` (`who`: the
        team's name, the key's id). GatewayError when one blocks it."""
        hooks = [p for p in policies if p.on_response and p.check == "webhook"]
        if hooks:
            await self._webhooks(hooks, "response", answer_texts(data), surface, model, *who, found)

    # -- webhooks

    async def _webhooks(
        self,
        hooks: list[Policy],
        stage: str,
        texts: list[str],
        surface: str,
        model: str,
        team: str,
        kid: str,
        found: list[dict[str, Any]],
    ) -> None:
        payload = {"stage": stage, "surface": surface, "model": model, "team": team, "key_id": kid, "texts": texts}
        verdicts = await asyncio.gather(*(self._ask(hook, {**payload, "policy": hook.name}) for hook in hooks))
        for hook, (flagged, reason) in zip(hooks, verdicts, strict=True):
            if flagged is None:  # it could not tell
                if hook.fail_closed:
                    raise GatewayError(
                        Code.unavailable,
                        f"The guardrail {hook.name!r} could not check this request (its service did not answer "
                        "in time or answered nonsense); retry shortly.",
                    )
                found.append({"policy": hook.name, "stage": stage, "action": "error", "reason": reason})
                continue
            if flagged:
                action = hook.action
                if action == "block":
                    raise self._block(hook, stage, found, reason or "its service flagged it")
                self._count(hook, stage, action)
                found.append({"policy": hook.name, "stage": stage, "action": action, "reason": reason})

    async def _ask(self, hook: Policy, payload: dict[str, Any]) -> tuple[bool | None, str]:
        """(flagged, its reason); (None, why) when the service could not tell."""
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(hook.timeout):
                async with self.session.post(
                    hook.url, data=orjson.dumps(payload), headers={"Content-Type": "application/json", **hook.headers}
                ) as r:
                    body = await r.read()
                    status = r.status
        except TimeoutError:
            return self._failed(hook, f"no answer within {hook.timeout * 1000:.0f} ms")
        except aiohttp.ClientError as e:
            return self._failed(hook, f"{type(e).__name__}: {e}")
        if status != 200:
            return self._failed(hook, f"it answered HTTP {status}")
        try:
            verdict = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._failed(hook, "its answer is not JSON")
        if not isinstance(verdict, dict) or not isinstance(verdict.get("flagged"), bool):
            return self._failed(hook, 'its answer has no boolean "flagged"')
        reason = verdict.get("reason")
        return verdict["flagged"], reason[:200] if isinstance(reason, str) else ""

    def _failed(self, hook: Policy, why: str) -> tuple[None, str]:
        if self._errors is not None:
            self._errors.labels(hook.name).inc()
        now = asyncio.get_running_loop().time()
        if now - self._logged_at.get(hook.name, -_ERROR_LOG_EVERY_S) >= _ERROR_LOG_EVERY_S:
            self._logged_at[hook.name] = now
            log.warning(
                "guardrail %r: the webhook %s failed: %s; requests %s (on_error: %s; logged once a minute)",
                hook.name,
                hook.url,
                why,
                "are refused with 503" if hook.fail_closed else "go on unchecked by it",
                "closed" if hook.fail_closed else "open",
            )
        return None, why

    def _block(
        self, policy: Policy, stage: str, found: list[dict[str, Any]], why: str, kinds: dict[str, int] | None = None
    ) -> GatewayError:
        """The 400 of a block, counted and added to `found` (the record says which policy, never the text)."""
        self._count(policy, stage, "block")
        found.append({"policy": policy.name, "stage": stage, "action": "block", **({"kinds": kinds} if kinds else {})})
        what = "The answer to this request was withheld" if stage == "response" else "This request was blocked"
        return GatewayError(Code.guardrail_blocked, f"{what} by the guardrail policy {policy.name!r}: {why}.")

    def _count(self, policy: Policy, stage: str, action: str) -> None:
        if self._matches is not None:
            self._matches.labels(policy.name, stage, action).inc()


@final
class Guarded:
    """A request's policies, for its answer: checked whole, or (streamed) on the text kept while it ran."""

    __slots__ = ("answers", "guardrails", "policies", "scan", "scan_limit", "who")

    def __init__(self, guardrails: Guardrails, policies: tuple[Policy, ...], who: tuple[str, str], stream: bool):
        self.guardrails = guardrails
        self.policies = policies
        self.who = who  # the team's name, the key's id
        self.answers = any(p.on_response for p in policies)
        self.scan = bytearray() if stream and self.answers else None  # the stream's events, for the end
        self.scan_limit = guardrails.max_scan_bytes

    async def check_answer(self, data: bytes, meta: Any) -> dict[str, str]:
        """A whole answer (the provider's JSON) through the response policies: the replacements its redaction
        takes (for `redact`, once the client's answer is rendered). GatewayError when one blocks it."""
        found = meta.guardrails
        replacements = self.guardrails.check_answer(self.policies, data, found)
        await self.guardrails.answer_webhooks(self.policies, data, meta.surface, meta.model, self.who, found)
        return replacements

    def redact(self, data: bytes, replacements: dict[str, str]) -> bytes:
        return redact_body(data, replacements, _redactors(self.policies))

    def check_stream(self, meta: Any) -> None:
        """A finished stream's text through the built-in response policies, for the record (webhooks are
        not asked: the stream's end would wait for them)."""
        self.guardrails.check_stream(self.policies, bytes(self.scan or b""), meta.guardrails)


# -- texts


def request_texts(surface: str, body: bytes) -> list[str]:
    """Every text part of a request: through the neutral form for Chat, Responses and Messages; else its
    `input`/`prompt` members. A body the neutral form cannot read is searched whole (every string in it)."""
    from proxy.translators.exchange import SURFACES

    translator = SURFACES.get(surface)
    if translator is not None:
        try:
            request = translator.decode_request(body, True)
        except GatewayError:
            pass  # forwarded as it is to a provider that speaks it: every string it holds
        else:
            texts: list[str] = []
            for message in request.messages:
                content = message.content
                if isinstance(content, str):
                    texts.append(content)
                elif content:
                    texts += [part.text for part in content if part.text]
                texts += [call.function.arguments for call in message.tool_calls or () if call.function.arguments]
                texts += [t for t in (message.reasoning_content, message.refusal) if t]
            return texts
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if translator is None and isinstance(data, dict):
        return [text for member in _INPUTS if member in data for text in _strings(data[member])]
    return list(_strings(data))


def answer_texts(data: bytes) -> list[str]:
    """The texts of a whole answer (any surface's JSON): every string but ids, roles and the like."""
    try:
        return list(_strings(orjson.loads(data), _NOT_TEXT))
    except orjson.JSONDecodeError:
        return []


def stream_texts(events: bytes) -> Iterator[str]:
    """The texts of a stream's events, in order (deltas join into the answer's text)."""
    for line in events.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
            try:
                yield from _strings(orjson.loads(line[5:]), _NOT_TEXT)
            except orjson.JSONDecodeError:
                continue


def _strings(value: Any, skip: frozenset[str] = frozenset()) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for name, member in value.items():
            if name not in skip:
                yield from _strings(member, skip)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, skip)


# -- rewriting bodies


def redact_body(body: bytes, replacements: dict[str, str], detectors: Iterable[Detector]) -> bytes:
    """`body` with each matched text replaced by its placeholder, byte for byte where the client encoded it as
    orjson does; else the JSON re-encoded with every string redacted by `detectors`."""
    out = body
    for text, placeholder in sorted(replacements.items(), key=lambda item: -len(item[0])):  # longest first
        encoded = orjson.dumps(text)[1:-1]
        if encoded not in out:
            return _redact_all(body, list(detectors))
        out = out.replace(encoded, placeholder.encode())
    return out


def _redact_all(body: bytes, detectors: list[Detector]) -> bytes:
    def walk(value: Any) -> Any:
        if isinstance(value, str):
            for detector in detectors:
                value = detector.redact(value)[0]
            return value
        if isinstance(value, dict):
            return {name: walk(member) for name, member in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    return orjson.dumps(walk(orjson.loads(body)))


def _clamp(surface: str, body: bytes, ceiling: int) -> bytes:
    """The request with its output bound at most `ceiling` (set to it when it names none)."""
    data = orjson.loads(body)
    fields = _BOUND_FIELDS.get(surface, ("max_tokens",))
    named = [f for f in fields if isinstance(data.get(f), int)]
    for field in named or fields[-1:]:
        data[field] = min(data.get(field, ceiling), ceiling)
    return orjson.dumps(data)


def _apply(text: str, replacements: dict[str, str]) -> str:
    for match, placeholder in replacements.items():
        text = text.replace(match, placeholder)
    return text


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in kinds.items())


def _redactors(policies: Sequence[Policy]) -> list[Detector]:
    return [p.detector for p in policies if p.action == "redact" and p.detector is not None]
