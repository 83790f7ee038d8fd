"""How much randomness a configured secret can hold, judged from the value alone.

A secret is usually made by a generator: ``openssl rand -hex 32``, ``openssl rand -base64 32``,
``python -c 'import secrets; print(secrets.token_urlsafe(32))'``, or a passphrase of random
words. Its strength is what its encoding can carry, not how many distinct characters it
happens to show (a 64-character hex string lacks one of the 16 digits about a quarter of the
time, yet holds 256 bits):

* **hex** (one case of ``0-9a-f``): 4 bits per character (the decoded bytes);
* **base64 / base64url** (``A-Za-z0-9+/-_``, ``=`` padding): 6 bits per character;
* anything else (a passphrase, punctuation, non-ASCII): length times log2 of the alphabet its
  character classes span (lower case 26, upper case 26, digits 10, ASCII symbols and space 33,
  anything beyond ASCII 128).

Two guards keep an obviously non-random value from passing on length alone: a value that is a
repeated block counts as that block (``"0123456789abcdef" * 2`` is 16 hex characters), and the
value's own character statistics (Shannon entropy times length) must reach half the requirement
(``"a" * 63 + "b"`` fails it).
"""

from __future__ import annotations

import math
import string
from collections import Counter

HEX_LOWER = frozenset(string.digits + "abcdef")
HEX_UPPER = frozenset(string.digits + "ABCDEF")
BASE64 = frozenset(string.ascii_letters + string.digits + "+/-_")
CLASSES = (
    (frozenset(string.ascii_lowercase), 26),
    (frozenset(string.ascii_uppercase), 26),
    (frozenset(string.digits), 10),
    (frozenset(string.punctuation + " "), 33),
)
NON_ASCII_ALPHABET = 128


def _period(value: str) -> str:
    """The shortest block ``value`` repeats (``value`` itself when it repeats nothing)."""
    n = len(value)
    for p in range(1, n // 2 + 1):
        if all(value[i] == value[i - p] for i in range(p, n)):
            return value[:p]
    return value


def capacity_bits(value: str) -> float:
    """What ``value``'s encoding can hold (see the module docstring), repeated blocks once."""
    block = _period(value)
    chars = set(block)
    if not block:
        return 0.0
    if chars <= HEX_LOWER or chars <= HEX_UPPER:
        return 4.0 * len(block)
    stripped = block.rstrip("=")
    if stripped and set(stripped) <= BASE64:
        return 6.0 * len(stripped)
    alphabet = sum(size for members, size in CLASSES if chars & members)
    if any(ord(c) > 127 for c in chars):
        alphabet += NON_ASCII_ALPHABET
    return len(block) * math.log2(max(alphabet, 2))


def observed_bits(value: str) -> float:
    """Shannon entropy of ``value``'s characters times its length: how varied it actually is."""
    if not value:
        return 0.0
    counts = Counter(value)
    n = len(value)
    return -n * sum(c / n * math.log2(c / n) for c in counts.values())


def is_strong(value: str, required_bits: int) -> bool:
    return capacity_bits(value) >= required_bits and observed_bits(value) >= required_bits / 2
