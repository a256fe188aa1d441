"""Read back what an instruction asks for — gender, pitch, rate, loudness levels — from free-form English.

The evaluation must know which direction each instruction asked for, including instructions written in
words the corpus never used ("a bass voice", "whispery", "not loud", "neither fast nor slow"). A small,
explainable reader does this: a lexicon (every phrase the generator writes, in both wordings, plus common
synonyms, comparatives and adverbs), matched left to right, longest phrase first, on whole words, with
three rules on top:

* negation: "not", "no", "never", "neither", "nor", "without", "…n't" negate every match up to the next
  clause boundary (punctuation, "but", "and", "with", ...). A negated extreme means the middle level
  ("not loud" → normal, "neither fast nor slow" → normal); a negated middle level says nothing; a negated
  gender means the other one. Stated levels win over negated ones ("not loud but quiet" → quiet);
* "less" flips the extreme it precedes ("less loud" → quiet);
* gender pronouns (he/she, his/her) count only when no gender noun is there.

Two different stated levels of one attribute are a contradiction: that attribute is None (unknown).
"""
from __future__ import annotations

import functools
import itertools
import re

from tts_core.corpus.instructions import GENDERS, LOUDNESSES, PITCHES, RATES, SLOT_ATTRIBUTE, WORDINGS

LEVELS = {"gender": GENDERS, "pitch": PITCHES, "rate": RATES, "loudness": LOUDNESSES}
OPPOSITE = {"low": "high", "high": "low", "slow": "fast", "fast": "slow", "quiet": "loud", "loud": "quiet"}
# what a negated level means: the middle for an extreme, nothing for the middle, the other gender
NEGATED = {"gender": {"male": "female", "female": "male"},
           **{attr: {lv[0]: lv[1], lv[2]: lv[1]} for attr, lv in LEVELS.items() if attr != "gender"}}

_GENDER_NOUNS = {
    "male": ("male", "man", "men", "masculine", "gentleman", "gentlemen", "boy", "guy", "fellow", "father", "dad",
             "grandfather", "grandpa", "husband", "king", "sir", "mister"),
    "female": ("female", "woman", "women", "feminine", "lady", "ladies", "girl", "gal", "mother", "mom", "mum",
               "grandmother", "grandma", "wife", "queen", "madam"),
}
_PRONOUNS = {"male": ("he", "him", "his", "himself"), "female": ("she", "her", "hers", "herself")}

# free-form words and phrases beyond what the generator writes; hyphens are read as spaces
_SYNONYMS = {
    "pitch": {
        "low": ("deep", "deeper", "deepest", "low", "lower", "lowest", "low pitched", "lower pitched", "bass",
                "baritone", "basso", "deep voiced", "deep toned", "low toned", "low register", "rumbling"),
        "high": ("high", "higher", "highest", "high pitched", "higher pitched", "squeaky", "shrill", "piping",
                 "treble", "falsetto", "soprano", "high register", "high toned"),
        "mid": ("mid range", "midrange", "middle register", "mid register", "medium register"),
    },
    "rate": {
        "slow": ("slow", "slowly", "slower", "slowed", "unhurried", "unhurriedly", "leisurely", "without hurry",
                 "in no hurry", "drawn out", "drawling", "drawl", "languid", "languidly", "sluggish", "sluggishly",
                 "plodding", "crawl", "snail pace", "measured", "dragging"),
        "fast": ("fast", "faster", "quick", "quickly", "quicker", "rapid", "rapidly", "brisk", "briskly", "hurried",
                 "hurriedly", "hasty", "hastily", "speedy", "speedily", "swift", "swiftly", "rushed", "rushing",
                 "rush", "hurry", "racing", "gallop", "at a gallop", "fast talking"),
        "normal": ("evenly paced", "steady pace", "even pace"),
    },
    "loudness": {
        "quiet": ("quiet", "quietly", "quieter", "soft", "softly", "softer", "soft spoken", "hushed", "whisper",
                  "whispers", "whispered", "whispering", "whispery", "murmur", "murmuring", "murmured", "faint",
                  "faintly", "barely audible", "subdued", "muted", "lower volume", "under her breath",
                  "under his breath"),
        "loud": ("loud", "loudly", "louder", "booming", "boom", "shout", "shouts", "shouting", "shouted", "yell",
                 "yells", "yelling", "yelled", "bellow", "bellowing", "thunderous", "thunderously", "thundering",
                 "roaring", "blaring", "deafening", "projecting", "raised voice", "at the top of her voice",
                 "at the top of his voice"),
        "normal": (),
    },
}
# middle levels are bound to a noun of their attribute: "normal pace" is rate, "normal volume" is loudness
_MID_WORDS = ("medium", "moderate", "average", "normal", "ordinary", "regular", "natural", "middle", "mid", "typical",
              "everyday", "conversational", "standard", "usual", "comfortable")
_MID_ADVERBS = ("moderately", "normally", "averagely", "typically")
_NOUNS = {"pitch": ("pitch", "register"), "rate": ("pace", "speed", "tempo", "rate", "pacing", "speaking rate"),
          "loudness": ("volume", "loudness")}
_PARTICIPLES = {"pitch": ("pitched",), "rate": ("paced",), "loudness": ()}
# extremes said with a noun of their attribute: "high volume" is loud, not high pitch; "pace: fast"
_NOUN_EXTREMES = {"rate": {"fast": ("high", "fast", "quick", "rapid", "brisk"), "slow": ("low", "slow")},
                  "loudness": {"loud": ("high", "full", "maximum", "max", "loud"), "quiet": ("low", "minimum", "soft")}}

_NEGATORS = {"not", "no", "never", "neither", "nor", "without"}
_BOUNDARIES = {".", ",", ";", ":", "!", "?", "(", ")", "but", "and", "yet", "though", "although", "while", "whereas",
               "with", "rather", "instead", "so"}
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*|[.,;:!?()]")


def tokens(text: str) -> list[str]:
    """Lower-case words and clause punctuation; hyphens split words, possessive 's is dropped."""
    text = text.lower().replace("\u2019", "'").replace("-", " ")
    return _TOKEN.findall(re.sub(r"'s\b", "", text))


@functools.lru_cache(maxsize=1)
def lexicon() -> dict[tuple[str, ...], tuple[str, str]]:
    """phrase tokens -> (attribute, level), from the generator's wordings, synonyms and middle-level nouns."""
    table: dict[tuple[str, ...], set[tuple[str, str]]] = {}

    def add(phrase: str, attr: str, level: str) -> None:
        table.setdefault(tuple(tokens(phrase)), set()).add((attr, level))

    for wording in WORDINGS.values():
        for slot, attr in SLOT_ATTRIBUTE.items():
            for level, phrases in getattr(wording, slot).items():
                for phrase in phrases:
                    add(phrase, attr, level)
    for attr, levels in _SYNONYMS.items():
        for level, phrases in levels.items():
            for phrase in phrases:
                add(phrase, attr, level)
    for attr, nouns in _NOUNS.items():
        mid = LEVELS[attr][1]
        for word, noun in itertools.product(_MID_WORDS, nouns):
            for phrase in (f"{word} {noun}", f"{word} in {noun}", f"{noun} {word}", f"{noun}: {word}"):
                add(phrase, attr, mid)
        for word, participle in itertools.product(_MID_WORDS + _MID_ADVERBS, _PARTICIPLES[attr]):
            add(f"{word} {participle}", attr, mid)
        for level, words in _NOUN_EXTREMES.get(attr, {}).items():
            for word, noun in itertools.product(words, nouns):
                for phrase in (f"{word} {noun}", f"{noun} {word}", f"{noun}: {word}"):
                    add(phrase, attr, level)
    for level, words in _GENDER_NOUNS.items():
        for word in words:
            add(word, "gender", level)
    clashes = {" ".join(k): v for k, v in table.items() if len(v) > 1}
    if clashes:  # a phrase must mean one thing; caught at import by the tests
        raise ValueError(f"phrases with more than one meaning: {clashes}")
    return {k: next(iter(v)) for k, v in table.items()}


def _matches(toks: list[str]) -> list[tuple[str, str, bool]]:
    """[(attribute, level, negated)] left to right, longest phrase first; "less" flips the next extreme."""
    lex = lexicon()
    longest = max(len(k) for k in lex)
    out, negated, i = [], False, 0
    while i < len(toks):
        tok = toks[i]
        for n in range(min(longest, len(toks) - i), 0, -1):
            hit = lex.get(tuple(toks[i:i + n]))
            if hit is not None:
                attr, level = hit
                if i > 0 and toks[i - 1] == "less" and level in OPPOSITE:
                    level = OPPOSITE[level]
                out.append((attr, level, negated))
                i += n
                break
        else:
            if tok in _NEGATORS or tok.endswith("n't"):
                negated = True
            elif tok in _BOUNDARIES:
                negated = False
            i += 1
    return out


def parse_instruction(text: str) -> dict[str, str | None]:
    """{gender, pitch, rate, loudness} → level, or None when not stated or contradictory (module docstring).

    Exact for every instruction `make_instruction` writes, in every wording (tested); a best effort on
    free-form text, which is what evaluation needs: which direction did the instruction ask for.
    """
    toks = tokens(text)
    matches = _matches(toks)
    out: dict[str, str | None] = {}
    for attr in LEVELS:
        stated = {lv for a, lv, neg in matches if a == attr and not neg}
        if attr == "gender" and not stated:
            stated = {lv for lv, words in _PRONOUNS.items() if any(t in words for t in toks)}
        if not stated:
            stated = {NEGATED[attr].get(lv) for a, lv, neg in matches if a == attr and neg} - {None}
        out[attr] = stated.pop() if len(stated) == 1 else None
    return out
