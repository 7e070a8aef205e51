"""Secret scrubbing of ``call.done`` results (by key token, not substring; docs/architecture.md).

Three rules, applied to a copy of a JSON tree:

1. **Key rule, by token.** A key is split into tokens on ``_``, ``-``, ``.``, spaces and
   camelCase / digit boundaries and lower-cased. Its whole value (sub-trees included) becomes
   ``[REDACTED]`` when a token, or two adjacent tokens joined, is in the sensitive vocabulary
   (``db_password``, ``x_api_key``, ``accessToken``, ``client-secret``), or when a token *ends*
   with one of a few unmistakable words (``dbpassword``, ``csrftoken``). Upstream matches
   substrings, which redacts ``author``, ``tokens_used`` or ``monkey``; matching tokens keeps them.
2. **Value rules**, for strings under any key:
   - a whole string that is a PEM private key, an ``Authorization`` header value
     (``Bearer …`` / ``Basic …``) or a compact JWT becomes ``[REDACTED]`` — the whole string,
     because nothing else in such a value is useful;
   - inside longer text (stdout, logs, messages) only the offending part is replaced: an
     embedded PEM private-key block, an embedded JWT, or a vendor token (``sk-``, ``ghp_``,
     ``xoxb-``, ``AIza``, ``ya29.`` …) found at a word start — the rest of the text is kept.
3. **Known secret values** (the worker's own secrets, the keychain values and every secret this
   command resolved, at least 4 characters long) are replaced wherever they appear: verbatim,
   base64 (standard and URL-safe, at any alignment inside a longer base64 text, as in a
   ``Basic`` header), percent-encoded (``quote``/``quote_plus``, either hex case) and
   JSON-escaped — inside longer strings and inside keys too.

Where it applies: :meth:`Scrubber.scrub` (all rules) on tool results before they go inline, to
the result store or to shared memory; :meth:`Scrubber.scrub_payload` (value rules and known
secrets, no key rule) on every event payload the worker sends; :meth:`Scrubber.scrub_text` on
error messages; and :func:`active` — the running command's scrubber, else the process one —
in the log filter of ``logs.py``.

Numbers, booleans and null are never altered (snowflake ids stay intact).
"""

from __future__ import annotations

import base64
import contextvars
import functools
import itertools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote, quote_plus

import attrs

REDACTED: Final = "[REDACTED]"
MIN_SECRET_LENGTH: Final = 4
_MIN_VALUE_RULE_LENGTH: Final = 8
# Encoded forms shorter than this are not searched for: a 4-character base64 fragment occurs in
# ordinary text too often to be worth replacing.
_MIN_ENCODED_LENGTH: Final = 6

# Tokens (or two adjacent tokens joined) that make a key sensitive.
SENSITIVE_TOKENS: Final = frozenset(
    {
        "password", "passwords", "passwd", "pwd", "passphrase",
        "secret", "secrets", "token", "bearer", "apikey", "apisecret",
        "authorization", "auth", "credential", "credentials",
        "privatekey", "secretkey", "clientsecret", "accesstoken", "refreshtoken",
        "authtoken", "idtoken", "oauth", "jwt", "pem", "cert", "certificate",
        "keychain", "connectionstring", "sshkey", "encryptionkey", "decryptkey",
        "masterkey", "gcpkey", "azurekey", "sessionkey", "signingkey", "cookie",
    }
)  # fmt: skip
# A token ending with one of these is sensitive too: keys written without separators.
_SENSITIVE_SUFFIXES: Final = (
    "password", "passwd", "passphrase", "secret", "token", "apikey", "privatekey",
    "credential", "credentials",
)  # fmt: skip

_TOKEN_RE: Final = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

_PEM_BLOCK_RE: Final = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
_JWT_RE: Final = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_HEADER_RE: Final = re.compile(r"(?i)(?:bearer|basic)[ \t]+\S+")
_VENDOR_PREFIXES: Final = (
    "sk-ant-", "sk-", "AIza", "ya29.", "ghp_", "ghs_", "gho_", "ghu_", "ghr_", "github_pat_",
    "xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-",
)  # fmt: skip
_VENDOR_RE: Final = re.compile(
    r"(?:^|(?<=[ \t\r\n\"':=,]))(?:"
    + "|".join(re.escape(p) for p in _VENDOR_PREFIXES)
    + r")[A-Za-z0-9_-]{12,}",
    re.MULTILINE,
)


def key_tokens(key: str) -> list[str]:
    """``"x_api-Key.v2"`` → ``["x", "api", "key", "v", "2"]``; ``"accessToken"`` → access, token."""
    return [t.lower() for t in _TOKEN_RE.findall(key)]


@functools.lru_cache(maxsize=4096)  # the same few hundred keys come back on every result
def is_sensitive_key(key: str) -> bool:
    tokens = key_tokens(key)
    for index, token in enumerate(tokens):
        if token in SENSITIVE_TOKENS or token.endswith(_SENSITIVE_SUFFIXES):
            return True
        if index + 1 < len(tokens) and token + tokens[index + 1] in SENSITIVE_TOKENS:
            return True
    return False


def _is_secret_shaped(text: str) -> bool:
    """The whole-string value rules: PEM private key, Authorization header value, JWT."""
    stripped = text.strip()
    if len(stripped) < _MIN_VALUE_RULE_LENGTH:
        return False
    if stripped.startswith("-----BEGIN ") and "PRIVATE KEY-----" in stripped:
        return True
    if _HEADER_RE.fullmatch(stripped):
        return True
    return _JWT_RE.fullmatch(stripped) is not None


_SCALARS: Final = (int, float, bool, type(None))
# Cheap pre-check: a string none of these occur in needs no value rule at all.
# (Literal alternatives only: an anchored or case-insensitive branch makes it 4x slower.)
_VALUE_TRIGGERS: Final = r"eyJ|PRIVATE KEY-----|sk-|AIza|ya29\.|gh[psour]_|github_pat_|xox[baprs]-"
_HEADER_FIRST_CHARS: Final = frozenset("bB \t\r\n")


def _base64_cores(raw: bytes) -> set[str]:
    """The base64 characters that encode only ``raw``'s bits, at each of the 3 alignments.

    A secret inside a longer base64 text (``user:secret`` in a Basic header) starts at some byte
    offset; its encoding differs by offset mod 3. For each alignment, keep the characters whose
    6 bits all come from the secret — they appear in every base64 text containing it there.
    """
    cores: set[str] = set()
    n = len(raw)
    for k in range(3):
        first, end = -(-8 * k // 6), (8 * (k + n)) // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            core = encode(b"\0" * k + raw).decode()[first:end]
            if len(core) >= _MIN_ENCODED_LENGTH:
                cores.add(core)
    return cores


def encoded_forms(secret: str) -> set[str]:
    """The forms in which ``secret`` is searched for: verbatim and as commonly encoded."""
    forms = {secret}
    for encoded in (quote(secret, safe=""), quote(secret), quote_plus(secret, safe="")):
        forms.add(encoded)
        forms.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), encoded))
    forms.add(json.dumps(secret)[1:-1])
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    forms |= _base64_cores(secret.encode())
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


def bytes_forms(raw: bytes) -> set[str]:
    """Key material held as bytes (the sealing key): its base64 and hex text forms."""
    return {*_base64_cores(raw), raw.hex(), raw.hex().upper()}


@attrs.frozen
class Scrubber:
    """Scrubs JSON trees and text; build it with :meth:`create` from the command's secrets."""

    secrets: tuple[str, ...]
    _secret_re: re.Pattern[str] | None = attrs.field(repr=False, eq=False)
    _trigger_re: re.Pattern[str] = attrs.field(repr=False, eq=False)

    @classmethod
    def create(cls, secret_values: Iterable[str] = (), *, forms: Iterable[str] = ()) -> Scrubber:
        """``secret_values`` are searched for in every encoded form; ``forms`` as given."""
        values = {v for v in secret_values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH}
        return _create(frozenset(set().union(*map(encoded_forms, values), forms)))

    @classmethod
    def _from_forms(cls, forms: frozenset[str]) -> Scrubber:
        values = {v for v in forms if len(v) >= MIN_SECRET_LENGTH}
        # Longest first, so a secret containing a shorter one is replaced whole.
        ordered = tuple(sorted(values, key=lambda v: (-len(v), v)))
        alternatives = "|".join(re.escape(v) for v in ordered)
        pattern = re.compile(alternatives) if ordered else None
        trigger = re.compile(f"{alternatives}|{_VALUE_TRIGGERS}" if ordered else _VALUE_TRIGGERS)
        return cls(ordered, pattern, trigger)

    def with_secrets(self, more: Iterable[str]) -> Scrubber:
        return _create(frozenset(self.secrets).union(*map(encoded_forms, _long(more))))

    def scrub_text(self, text: str) -> str:
        """Free text (stdout, messages): known secrets, embedded PEM keys, JWTs, vendor tokens."""
        if len(text) < MIN_SECRET_LENGTH:
            return text
        if self._trigger_re.search(text) is None and not (
            text[0] in _HEADER_FIRST_CHARS and _HEADER_RE.fullmatch(text.strip())
        ):
            return text
        if self._secret_re is not None:
            text = self._secret_re.sub(REDACTED, text)
        if len(text) < _MIN_VALUE_RULE_LENGTH:
            return text
        if _is_secret_shaped(text):
            return REDACTED
        if "PRIVATE KEY-----" in text:
            text = _PEM_BLOCK_RE.sub(REDACTED, text)
        if "eyJ" in text:
            text = _JWT_RE.sub(REDACTED, text)
        return _VENDOR_RE.sub(REDACTED, text)

    def scrub_key(self, key: str) -> str:
        return self._secret_re.sub(REDACTED, key) if self._secret_re is not None else key

    def scrub_payload(self, value: Any) -> Any:
        """An event payload: known secrets and the value rules in every string and key, but no
        key rule — an event's own fields keep their meaning."""
        return self.scrub(value, key_rule=False)

    def scrub(self, value: Any, *, key_rule: bool = True) -> Any:
        """The scrubbed JSON tree (dicts, lists/tuples, strings, scalars).

        Sub-trees with nothing to scrub are shared with ``value``, not copied: a large clean
        result costs no second copy. Treat both as immutable afterwards.
        """
        # Results repeat the same keys on every row: decide each key once per call.
        keys: dict[str, tuple[str, bool]] = {}
        text = self.scrub_text

        def walk(node: Any) -> Any:
            kind = type(node)
            if kind is str:
                return text(node)
            if kind in _SCALARS:
                return node
            if kind is list or kind is tuple:
                return walk_list(node)
            if isinstance(node, Mapping):
                return walk_mapping(node)
            if isinstance(node, str):
                return text(node)
            if isinstance(node, list | tuple):
                return walk_list(node)
            return node

        def walk_list(node: list[Any] | tuple[Any, ...]) -> Any:
            out: list[Any] | None = None
            for index, item in enumerate(node):
                new = walk(item)
                if out is None and new is not item:
                    out = list(node[:index])
                if out is not None:
                    out.append(new)
            return node if out is None else out

        def walk_mapping(node: Mapping[Any, Any]) -> dict[Any, Any]:
            out: dict[Any, Any] | None = None if type(node) is dict else {}
            for index, (key, item) in enumerate(node.items()):
                if type(key) is str:
                    seen = keys.get(key)
                    if seen is None:
                        seen = keys[key] = (self.scrub_key(key), key_rule and is_sensitive_key(key))
                    new_key, new = seen[0], REDACTED if seen[1] else walk(item)
                else:
                    new_key, new = key, walk(item)
                if out is None and (new is not item or new_key is not key):
                    out = dict(itertools.islice(node.items(), index))
                if out is not None:
                    out[new_key] = new
            return node if out is None else out  # type: ignore[return-value]

        return walk(value)


def _long(values: Iterable[str]) -> list[str]:
    return [v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH]


@functools.lru_cache(maxsize=256)  # commands of one playbook resolve the same secrets again
def _create(forms: frozenset[str]) -> Scrubber:
    return Scrubber._from_forms(forms)


# --- which scrubber applies where -----------------------------------------------------------

_process: Scrubber = Scrubber.create()
# The running command's scrubber (its secrets included); set by the pipeline in the command's
# task, so log lines written while that command runs are scrubbed of its secrets too.
_command: contextvars.ContextVar[Scrubber | None] = contextvars.ContextVar("scrubber", default=None)


def set_process_scrubber(scrubber: Scrubber) -> None:
    """The worker's own secrets and the keychain values: applies to every log line."""
    global _process
    _process = scrubber


def set_command_scrubber(scrubber: Scrubber) -> None:
    _command.set(scrubber)


def active() -> Scrubber:
    """The scrubber for text produced here and now: the command's, else the process one."""
    return _command.get() or _process


# ---- large results: scrub the serialised bytes, not the tree ---------------------------------

_CONTAINERS: Final = (dict, list, tuple)
_PLAIN_TYPES: Final = frozenset({dict, list, tuple, str, int, float, bool, type(None)})
# A whole string that is an Authorization header value starts, after blanks (raw or escaped),
# with bearer/basic and a blank. Found by looking for the words (fast) and then at what is
# around each occurrence (rare in data; past _MAX_HEADER_WORDS, assume the worst).
_BLANKS_BEFORE: Final = re.compile(rb'"(?:\s|\\[nrt])*\Z')
_BLANK_AFTER: Final = re.compile(rb"[ \t]|\\t")
_MAX_HEADER_WORDS: Final = 1000
_JSON_ESCAPED: Final = re.compile(r'["\\\x00-\x1f]')


def scrub_serialised(scrubber: Scrubber, value: Any, dumps: Callable[[Any], bytes]) -> tuple[Any, bytes]:
    """``(scrubbed tree, its compact JSON)`` in one pass over the bytes when that is enough.

    Serialising is cheap (C); walking millions of strings in Python is not. So: serialise
    first, then look in the bytes for what any rule could act on — a known secret (as JSON
    writes it), a value-rule trigger, an Authorization-header-shaped string — and in the tree's
    distinct keys for a sensitive one. Nothing found: the tree is clean and is returned as is,
    with its bytes. Anything found (or a tree that is not plain JSON data): the full tree scrub,
    then serialise the scrubbed copy. Both ways give the same result as ``scrub`` + ``dumps``.
    """
    body = dumps(value)
    if not _needs_tree_scrub(scrubber, value, body):
        return value, body
    scrubbed = scrubber.scrub(value)
    return scrubbed, dumps(scrubbed)


def _needs_tree_scrub(scrubber: Scrubber, value: Any, body: bytes) -> bool:
    if any(_JSON_ESCAPED.search(s) for s in scrubber.secrets):
        return True  # a secret JSON would escape: not worth matching in bytes
    trigger = _bytes_pattern(scrubber._trigger_re.pattern)
    if trigger.search(body) is not None:
        return True
    if _header_shaped(body):
        return True
    keys = _distinct_keys(value)
    return keys is None or any(is_sensitive_key(k) for k in keys)


def _header_shaped(body: bytes) -> bool:
    """Lower-cases 1 MiB at a time (overlapping), never a second copy of the whole body."""
    step, overlap = 1 << 20, 128
    for start in range(0, max(len(body), 1), step):
        if _header_shaped_in(body[max(0, start - overlap) : start + step].lower()):
            return True
    return False


def _header_shaped_in(lowered: bytes) -> bool:
    seen = 0
    for word in (b"bearer", b"basic"):
        at = lowered.find(word)
        while at >= 0:
            seen += 1
            if seen > _MAX_HEADER_WORDS:
                return True
            end = at + len(word)
            before = lowered[max(0, at - 64) : at]
            if (end >= len(lowered) or _BLANK_AFTER.match(lowered, end)) and (
                _BLANKS_BEFORE.search(before) or (at >= 64 and not before.strip(b" \t\r\n\\nrt"))
            ):
                return True
            at = lowered.find(word, end)
    return False


@functools.lru_cache(maxsize=64)
def _bytes_pattern(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode("utf-8"))


def _distinct_keys(root: Any) -> set[str] | None:
    """Every dict key in the tree, iterating in C where the tree is uniform (rows of dicts);
    ``None`` for anything but plain JSON data (then the tree scrub decides)."""
    keys: set[str] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is dict:
            keys.update(node)
            children: Any = node.values()
        elif kind is list or kind is tuple:
            children = node
        else:
            continue
        kinds = set(map(type, children))
        if not kinds <= _PLAIN_TYPES:
            return None
        if kinds == {dict} and kind is not dict:
            # Rows: their keys and their values' types, without a Python-level loop per row.
            keys.update(set().union(*children))
            inner = set(map(type, itertools.chain.from_iterable(map(dict.values, children))))
            if not inner <= _PLAIN_TYPES:
                return None
            if inner & {dict, list, tuple}:
                values = itertools.chain.from_iterable(map(dict.values, children))
                stack.extend(v for v in values if type(v) in _CONTAINERS)
        elif kinds & {dict, list, tuple}:
            stack.extend(c for c in children if type(c) in _CONTAINERS)
    if not set(map(type, keys)) <= {str}:
        return None
    return keys
