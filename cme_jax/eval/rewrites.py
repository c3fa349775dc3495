"""Degenerate rewrites of a response, for auditing whether a reward prefers broken text to the original.

Likelihood rewards such as CME can score bland, repetitive or truncated text above the answer it came
from. The verifier audit applies each rewrite below to real responses and checks that the reward drops.

Every rewrite is pure Python and deterministic for a given ``random.Random`` (a fixed seed when none is
passed). None ever returns the original text: "the same" is judged after stripping surrounding
whitespace, so re-padding a text never counts as rewriting it. Where the natural rewrite would equal the
original (one sentence, one word, empty text) each function degrades further, as its docstring says.
Texts without sentence punctuation are cut into clauses or fixed-size word chunks by
:func:`split_sentences`, so sentence-level rewrites still change them in a meaningful way.
"""

import math
import random
import re
from collections.abc import Callable, Iterator, Sequence

# Stand-in for the missing content of an empty text; the ellipsis reads as "nothing was said".
EMPTY_STANDIN = "…"
# Appended when a text is too short to cut: the dash reads as speech broken off mid-word.
TRUNCATION_MARK = "—"
REPEATS = 10

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I can't assist with that.",
    "I apologize, but I'm unable to help with this request.",
    "Sorry, I can't provide an answer to that.",
    "As an AI language model, I cannot help with that request.",
    "I'm not able to help with that.",
)
FILLERS_EN: tuple[str, ...] = (
    "I hope this helps.",
    "Let me know if you have any other questions.",
    "Feel free to reach out if you need anything else.",
    "I'm always happy to help.",
    "Thank you for your question.",
    "Please don't hesitate to ask if anything is unclear.",
    "Have a great day!",
)
# Chinese responses get Chinese filler: English filler after Chinese text would be penalised by the
# verifier for the language switch alone, which is not what the audit measures.
FILLERS_ZH: tuple[str, ...] = (
    "希望这对你有帮助。",
    "如果还有其他问题，请随时告诉我。",
    "很高兴能帮到你。",
    "感谢你的提问。",
    "祝你一切顺利！",
)

_SENTENCE_END = ".!?…"
_CJK_END = "。！？｡"
_CLOSERS = "\"'”’)]}»」』】》"
_OPENERS = "\"'“‘«([{「『【《"
# Stripped from the end of a truncation so the cut never looks like a finished sentence or clause.
_TAIL_PUNCT = _SENTENCE_END + _CJK_END + _CLOSERS + ",;:，；：、-–—"

_BOUNDARY = re.compile(
    rf"(?P<cjk>[{re.escape(_CJK_END)}]+[{re.escape(_CLOSERS)}]*)"
    rf"|(?P<west>[{re.escape(_SENTENCE_END)}]+)[{re.escape(_CLOSERS)}]*(?=\s|$)"
)
# ASCII clause marks need a following space so "3,000" and "10:30" stay whole; CJK ones never have one.
_CLAUSE_BREAK = re.compile(r"(?<=[,;:])\s+|(?<=[，；：、])\s*")
# Dotted abbreviations and initialisms in any alphabet: e.g, i.e, U.S, z.B, т.е
_DOTTED = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
# A line that starts "1. ", "a. " or "iv. " is a list item, not a one-word sentence.
_ENUMERATOR = re.compile(r"\d{1,3}|[a-z]|[ivx]{1,4}")
_ABBREVIATIONS = frozenset(
    {
        *("mr", "mrs", "ms", "dr", "prof", "st", "mt", "vs", "approx", "ca", "cf", "resp", "dept"),
        *("gen", "col", "lt", "sgt", "capt", "gov", "sen", "rev", "bzw", "usw", "vgl", "ggf", "str"),
        *("ул", "им"),
    }
)
# These abbreviate a word that is followed by a number ("No. 5", "p. 12"); before other words they
# are ordinary words that may end a sentence ("Say no. Then leave.").
_NUMBER_ABBREVIATIONS = frozenset({"no", "nr", "fig", "vol", "p", "pp", "ch", "art", "sec", "eq", "ref", "s"})
# Unpunctuated text is cut into chunks of this many words (or CJK characters, for text without spaces).
_WORD_CHUNK = 8
_CHAR_CHUNK = 16

Rewrite = Callable[..., str]


def _rng(rng: random.Random | None) -> random.Random:
    """The given generator, or a fresh fixed-seed one so calls without rng are reproducible."""
    return rng if rng is not None else random.Random(0)


def _is_cjk(ch: str) -> bool:
    """Whether a character is CJK punctuation, kana, a Han ideograph or a full-width form."""
    o = ord(ch)
    return (
        0x3000 <= o <= 0x30FF
        or 0x3400 <= o <= 0x4DBF
        or 0x4E00 <= o <= 0x9FFF
        or 0xF900 <= o <= 0xFAFF
        or 0xFF00 <= o <= 0xFFEF
    )


def _mostly_cjk(text: str) -> bool:
    """Whether CJK characters outnumber letters of other scripts."""
    cjk = sum(_is_cjk(c) for c in text if not c.isspace())
    other = sum(c.isalpha() and not _is_cjk(c) for c in text)
    return cjk > other


def _smart_join(parts: Sequence[str]) -> str:
    """Join with spaces, except between two CJK characters, where Chinese and Japanese use none."""
    out = ""
    for part in parts:
        if out and part:
            out += "" if _is_cjk(out[-1]) and _is_cjk(part[0]) else " "
        out += part
    return out


def _same(a: str, b: str) -> bool:
    """Equality up to surrounding whitespace: the sense in which a rewrite must differ."""
    return a.strip() == b.strip()


def _ends_sentence(s: str) -> bool:
    """Whether s ends in sentence punctuation, ignoring closing quotes and brackets."""
    s = s.rstrip().rstrip(_CLOSERS)
    return bool(s) and s[-1] in _SENTENCE_END + _CJK_END


def _strip_tail(s: str) -> str:
    """Drop trailing whitespace and punctuation so a cut reads as unfinished."""
    while s and (s[-1].isspace() or s[-1] in _TAIL_PUNCT):
        s = s[:-1]
    return s


def _is_west_boundary(line: str, start: int, m: re.Match[str]) -> bool:
    """Whether a Western terminator ends a sentence rather than an abbreviation, initial or list number."""
    nxt = line[m.end() :].lstrip()
    if not nxt:
        return True
    # A lowercase continuation means the period was not a full stop ("e.g. apples", "wait... what").
    if nxt[0].islower():
        return False
    if m.group("west") != ".":
        return True
    words = line[start : m.start("west")].split()
    if not words:
        return True
    token = words[-1].lstrip(_OPENERS)
    low = token.lower()
    if low in _ABBREVIATIONS or _DOTTED.fullmatch(token):
        return False
    if len(token) == 1 and token.isupper():  # an initial, as in "J. Smith"
        return False
    if low in _NUMBER_ABBREVIATIONS and nxt[0].isdigit():
        return False
    return not (len(words) == 1 and _ENUMERATOR.fullmatch(words[0]))


def _split_line(line: str) -> list[str]:
    """Sentences of one line of text."""
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(line):
        if m.group("west") is not None and not _is_west_boundary(line, start, m):
            continue
        piece = line[start : m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    rest = line[start:].strip()
    if rest:
        out.append(rest)
    return out


def _split_clauses(s: str) -> list[str]:
    """Clauses of s, split after commas, semicolons and colons (ASCII and CJK), punctuation kept."""
    return [c.strip() for c in _CLAUSE_BREAK.split(s) if c.strip()]


def _chunk_unpunctuated(s: str) -> list[str]:
    """Pseudo-sentences of a text with no sentence punctuation: clauses, else fixed-size chunks."""
    clauses = _split_clauses(s)
    if len(clauses) >= 2:
        return clauses
    words = s.split()
    if len(words) > _WORD_CHUNK:
        return [" ".join(words[i : i + _WORD_CHUNK]) for i in range(0, len(words), _WORD_CHUNK)]
    if len(words) == 1 and len(s) > _CHAR_CHUNK and any(_is_cjk(c) for c in s):
        return [s[i : i + _CHAR_CHUNK] for i in range(0, len(s), _CHAR_CHUNK)]
    return [s]


def split_sentences(text: str) -> list[str]:
    """Split text into stripped sentences; empty or whitespace-only text gives an empty list.

    Each line is split separately, so list items and paragraphs are units of their own (bullet markers
    are kept). A sentence ends at a run of ``.``, ``!``, ``?`` or ``…`` (plus closing quotes or brackets)
    before whitespace, or at ``。！？`` with or without a following space. A period does not end a
    sentence after an abbreviation ("Dr.", "e.g.", "z.B."), an initial ("J. Smith"), a list number
    ("1. Step") or "No."/"p." before a number, nor when the next word is lowercase; decimals like 3.14
    never split because no space follows the point. A single-line text with no final sentence
    punctuation falls back to clauses (after ``,;:，；：、``), else chunks of 8 words, else (CJK text
    without spaces) chunks of 16 characters.
    """
    units: list[str] = []
    for line in text.splitlines():
        units.extend(_split_line(line))
    if len(units) == 1 and not _ends_sentence(units[0]):
        return _chunk_unpunctuated(units[0])
    return units


def _sentence_joiner(text: str) -> Callable[[Sequence[str]], str]:
    """How to join sentences of text: one per line if it had line structure, else run-on."""
    return "\n".join if "\n" in text.strip() else _smart_join


def _fragment(s: str) -> str:
    """A proper leading part of a one-sentence text: first clause, first half of words or characters."""
    clauses = _split_clauses(s)
    if len(clauses) >= 2:
        return clauses[0]
    words = s.split()
    if len(words) >= 2:
        return " ".join(words[: math.ceil(len(words) / 2)])
    if len(s) >= 2:
        return s[: math.ceil(len(s) / 2)]
    # A single character has no proper part; mark the text as trailing off instead.
    return f"{s} {EMPTY_STANDIN}"


def repeat_sentence(text: str, *, rng: random.Random | None = None) -> str:
    """The first sentence repeated 10 times, space-joined (no space between CJK sentences).

    Empty text repeats the stand-in ``…``; a text that already is the tenfold repeat gets 11 copies.
    """
    del rng  # deterministic without randomness; accepted for a uniform signature
    s = text.strip()
    first = split_sentences(s)[0] if s else EMPTY_STANDIN
    out = _smart_join([first] * REPEATS)
    return out if not _same(out, s) else _smart_join([first] * (REPEATS + 1))


def truncate(text: str, *, rng: random.Random | None = None) -> str:
    """The text cut at a word boundary near 40-60% of its characters, with trailing punctuation removed.

    The cut point is drawn uniformly from 40-60% and moved to the nearest word boundary (whitespace, or
    next to a CJK character) within 25-75%; with no boundary there it cuts mid-word, as near the point as
    leaves some content. When no proper prefix has content, a text whose content is its last character
    (".😀") keeps just that character; one character alone gets ``—`` appended; pure punctuation or empty
    text becomes ``—`` (``…`` when the text is exactly ``—``).
    """
    rng = _rng(rng)
    s = text.strip()
    n = len(s)
    target = round(rng.uniform(0.4, 0.6) * n)
    if n >= 2:
        bounds = [
            i
            for i in range(math.ceil(0.25 * n), math.floor(0.75 * n) + 1)
            if 0 < i < n and (s[i].isspace() or _is_cjk(s[i - 1]) or _is_cjk(s[i]))
        ]
        by_distance = lambda i: (abs(i - target), i)
        for i in sorted(bounds, key=by_distance) + sorted(range(1, n), key=by_distance):
            cut = _strip_tail(s[:i])
            if cut:
                return cut
        if _strip_tail(s):  # only the last character carries content
            return s[-1]
    out = _strip_tail(s) + TRUNCATION_MARK
    return out if out != s else EMPTY_STANDIN


def first_sentence(text: str, *, rng: random.Random | None = None) -> str:
    """Only the first sentence.

    A one-sentence text keeps its first clause, else the first half of its words, else the first half
    of its characters; a single character gets `` …`` appended. Empty text gives the stand-in ``…``.
    """
    del rng  # deterministic without randomness; accepted for a uniform signature
    s = text.strip()
    if not s:
        return EMPTY_STANDIN
    units = split_sentences(s)
    if len(units) >= 2 and not _same(units[0], s):
        return units[0]
    return _fragment(s)


def refusal(text: str, *, rng: random.Random | None = None) -> str:
    """A generic refusal drawn from :data:`REFUSALS`, never the text itself."""
    rng = _rng(rng)
    return rng.choice([r for r in REFUSALS if not _same(r, text)])


def _shuffle_levels(s: str) -> Iterator[tuple[list[str], Callable[[Sequence[str]], str]]]:
    """Units to permute, coarsest first: sentences, clauses, words, characters."""
    yield split_sentences(s), _sentence_joiner(s)
    yield _split_clauses(s), _smart_join
    yield s.split(), " ".join
    yield list(s), "".join


def shuffle(text: str, *, rng: random.Random | None = None) -> str:
    """The sentences in a different order.

    If every order of the sentences gives the same text (one sentence, or identical ones) it permutes
    clauses, else words, else characters. A text whose characters are all equal ("a", "!!!") cannot be
    reordered and gets `` …`` appended; empty text gives the stand-in ``…``.
    """
    rng = _rng(rng)
    s = text.strip()
    if not s:
        return EMPTY_STANDIN
    for units, join in _shuffle_levels(s):
        if len(set(units)) < 2:
            continue
        order = list(units)
        rng.shuffle(order)
        if order == units:
            # Rotation by one changes any sequence that has two distinct elements.
            order = units[1:] + units[:1]
        out = join(order)
        if not _same(out, s):
            return out
    return f"{s} {EMPTY_STANDIN}"


def other_prompt(text: str, *, rng: random.Random | None = None, pool: Sequence[str] | None = None) -> str:
    """A response to another prompt: a non-empty entry of pool that differs from the text.

    Raises ValueError when pool has no such entry, since inventing an answer would skew the audit.
    """
    rng = _rng(rng)
    options = [p for p in pool or () if p.strip() and not _same(p, text)]
    if not options:
        raise ValueError("other_prompt needs a pool with a non-empty response that differs from the text")
    return rng.choice(options)


def filler(text: str, *, rng: random.Random | None = None) -> str:
    """The text followed by generic closing sentences until it is about twice as long.

    At least one filler sentence is added, so empty text becomes filler alone. The fillers are cycled
    from a random start; Chinese text gets Chinese fillers.
    """
    rng = _rng(rng)
    fillers = FILLERS_ZH if _mostly_cjk(text) else FILLERS_EN
    i = rng.randrange(len(fillers))
    added: list[str] = []
    while not added or len(_smart_join(added)) < len(text.strip()):
        added.append(fillers[i % len(fillers)])
        i += 1
    tail = _smart_join(added)
    if not text.strip():
        return tail
    if text[-1].isspace():
        sep = ""
    elif "\n" in text.strip():
        sep = "\n"
    else:
        sep = "" if _is_cjk(text[-1]) and _is_cjk(tail[0]) else " "
    return text + sep + tail


REWRITES: dict[str, Rewrite] = {
    "repeat_sentence": repeat_sentence,
    "truncate": truncate,
    "first_sentence": first_sentence,
    "refusal": refusal,
    "shuffle": shuffle,
    "other_prompt": other_prompt,
    "filler": filler,
}
# Kinds that draw on the pool of other responses; the rest ignore it so one audit loop can pass it to all.
_POOL_KINDS = frozenset({"other_prompt"})


def apply_rewrite(
    kind: str,
    text: str,
    *,
    rng: random.Random | None = None,
    pool: Sequence[str] | None = None,
) -> str:
    """Apply the rewrite named kind; pool is passed to the kinds that use it and ignored by the rest."""
    fn = REWRITES.get(kind)
    if fn is None:
        raise ValueError(f"unknown rewrite kind {kind!r}; valid kinds: {', '.join(sorted(REWRITES))}")
    if kind in _POOL_KINDS:
        return fn(text, rng=rng, pool=pool)
    return fn(text, rng=rng)
