"""A lexical guard for semantic hits: similar wording is not the same question.

Sentence embeddings score a text and its reversal as near-identical ("Book a flight to Paris" vs
"... from Paris": cosine 0.989 with all-MiniLM-L6-v2; "Alice sent money to Bob" vs "Bob sent money
to Alice": 0.981), higher than true paraphrases ("Where is my package?" vs "Where's my package?":
0.978). No cosine threshold separates those classes (GPTCache issue #694), so a semantic hit must
also pass these checks on the two texts, after lower-casing and expanding contractions:

1. the same numbers, in the same order ("100" vs "1000", "3 pm" vs "4 pm");
2. the same multiset of *protected* words: negations, prepositions and directions, quantifiers,
   question words, pronouns, time words, number words and common antonym pairs (``PROTECTED``);
3. no word of one text is a negating-prefix form of a word of the other ("lock"/"unlock");
4. the content words the two texts share appear in the same order ("Alice ... Bob" vs "Bob ... Alice").

It is deliberately conservative: a paraphrase that changes a protected word misses and the model
runs; a wrong answer is the failure that matters.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_WORDS = """
not no never none nothing nobody nowhere nor neither without cannot except unless against
to from into onto out in on off up down over under above below before after between toward towards
away inside outside within across through past via by with for of at near far
left right north south east west forward backward backwards front back top bottom
all any some every each both either few many much more most less least fewer only
what when where who whom whose why how which whether if or and but
i me my mine you your yours he him his she her hers we us our ours they them their theirs it its
today tomorrow yesterday tonight now then soon later earlier early late ago next previous last first
monday tuesday wednesday thursday friday saturday sunday weekend weekday
january february march april may june july august september october november december
morning afternoon evening night noon midnight am pm hour hours minute minutes second seconds
day days week weeks month months year years daily weekly monthly yearly annual
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
hundred thousand million billion trillion half quarter double twice once third
true false yes maybe
open close closed opened closing opening add remove delete create enable disable start stop
begin end buy sell accept reject allow deny block unblock increase decrease raise lower
upgrade downgrade import export send receive sent received win lose won lost
login logout log sign subscribe unsubscribe lock unlock include exclude push pull
upload download encrypt decrypt connect disconnect activate deactivate install uninstall
ascending descending asc desc min max minimum maximum plus minus positive negative
high low higher lower highest lowest big small bigger smaller biggest smallest large larger largest
hot cold warm cool old new older newer oldest newest young younger fast slow faster slower
cheap expensive cheaper cheapest light dark black white good bad better worse best worst
male female men women man woman boy girl
arrive depart arrival departure arrivals departures give take borrow lend lent buying selling
""".split()

PROTECTED: frozenset[str] = frozenset(_WORDS)

# Words ignored by the word-order check: function words whose position paraphrases move freely.
_STOP = frozenset("""
a an the is are am was were be been being do does did done can could would should will shall
might must have has had having please just really very so that this these those there here
get got want like need would kindly also too
""".split())

_NEGATING_PREFIXES = ("un", "dis", "de", "non", "in", "im", "il", "ir", "anti")

_CONTRACTIONS = [
    (re.compile(r"\bcan't\b"), "can not"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bshan't\b"), "shall not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'re\b"), " are"),
    (re.compile(r"'s\b"), " is"),
    (re.compile(r"'m\b"), " am"),
    (re.compile(r"'ll\b"), " will"),
    (re.compile(r"'d\b"), " would"),
    (re.compile(r"'ve\b"), " have"),
]
_TOKEN = re.compile(r"\d+(?:[.,:/-]\d+)*|[^\W\d_]+")


def tokens(text: str) -> list[str]:
    t = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    for pattern, repl in _CONTRACTIONS:
        t = pattern.sub(repl, t)
    return _TOKEN.findall(t)


@dataclass(frozen=True)
class Signature:
    """What the guard compares, precomputed once per cached text."""

    numbers: tuple[str, ...]
    protected: tuple[tuple[str, int], ...]
    content: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> Signature:
        toks = tokens(text)
        numbers = tuple(t for t in toks if t[0].isdigit())
        protected = tuple(sorted(Counter(t for t in toks if t in PROTECTED).items()))
        content = tuple(t for t in toks if not t[0].isdigit() and t not in PROTECTED and t not in _STOP)
        return cls(numbers, protected, content)


def _first_order(words: tuple[str, ...], keep: set[str]) -> list[str]:
    seen: list[str] = []
    for w in words:
        if w in keep and w not in seen:
            seen.append(w)
    return seen


def _negated(a: str, b: str) -> bool:
    return any(a == p + b or b == p + a for p in _NEGATING_PREFIXES)


def mismatch(a: Signature, b: Signature) -> str | None:
    """Why ``a`` and ``b`` must not share an answer, or ``None`` when the guard lets them."""
    if a.numbers != b.numbers:
        return "numbers differ"
    if a.protected != b.protected:
        return "protected words differ"
    only_a = set(a.content) - set(b.content)
    only_b = set(b.content) - set(a.content)
    if any(_negated(x, y) for x in only_a for y in only_b):
        return "a word is negated"
    shared = set(a.content) & set(b.content)
    if _first_order(a.content, shared) != _first_order(b.content, shared):
        return "word order differs"
    return None
