"""Tests for the degenerate rewrites, the sentence splitter, and the shipped prompt/preference data."""

import json
import random
from collections import Counter
from importlib import resources

import pytest

from cme_jax.eval.rewrites import (
    EMPTY_STANDIN,
    FILLERS_EN,
    FILLERS_ZH,
    REFUSALS,
    REWRITES,
    apply_rewrite,
    first_sentence,
    other_prompt,
    refusal,
    repeat_sentence,
    shuffle,
    split_sentences,
    truncate,
)

# Texts whose sentences all end in sentence punctuation, so re-splitting a shuffle recovers them.
PUNCTUATED = {
    "en": "The sun is a star. It is about 4.6 billion years old! Why does it shine? Because of fusion.",
    "de": "Die Bäume sind grün. Im Herbst färben sich die Blätter gelb und rot! Möchtest du mitkommen?",
    "zh": "今天天气很好。我们去公园散步吧！你觉得怎么样？",
    "ru": "Москва — столица России. Это очень большой город! Вы там были?",
    "emoji": "I love pizza 🍕! It's the best food ever 😀. Do you agree 🤔?",
    "bullets": "- Buy milk\n- Walk the dog\n- Call mom",
    "two": "First we eat. Then we sleep.",
}
UNPUNCTUATED = {
    "en_np": "the sun is a star that formed four and a half billion years ago and it shines by fusion",
    "de_np": "Über den Wolken muss die Freiheit wohl grenzenlos sein sagt man in Österreich und überall",
    "zh_np": "今天天气很好我们去公园散步吧你觉得怎么样呢朋友们一起走",
    "ru_np": "москва столица россии и очень большой город где живут миллионы людей",
    "emoji_np": "pizza night with friends 🍕🎉 best way to end the week honestly 😀",
    "clauses_np": "first the flour, then the eggs, finally the milk",
    "short_np": "thanks a lot",
}
SINGLE = {
    "one_sentence": "The cat sat on the mat.",
    "one_sentence_clauses": "The cat, who was tired, slept on the warm mat.",
    "zh_one": "我今天很高兴。",
    "word": "Hello",
    "word_dot": "Hello.",
    "word_ru": "Привет",
    "word_zh": "你好",
    "word_emoji": "😀",
}
EDGE = {
    "empty": "",
    "spaces": "   ",
    "newline": "\n",
    "dots": "...",
    "bang": "!",
    "char": "a",
    "same_chars": "aaaa",
    "repeated_sentences": "Hi. Hi. Hi.",
    "padded": "  Hello there.  ",
}
TEXTS = {**PUNCTUATED, **UNPUNCTUATED, **SINGLE, **EDGE}
POOL = ["Paris is the capital of France.", "Use a paperclip to press the reset button.", ""]
STRUCTURAL = ["repeat_sentence", "truncate", "first_sentence", "shuffle", "filler"]


def _rewrite(kind, text, seed=0):
    return apply_rewrite(kind, text, rng=random.Random(seed), pool=[*POOL, text])


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("kind", sorted(REWRITES))
def test_every_rewrite_is_nonempty_and_differs(kind, name):
    text = TEXTS[name]
    for seed in range(3):
        out = _rewrite(kind, text, seed)
        assert out.strip(), (kind, name)
        assert out.strip() != text.strip(), (kind, name, out)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_repeat_sentence_has_ten_copies_of_first(name):
    text = TEXTS[name]
    first = split_sentences(text)[0] if text.strip() else EMPTY_STANDIN
    out = repeat_sentence(text)
    assert out in {" ".join([first] * 10), "".join([first] * 10)}
    assert out.count(first) >= 10


def test_repeat_sentence_of_tenfold_repeat_adds_a_copy():
    text = " ".join(["Hi."] * 10)
    assert repeat_sentence(text) == " ".join(["Hi."] * 11)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_truncate_is_shorter_and_unfinished(name):
    text = TEXTS[name]
    for seed in range(5):
        out = truncate(text, rng=random.Random(seed))
        assert not out.endswith((".", "!", "?", "。", "！", "？"))
        if len(text.strip()) >= 2:
            assert len(out) < len(text.strip())


@pytest.mark.parametrize("name", sorted({**PUNCTUATED, **UNPUNCTUATED}))
def test_truncate_cuts_a_prefix_near_the_middle_at_a_word_boundary(name):
    text = TEXTS[name]
    for seed in range(5):
        out = truncate(text, rng=random.Random(seed))
        assert text.startswith(out)
        assert 0.2 <= len(out) / len(text) <= 0.75
        nxt = text[len(out)]
        # The cut ends a word: next comes a space, punctuation, or (in Chinese) another character.
        assert nxt.isspace() or not nxt.isalnum() or "\u4e00" <= nxt <= "\u9fff"


def test_truncate_edge_cases():
    assert truncate("Hello").startswith("He")
    assert truncate("a") == "a—"
    assert truncate("") == "—"
    assert truncate("...") == "—"
    assert truncate("—") == EMPTY_STANDIN
    assert truncate(", 😀") == "😀"
    assert truncate("， Hi") == "， H"


def test_rewrites_on_random_fragments_never_return_the_original():
    # Seeded fuzz over pieces that stress the splitter: punctuation runs, abbreviations, CJK, emoji.
    pieces = ["The", "cat", "Dr.", "e.g.", "3.14", "!", "?", ".", "...", "…", "。", "你好", "，", ",", ";"]
    pieces += ["\n", "- ", "1.", "😀", "Ünï", "Привет", " ", '"', ")", "a", "—", "z.B.", "No.", "5"]
    r = random.Random(0)
    for n in range(2000):
        text = "".join(r.choice(pieces) + " " * (r.random() < 0.6) for _ in range(r.randrange(15)))
        for kind in REWRITES:
            out = _rewrite(kind, text, seed=n)
            assert out.strip() and out.strip() != text.strip(), (kind, text, out)
        cut = truncate(text, rng=random.Random(n))
        assert not cut.endswith((".", "!", "?", "。", "！", "？")), (text, cut)
        assert len(text.strip()) < 2 or len(cut) < len(text.strip()), (text, cut)
        assert all(s and s == s.strip() for s in split_sentences(text)), text


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_first_sentence(name):
    text = TEXTS[name]
    out = first_sentence(text)
    units = split_sentences(text)
    if len(units) >= 2 and units[0] != text.strip():
        assert out == units[0]
    elif text.strip():
        # One sentence: a proper leading part of it, or the single character marked as trailing off.
        assert text.strip().startswith(out) or out == f"{text.strip()} {EMPTY_STANDIN}"
    else:
        assert out == EMPTY_STANDIN


def test_first_sentence_of_single_sentence_degrades():
    assert first_sentence("The cat sat on the mat.") == "The cat sat"
    assert first_sentence("The cat, who was tired, slept.") == "The cat,"
    assert first_sentence("Hello") == "Hel"
    assert first_sentence("我今天很高兴。") == "我今天很"
    assert first_sentence("a") == "a …"


@pytest.mark.parametrize("name", sorted(PUNCTUATED))
def test_shuffle_reorders_sentences(name):
    text = TEXTS[name]
    units = split_sentences(text)
    assert len(set(units)) >= 2
    for seed in range(5):
        out = shuffle(text, rng=random.Random(seed))
        got = split_sentences(out)
        assert Counter(got) == Counter(units)
        assert got != units


def test_shuffle_swaps_two_sentences():
    assert shuffle("First we eat. Then we sleep.") == "Then we sleep. First we eat."


@pytest.mark.parametrize("name", sorted({**UNPUNCTUATED, **SINGLE, **EDGE}))
def test_shuffle_without_sentences_permutes_smaller_units(name):
    text = TEXTS[name]
    out = shuffle(text, rng=random.Random(1))
    stripped = text.strip()
    if len(set(stripped)) >= 2:
        # A permutation of clauses, words or characters keeps every non-space character.
        assert Counter(out.replace(" ", "")) == Counter(stripped.replace(" ", ""))
    elif stripped:
        assert out == f"{stripped} {EMPTY_STANDIN}"


def test_shuffle_single_sentence_permutes_words():
    out = shuffle("The cat sat on the mat.", rng=random.Random(3))
    assert sorted(out.split()) == sorted(["The", "cat", "sat", "on", "the", "mat."])
    assert out != "The cat sat on the mat."


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_filler_appends_to_double_length(name):
    text = TEXTS[name]
    out = apply_rewrite("filler", text, rng=random.Random(2))
    # Whitespace-only text has nothing to keep, so its filler stands alone.
    assert out.startswith(text if text.strip() else "")
    assert len(out) > len(text)
    assert len(out) >= 2 * len(text.strip())
    fillers = FILLERS_ZH if name.startswith(("zh", "word_zh")) else FILLERS_EN
    assert any(f in out for f in fillers)


def test_filler_after_chinese_uses_chinese():
    out = apply_rewrite("filler", "今天天气很好。", rng=random.Random(0))
    assert out.startswith("今天天气很好。") and any(f in out for f in FILLERS_ZH)
    assert not any(f in out for f in FILLERS_EN)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_refusal_is_a_canned_refusal(name):
    assert refusal(TEXTS[name], rng=random.Random(4)) in REFUSALS


def test_refusal_never_returns_the_same_refusal():
    for r in REFUSALS:
        for seed in range(10):
            assert refusal(r, rng=random.Random(seed)) != r


def test_other_prompt_comes_from_pool_and_differs():
    text = POOL[0]
    for seed in range(10):
        out = other_prompt(text, rng=random.Random(seed), pool=[*POOL, f"  {text} "])
        assert out in POOL and out != text and out.strip()


def test_other_prompt_without_usable_pool_raises():
    with pytest.raises(ValueError, match="pool"):
        other_prompt("Some answer.", rng=random.Random(0), pool=None)
    with pytest.raises(ValueError, match="pool"):
        apply_rewrite("other_prompt", "Some answer.", rng=random.Random(0), pool=["Some answer.", "  "])


@pytest.mark.parametrize("kind", sorted(REWRITES))
def test_deterministic_for_a_seed(kind):
    for text in (PUNCTUATED["en"], UNPUNCTUATED["en_np"], PUNCTUATED["zh"]):
        assert _rewrite(kind, text, seed=7) == _rewrite(kind, text, seed=7)
        no_rng = [apply_rewrite(kind, text, pool=POOL) for _ in range(2)]
        assert no_rng[0] == no_rng[1]


def test_shuffle_varies_with_seed():
    text = "One. Two. Three. Four. Five."
    assert len({shuffle(text, rng=random.Random(s)) for s in range(10)}) > 1


def test_apply_rewrite_dispatches_and_rejects_unknown_kind():
    text = PUNCTUATED["en"]
    assert apply_rewrite("truncate", text, rng=random.Random(5)) == truncate(text, rng=random.Random(5))
    with pytest.raises(ValueError) as err:
        apply_rewrite("nonsense", text, rng=random.Random(0))
    for kind in REWRITES:
        assert kind in str(err.value)


def test_registry_names():
    assert set(REWRITES) == {
        "repeat_sentence",
        "truncate",
        "first_sentence",
        "refusal",
        "shuffle",
        "other_prompt",
        "filler",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world. How are you? I'm fine!", ["Hello world.", "How are you?", "I'm fine!"]),
        ("Pi is about 3.14 in value. It never ends.", ["Pi is about 3.14 in value.", "It never ends."]),
        ("Dr. Smith arrived. He was late.", ["Dr. Smith arrived.", "He was late."]),
        ("Bring fruit, e.g. apples. Or pears.", ["Bring fruit, e.g. apples.", "Or pears."]),
        ("Use tools (e.g. Hammers) wisely. Done.", ["Use tools (e.g. Hammers) wisely.", "Done."]),
        ("J. K. Rowling wrote it. Many read it.", ["J. K. Rowling wrote it.", "Many read it."]),
        ("See No. 5 on p. 12. Say no. Then leave.", ["See No. 5 on p. 12.", "Say no.", "Then leave."]),
        (
            "Wait... what happened? I waited... Then he came.",
            ["Wait... what happened?", "I waited...", "Then he came."],
        ),
        ("Well… Maybe. Really?! Yes.", ["Well…", "Maybe.", "Really?!", "Yes."]),
        ('He said "Stop!" Then he left.', ['He said "Stop!"', "Then he left."]),
        ("It costs $3.50. Cheap (really). Buy it.", ["It costs $3.50.", "Cheap (really).", "Buy it."]),
        ("- Buy milk\n- Walk the dog\n\n- Call mom", ["- Buy milk", "- Walk the dog", "- Call mom"]),
        ("1. Preheat the oven.\n2. Mix the flour.", ["1. Preheat the oven.", "2. Mix the flour."]),
        ("Line one\r\nLine two. Still two.", ["Line one", "Line two.", "Still two."]),
        ("今天天气很好。我们去公园吧！你呢？", ["今天天气很好。", "我们去公园吧！", "你呢？"]),
        ("他说：“好。”然后走了。", ["他说：“好。”", "然后走了。"]),
        ("Hello 世界。Next sentence.", ["Hello 世界。", "Next sentence."]),
        ("Das ist z.B. ein Test. Schön, oder?", ["Das ist z.B. ein Test.", "Schön, oder?"]),
        ("Öl ist teuer. Übrigens: ja!", ["Öl ist teuer.", "Übrigens: ja!"]),
        (
            "Привет. Как дела? Всё хорошо, т.е. отлично!",
            ["Привет.", "Как дела?", "Всё хорошо, т.е. отлично!"],
        ),
        ("Great job 🎉! See you 😀.", ["Great job 🎉!", "See you 😀."]),
        ("One sentence only.", ["One sentence only."]),
        ("  padded text.  ", ["padded text."]),
        ("", []),
        ("   \n  ", []),
        ("...", ["..."]),
        # No sentence punctuation: clauses, then fixed chunks of 8 words, then 16 CJK characters.
        (
            "first the flour, then the eggs; finally milk",
            ["first the flour,", "then the eggs;", "finally milk"],
        ),
        ("it was 3,000 people at 10:30 today", ["it was 3,000 people at 10:30 today"]),
        (
            "one two three four five six seven eight nine ten eleven",
            ["one two three four five six seven eight", "nine ten eleven"],
        ),
        ("我们去公园，然后吃饭", ["我们去公园，", "然后吃饭"]),
        ("一二三四五六七八九十一二三四五六七八九十", ["一二三四五六七八九十一二三四五六", "七八九十"]),
        ("just a few words", ["just a few words"]),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def _load_jsonl(name):
    raw = resources.files("cme_jax.data").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def test_shipped_prompts():
    rows = _load_jsonl("prompts.jsonl")
    assert len(rows) == 320
    assert all(set(r) == {"prompt", "category"} for r in rows)
    assert all(isinstance(r[k], str) and r[k].strip() for r in rows for k in r)
    norm = [" ".join(r["prompt"].lower().split()) for r in rows]
    assert len(set(norm)) == len(norm)
    counts = Counter(r["category"] for r in rows)
    assert len(counts) == 10
    assert all(24 <= c <= 40 for c in counts.values()), counts


def test_shipped_preference_pairs():
    rows = _load_jsonl("preference_pairs.jsonl")
    assert len(rows) == 48
    allowed = {
        "factual_error",
        "unhelpful",
        "off_topic",
        "rude",
        "incomplete",
        "wrong_math",
        "ignores_constraint",
        "repetitive",
    }
    assert all(set(r) == {"prompt", "chosen", "rejected", "flaw"} for r in rows)
    assert all(isinstance(r[k], str) and r[k].strip() for r in rows for k in r)
    assert {r["flaw"] for r in rows} <= allowed
    assert all(c == 6 for c in Counter(r["flaw"] for r in rows).values())
    assert all(r["chosen"] != r["rejected"] for r in rows)
    assert len({" ".join(r["prompt"].lower().split()) for r in rows}) == 48
