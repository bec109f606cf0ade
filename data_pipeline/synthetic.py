"""Deterministic synthetic multilingual parallel corpus (English-centric, learnable).

    python -m data_pipeline.synthetic --out DIR --seed 0 [--min-size 50 --max-size 50000]

English sentences come from a small grammar (determiner/adjective/noun subject, verb with
tense and optional negation, object, optional prepositional phrase, plurals). Each
sentence is first built as a meaning (:class:`Clause`), then realised in English and in
the target language, so the translation is a deterministic function of the English.

Languages come in 8 families. Members of a family share a proto-lexicon (each language
applies its own regular sound changes), word order and morphology; families differ in
word order (SVO, SOV, VSO, VOS, OSV, OVS), morphology (fusional, agglutinative suffixing,
prefixing, isolating) and script (Latin, Cyrillic, Greek, Devanagari, Arabic, Hangul,
Katakana, Georgian; words are built from an internal phoneme string and transliterated
into the real Unicode block). Codes are ``q<family><member>``, inside ISO 639-3's
``qaa``-``qtz`` private-use range, so they never clash with real languages.

Train sizes are log-spaced from ``--min-size`` to ``--max-size`` and interleaved over
families so every family has high- and low-resource members.
"""
from __future__ import annotations

import argparse
import itertools
import random
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

# --------------------------------------------------------------------------- English

# noun: plural (None = regular)
NOUNS = {
    "dog": None, "cat": None, "horse": None, "bird": None, "duck": None, "cow": None, "goat": None,
    "wolf": "wolves", "fox": "foxes", "mouse": "mice", "man": "men", "woman": "women", "child": "children",
    "boy": None, "girl": None, "king": None, "queen": None, "farmer": None, "teacher": None, "doctor": None,
    "friend": None, "brother": None, "sister": None, "mother": None, "father": None, "baby": "babies",
    "student": None, "soldier": None, "merchant": None, "house": None, "tree": None, "river": None,
    "mountain": None, "city": "cities", "village": None, "garden": None, "field": None, "road": None,
    "bridge": None, "boat": None, "ship": None, "car": None, "book": None, "letter": None, "table": None,
    "chair": None, "door": None, "window": None, "bed": None, "cup": None, "bowl": None, "knife": "knives",
    "box": "boxes", "basket": None, "apple": None, "stone": None, "flower": None, "hat": None, "shoe": None,
    "key": None, "song": None, "star": None, "coin": None, "lamp": None, "ring": None,
}
# (No noun with an identical plural, e.g. "sheep": the English must determine the meaning.)

# verb: (past, 3rd person singular) where None = regular
VERBS = {
    "see": ("saw", None), "find": ("found", None), "take": ("took", None), "carry": ("carried", "carries"),
    "hold": ("held", None), "want": (None, None), "like": ("liked", None), "love": ("loved", None),
    "hate": ("hated", None), "watch": (None, "watches"), "follow": (None, None), "build": ("built", None),
    "break": ("broke", None), "buy": ("bought", None), "sell": ("sold", None), "bring": ("brought", None),
    "cook": (None, None), "eat": ("ate", None), "wash": (None, "washes"), "open": (None, None),
    "close": ("closed", None), "paint": (None, None), "draw": ("drew", None), "catch": ("caught", "catches"),
    "throw": ("threw", None), "push": (None, "pushes"), "pull": (None, None), "visit": (None, None),
    "help": (None, None), "call": (None, None), "hear": ("heard", None), "know": ("knew", None),
    "remember": (None, None), "forget": ("forgot", None), "leave": ("left", None), "touch": (None, "touches"),
    "hide": ("hid", None), "fix": (None, "fixes"), "teach": ("taught", "teaches"), "keep": ("kept", None),
}
ADJECTIVES = [
    "big", "small", "old", "young", "new", "red", "blue", "green", "white", "black", "happy", "sad", "tall",
    "strong", "weak", "beautiful", "quiet", "loud", "rich", "poor", "clever", "lazy", "brave", "hungry",
    "tired", "angry", "kind", "wild", "heavy", "dark", "bright", "cold", "warm", "famous",
]
PREPOSITIONS = ["in", "on", "with", "near", "under", "behind", "from", "to"]
DETERMINERS = ["the", "a", "this", "that", "my", "your", "his", "her", "our", "their"]
TENSES = ("present", "past", "future")
# Grammatical morphemes every language has a form for (used as affix or particle).
FUNCTION_MORPHEMES = (
    ["PL", "ACC", "NOM", "PAST", "FUT", "NEG", "AGR"] + [f"DET_{d}" for d in DETERMINERS]
    + [f"P_{p}" for p in PREPOSITIONS]
)
FUSIONAL_NOUN = [f"N_{n}_{c}" for n in ("sg", "pl") for c in ("nom", "acc", "obl")]
FUSIONAL_VERB = [f"V_{t}_{n}" for t in TENSES for n in ("sg", "pl")]


@dataclass(frozen=True)
class NounPhrase:
    """Meaning of a noun phrase."""

    det: str
    """Determiner lemma (``DETERMINERS``)."""
    adj: str | None
    """Adjective lemma or None."""
    noun: str
    """Noun lemma."""
    plural: bool
    """Number."""


@dataclass(frozen=True)
class Clause:
    """Meaning of one sentence: subject, verb, object and an optional PP."""

    subj: NounPhrase
    """Subject."""
    verb: str
    """Verb lemma."""
    tense: str
    """present/past/future."""
    negated: bool
    """Negation."""
    obj: NounPhrase
    """Direct object."""
    pp: tuple[str, NounPhrase] | None
    """(preposition, noun phrase) or None."""


def _sample_np(rng: random.Random) -> NounPhrase:
    return NounPhrase(det=rng.choice(DETERMINERS), adj=rng.choice(ADJECTIVES) if rng.random() < 0.4 else None,
                      noun=rng.choice(_NOUN_LIST), plural=rng.random() < 0.35)


_NOUN_LIST = list(NOUNS)
_VERB_LIST = list(VERBS)


def sample_clause(rng: random.Random) -> Clause:
    """A random meaning; English length is 4..15 words (see :func:`english`)."""
    pp = (rng.choice(PREPOSITIONS), _sample_np(rng)) if rng.random() < 0.45 else None
    return Clause(subj=_sample_np(rng), verb=rng.choice(_VERB_LIST), tense=rng.choice(TENSES),
                  negated=rng.random() < 0.2, obj=_sample_np(rng), pp=pp)


def _plural(noun: str) -> str:
    irregular = NOUNS[noun]
    if irregular:
        return irregular
    return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


def _english_np(np_: NounPhrase) -> list[str]:
    noun = _plural(np_.noun) if np_.plural else np_.noun
    words = [np_.adj, noun] if np_.adj else [noun]
    det = np_.det
    if det == "a":
        if np_.plural:
            return words  # bare plural
        det = "an" if words[0][0] in "aeiou" else "a"
    elif np_.plural and det in ("this", "that"):
        det = {"this": "these", "that": "those"}[det]
    return [det] + words


def _english_verb(verb: str, tense: str, negated: bool, plural_subject: bool) -> list[str]:
    past, third = VERBS[verb]
    if tense == "future":
        return ["will", "not", verb] if negated else ["will", verb]
    if tense == "past":
        if negated:
            return ["did", "not", verb]
        return [past or (verb + "d" if verb.endswith("e") else verb + "ed")]
    if negated:
        return ["do" if plural_subject else "does", "not", verb]
    return [verb if plural_subject else (third or verb + "s")]


def english(c: Clause) -> str:
    """English realisation, e.g. ``The big dog did not see my cats near the river.``"""
    words = _english_np(c.subj) + _english_verb(c.verb, c.tense, c.negated, c.subj.plural) + _english_np(c.obj)
    if c.pp:
        words += [c.pp[0]] + _english_np(c.pp[1])
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


# --------------------------------------------------------------------------- scripts

CONSONANTS = "pbtdkgmnszfvhlrjwcx"  # internal phonemes; c = /tʃ/, x = /ʃ/, j = /j/
VOWELS = "aeiou"

_CYRILLIC = dict(zip("abvgdezijklmnoprstufhcxw", "абвгдезийклмнопрстуфхчшў"))
_GREEK = dict(zip("abgdezhiklmnoprstufcxjwv", "αμγδεζχικλμνοπρστυφψξϳϝβ"))
_GREEK["b"] = "μπ"
_GEORGIAN = dict(zip("abgdevzticklmnoprsufhxjw", "აბგდევზთიჩკლმნოპრსუფჰშჲჳ"))
_ARABIC = dict(zip("btxjhdrzsfklmnwgpvcaeiou", "بتشیهدرزسفكلمنۋغپڤچاێيۆو"))
_DEVANAGARI_C = dict(zip("kgcjtdnpbmrlwvxsh", "कगचयतदनपबमरलवभशसह"))
_DEVANAGARI_C.update({"z": "ज़", "f": "फ़"})  # consonant + nukta, already NFC/NFKC-stable
_DEVANAGARI_V = dict(zip(VOWELS, "अएइओउ"))
_DEVANAGARI_MATRA = {"a": "", "e": "े", "i": "ि", "o": "ो", "u": "ु"}
_VIRAMA = "्"
_KANA_ROWS = {
    "": "ア イ ウ エ オ", "k": "カ キ ク ケ コ", "g": "ガ ギ グ ゲ ゴ", "s": "サ シ ス セ ソ", "z": "ザ ジ ズ ゼ ゾ",
    "t": "タ チ ツ テ ト", "d": "ダ ヂ ヅ デ ド", "n": "ナ ニ ヌ ネ ノ", "h": "ハ ヒ フ ヘ ホ", "b": "バ ビ ブ ベ ボ",
    "p": "パ ピ プ ペ ポ", "m": "マ ミ ム メ モ", "j": "ヤ イ ユ イェ ヨ", "r": "ラ リ ル レ ロ", "l": "ラ リ ル レ ロ",
    "w": "ワ ウィ ウ ウェ ヲ", "f": "ファ フィ フ フェ フォ", "v": "ヴァ ヴィ ヴ ヴェ ヴォ",
    "c": "チャ チ チュ チェ チョ", "x": "シャ シ シュ シェ ショ",
}
_KANA = {(c, v): k for c, row in _KANA_ROWS.items() for v, k in zip("aiueo", row.split())}
_KANA_CODA = {"n": "ン", "t": "ト", "d": "ド", "c": "チ", "x": "シ", "j": "イ", "w": "ウ"}
_HANGUL_ONSET = dict(zip("gkndtrlmbpsxzchfv", [0, 15, 2, 3, 16, 5, 5, 6, 7, 17, 9, 10, 12, 14, 18, 17, 7]))
_HANGUL_VOWEL = {"a": 0, "e": 5, "i": 20, "o": 8, "u": 13, "ja": 2, "je": 7, "jo": 12, "ju": 17, "ji": 20,
                 "wa": 9, "we": 15, "wi": 16, "wo": 14, "wu": 13, "": 18}  # "" = epenthetic ㅡ
_HANGUL_CODA = dict(zip("kgntdlrmpbs", [1, 1, 4, 7, 7, 8, 8, 16, 17, 17, 19]))
_LATIN_SPELLINGS = [
    {"c": "ch", "x": "sh", "j": "y"},
    {"c": "č", "x": "š", "j": "j"},
    {"c": "tch", "x": "sch", "j": "y"},
    {"c": "cz", "x": "sz", "j": "j", "w": "ł"},
]


def _by_char(table: dict[str, str]):
    return lambda w: "".join(table.get(ch, ch) for ch in w)


def _greek(word: str) -> str:
    out = "".join(_GREEK.get(ch, ch) for ch in word)
    return out[:-1] + "ς" if out.endswith("σ") else out


def _devanagari(word: str) -> str:
    out, i = [], 0
    while i < len(word):
        ch = word[i]
        if ch in _DEVANAGARI_C:
            nxt = word[i + 1] if i + 1 < len(word) else ""
            if nxt in _DEVANAGARI_MATRA:
                out.append(_DEVANAGARI_C[ch] + _DEVANAGARI_MATRA[nxt])
                i += 2
                continue
            out.append(_DEVANAGARI_C[ch] + _VIRAMA)
        else:
            out.append(_DEVANAGARI_V[ch])
        i += 1
    return "".join(out)


def _katakana(word: str) -> str:
    out, i = [], 0
    while i < len(word):
        ch = word[i]
        nxt = word[i + 1] if i + 1 < len(word) else ""
        if ch in VOWELS:
            out.append(_KANA[("", ch)])
        elif nxt and nxt in VOWELS:
            out.append(_KANA[(ch, nxt)])
            i += 1
        else:  # consonant without vowel: moraic n or an epenthetic vowel, as in loanwords
            out.append(_KANA_CODA.get(ch) or _KANA[(ch, "u")])
        i += 1
    return "".join(out)


def _hangul(word: str) -> str:
    out, i, n = [], 0, len(word)
    while i < n:
        onset = None
        if word[i] in _HANGUL_ONSET:
            onset = word[i]
            i += 1
        glide = ""
        if i + 1 < n and word[i] in "jw" and word[i + 1] in VOWELS:
            glide = word[i]
            i += 1
        elif onset is None and i < n and word[i] in "jw":  # glide with no vowel: becomes i/u
            out.append(_hangul_syllable(None, "i" if word[i] == "j" else "u", None))
            i += 1
            continue
        vowel = ""
        if i < n and word[i] in VOWELS:
            vowel = word[i]
            i += 1
        coda = None
        if i < n and word[i] in _HANGUL_CODA and (i + 1 == n or word[i + 1] not in VOWELS + "jw"):
            coda = word[i]
            i += 1
        out.append(_hangul_syllable(onset, glide + vowel if vowel else "", coda))
    return "".join(out)


def _hangul_syllable(onset: str | None, vowel: str, coda: str | None) -> str:
    l_idx = _HANGUL_ONSET[onset] if onset else 11  # ㅇ = silent onset
    v_idx = _HANGUL_VOWEL[vowel]
    t_idx = _HANGUL_CODA[coda] if coda else 0
    return chr(0xAC00 + (l_idx * 21 + v_idx) * 28 + t_idx)


@dataclass(frozen=True)
class Script:
    """How a family writes: transliteration, case, word spacing, full stop."""

    name: str
    """Unicode script name (as in ``unicodedata.name``), e.g. ``CYRILLIC``."""
    cased: bool
    """Capitalise the first letter of a sentence."""
    spaces: bool
    """Separate words with spaces."""
    full_stop: str
    """Sentence-final punctuation."""


SCRIPTS = {
    "LATIN": Script("LATIN", True, True, "."),
    "CYRILLIC": Script("CYRILLIC", True, True, "."),
    "GREEK": Script("GREEK", True, True, "."),
    "DEVANAGARI": Script("DEVANAGARI", False, True, "।"),
    "ARABIC": Script("ARABIC", False, True, "۔"),
    "HANGUL": Script("HANGUL", False, True, "."),
    "KATAKANA": Script("KATAKANA", False, False, "。"),
    "GEORGIAN": Script("GEORGIAN", False, True, "."),
}
_WRITERS = {"CYRILLIC": _by_char(_CYRILLIC), "GREEK": _greek, "DEVANAGARI": _devanagari,
            "ARABIC": _by_char(_ARABIC), "HANGUL": _hangul, "KATAKANA": _katakana,
            "GEORGIAN": _by_char(_GEORGIAN)}


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """Typology shared by all members of a language family."""

    name: str
    """Made-up family name."""
    letter: str
    """Second letter of member codes (``q<letter><member>``)."""
    script: str
    """Key of ``SCRIPTS``."""
    order: str
    """Order of subject, verb, object, e.g. ``SOV``."""
    morphology: str
    """fusional, suffixing (agglutinative), prefixing or isolating."""
    adj_after: bool
    """Adjective follows the noun."""
    det: str
    """Determiner placement: ``before``/``after`` (word) or ``prefix`` (on the noun)."""
    adposition: str
    """``pre`` (word before NP), ``post`` (word after NP) or ``case`` (affix on the noun)."""
    pp_slot: str
    """Where the prepositional phrase goes: ``end``, ``start`` or ``before_verb``."""
    marks: tuple[str, ...]
    """Roles marked on the noun phrase: ``subj``/``obj`` (affix or particle by morphology)."""
    consonants: str
    """Consonants of the proto-language."""
    codas: str
    """Consonants allowed at the end of a proto syllable ('' = open syllables only)."""
    members: int
    """Number of languages."""


FAMILIES = (
    Family("Aurelic", "a", "LATIN", "SVO", "fusional", True, "before", "pre", "end", (),
           "ptkbdgmnslrfv", "nsrl", 4),
    Family("Borean", "b", "CYRILLIC", "SOV", "suffixing", False, "before", "case", "before_verb", ("obj",),
           "ptkbdgmnszlrvxcj", "ntkr", 3),
    Family("Kelvic", "c", "GREEK", "VSO", "prefixing", True, "before", "pre", "end", ("obj",),
           "ptkmnslrfhz", "s", 3),
    Family("Sindhic", "d", "DEVANAGARI", "SOV", "suffixing", False, "before", "post", "before_verb", ("obj",),
           "ptkbdgmnshrlvcj", "nrk", 4),
    Family("Qamari", "e", "ARABIC", "VOS", "prefixing", True, "prefix", "pre", "end", ("obj",),
           "btdksxzfhlmnrwj", "bdlmnr", 3),
    Family("Hanuric", "f", "HANGUL", "SOV", "suffixing", False, "before", "case", "before_verb", ("subj", "obj"),
           "ptkmnshrcj", "nmkl", 4),
    Family("Kanoric", "g", "KATAKANA", "OSV", "isolating", False, "before", "post", "before_verb",
           ("subj", "obj"), "kstnhmjrwgzdbp", "n", 3),
    Family("Mtvaric", "h", "GEORGIAN", "OVS", "isolating", True, "after", "pre", "start", (),
           "ptkbdgmnszlrvxc", "nrlsm", 4),
)

# Regular sound changes on the internal phoneme string; each non-first member of a family
# applies a few, so cognates stay recognisable.
SOUND_CHANGES = (
    ("p", "f"), ("([aeiou])t(?=[aeiou])", r"\1d"), ("([aeiou])k(?=[aeiou])", r"\1g"), ("k(?=[ie])", "c"),
    ("s(?=[ie])", "x"), ("o$", "u"), ("e$", "i"), ("a$", "o"), ("([^aeiou])$", r"\1e"), ("b", "v"),
    ("r", "l"), ("^([aeiou])", r"h\1"), ("t$", "s"), ("d(?=[aeiou])", "z"), ("g", "h"), ("u", "o"),
    ("([aeiou])m$", r"\1n"), ("i(?=[aeiou])", "j"),
)


@dataclass
class Language:
    """One synthetic language: its family, sound changes and morpheme forms."""

    code: str
    """Language code ``q<family><member>``."""
    family: Family
    """Family (typology, script)."""
    changes: list[tuple[str, str]]
    """Sound changes applied to the family's proto forms, in order."""
    spelling: dict[str, str] = field(default_factory=dict)
    """Latin-script spelling of c/x/j/w (Latin family only)."""
    forms: dict[str, str] = field(default_factory=dict)
    """Morpheme (lemma or function morpheme) -> internal phoneme string."""

    @property
    def script(self) -> Script:
        """The family's script."""
        return SCRIPTS[self.family.script]

    def write_word(self, phonemes: str) -> str:
        """Transliterate an internal phoneme string into the language's script."""
        return _write(self.family.script, tuple(sorted(self.spelling.items())), phonemes)

    def translate(self, c: Clause) -> str:
        """Target-language realisation of a meaning."""
        return realise(self, c)


@lru_cache(maxsize=1 << 16)
def _write(script: str, spelling: tuple[tuple[str, str], ...], phonemes: str) -> str:
    if script == "LATIN":
        table = dict(spelling)
        return "".join(table.get(ch, ch) for ch in phonemes)
    return _WRITERS[script](phonemes)


def _proto_syllable(rng: random.Random, fam: Family, allow_coda: bool) -> str:
    onset = rng.choice(fam.consonants) if rng.random() < 0.85 else ""
    coda = rng.choice(fam.codas) if allow_coda and fam.codas and rng.random() < 0.3 else ""
    return onset + rng.choice(VOWELS) + coda


def proto_lexicon(fam: Family, seed: int) -> dict[str, str]:
    """Proto-forms of every lemma and function morpheme for one family (all distinct)."""
    rng = random.Random(f"synthetic:{seed}:family:{fam.name}")
    forms: dict[str, str] = {}
    used: set[str] = set()
    content = list(NOUNS) + list(VERBS) + ADJECTIVES
    grammar = FUNCTION_MORPHEMES + FUSIONAL_NOUN + FUSIONAL_VERB
    grammar_set = set(grammar)
    # Grammatical morphemes first, so that the few short forms go to them (as in real languages).
    for key in grammar + content:
        for attempt in itertools.count():
            if key in grammar_set:
                n_syl = 1 if attempt < 50 else 2  # a small inventory can run out of one-syllable forms
            else:
                n_syl = rng.choices((1, 2, 3), weights=(0.15, 0.55, 0.3))[0]
            form = "".join(_proto_syllable(rng, fam, allow_coda=i == n_syl - 1 and key not in grammar_set)
                           for i in range(n_syl))
            if form not in used:
                break
        used.add(form)
        forms[key] = form
    return forms


def apply_changes(form: str, changes: Sequence[tuple[str, str]]) -> str:
    """Apply sound changes in order; a change that would leave no vowel is skipped."""
    for pattern, repl in changes:
        new = re.sub(pattern, repl, form)
        if any(v in new for v in VOWELS):
            form = new
    return form


def build_languages(seed: int = 0) -> list[Language]:
    """All languages (deterministic for ``seed``), ordered by family then member."""
    langs = []
    for fam in FAMILIES:
        proto = proto_lexicon(fam, seed)
        taken: list[list[tuple[str, str]]] = []
        for m in range(fam.members):
            rng = random.Random(f"synthetic:{seed}:lang:{fam.letter}{m}")
            changes = _pick_changes(rng, proto, conservative=m == 0, taken=taken)
            taken.append(changes)
            spelling = _LATIN_SPELLINGS[m % len(_LATIN_SPELLINGS)] if fam.script == "LATIN" else {}
            lang = Language(f"q{fam.letter}{'abcdefgh'[m]}", fam, changes, dict(spelling))
            lang.forms = _distinct_forms(proto, changes)
            langs.append(lang)
    return langs


def _pick_changes(rng: random.Random, proto: dict[str, str], conservative: bool,
                  taken: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Sound changes for one member: member 0 stays near the proto-language; the others
    take changes until at least a third of the lexicon differs from every earlier member."""
    if conservative:
        return rng.sample(SOUND_CHANGES, rng.randint(0, 1))
    pool = list(SOUND_CHANGES)
    rng.shuffle(pool)
    earlier = [[apply_changes(p, t) for p in proto.values()] for t in taken]
    changes: list[tuple[str, str]] = []
    for rule in pool:
        changes.append(rule)
        mine = [apply_changes(p, changes) for p in proto.values()]
        distance = min(sum(a != b for a, b in zip(mine, other)) / len(mine) for other in earlier)
        if len(changes) >= 2 and distance >= 1 / 3:
            break
    return changes


def _distinct_forms(proto: dict[str, str], changes) -> dict[str, str]:
    """Sound changes can merge two morphemes; keep them apart so the mapping stays invertible."""
    forms, used = {}, set()
    for key, p in proto.items():
        form = apply_changes(p, changes)
        while form in used:
            form += "a"
        used.add(form)
        forms[key] = form
    return forms


# --------------------------------------------------------------------------- realisation


def _noun_word(lang: Language, np_: NounPhrase, role: str) -> list[str]:
    """Noun with its affixes; isolating languages return the plural particle as a word."""
    f, fam = lang.forms, lang.family
    stem = f[np_.noun]
    det_prefix = f[f"DET_{np_.det}"] if fam.det == "prefix" else ""
    if fam.morphology == "fusional":
        case = {"subj": "nom", "obj": "acc"}.get(role, "obl")
        return [det_prefix + stem + f[f"N_{'pl' if np_.plural else 'sg'}_{case}"]]
    role_affix = ""
    if role in fam.marks:
        role_affix = f["NOM" if role == "subj" else "ACC"]
    elif role.startswith("P_") and fam.adposition == "case":
        role_affix = f[role]
    if fam.morphology == "suffixing":
        return [det_prefix + stem + (f["PL"] if np_.plural else "") + role_affix]
    if fam.morphology == "prefixing":
        return [role_affix + det_prefix + (f["PL"] if np_.plural else "") + stem]
    # isolating: plural particle next to the noun (after it in particle-final languages)
    if not np_.plural:
        return [stem]
    return [stem, f["PL"]] if fam.adposition == "post" else [f["PL"], stem]


def _noun_phrase(lang: Language, np_: NounPhrase, role: str) -> list[str]:
    f, fam = lang.forms, lang.family
    words = _noun_word(lang, np_, role)
    if np_.adj:
        words = words + [f[np_.adj]] if fam.adj_after else [f[np_.adj]] + words
    if fam.det == "before":
        words = [f[f"DET_{np_.det}"]] + words
    elif fam.det == "after":
        words = words + [f[f"DET_{np_.det}"]]
    # Role particles for isolating languages, adposition words for the others.
    if fam.morphology == "isolating" and role in fam.marks:
        words.append(f["NOM" if role == "subj" else "ACC"])
    if role.startswith("P_") and fam.adposition != "case":
        words = [f[role]] + words if fam.adposition == "pre" else words + [f[role]]
    return words


def _verb(lang: Language, c: Clause) -> list[str]:
    f, fam = lang.forms, lang.family
    stem = f[c.verb]
    tense = {"present": "", "past": f["PAST"], "future": f["FUT"]}[c.tense]
    neg = f["NEG"] if c.negated else ""
    agr = f["AGR"] if c.subj.plural else ""
    if fam.morphology == "fusional":
        word = stem + f[f"V_{c.tense}_{'pl' if c.subj.plural else 'sg'}"]
        return [neg, word] if neg else [word]
    if fam.morphology == "suffixing":
        return [stem + neg + tense + agr]
    if fam.morphology == "prefixing":
        return [agr + neg + tense + stem]
    particles = [w for w in (tense, neg) if w]
    return [stem] + particles if fam.adposition == "post" else particles + [stem]


def realise(lang: Language, c: Clause) -> str:
    """Sentence in ``lang``'s word order, morphology and script."""
    parts = {"S": _noun_phrase(lang, c.subj, "subj"), "V": _verb(lang, c), "O": _noun_phrase(lang, c.obj, "obj")}
    order = list(lang.family.order)
    words: list[str] = []
    for slot in order:
        if c.pp and slot == "V" and lang.family.pp_slot == "before_verb":
            words += _noun_phrase(lang, c.pp[1], f"P_{c.pp[0]}")
        words += parts[slot]
    if c.pp and lang.family.pp_slot != "before_verb":
        pp = _noun_phrase(lang, c.pp[1], f"P_{c.pp[0]}")
        words = pp + words if lang.family.pp_slot == "start" else words + pp
    script = lang.script
    text = (" " if script.spaces else "").join(lang.write_word(w) for w in words)
    if script.cased:
        text = text[0].upper() + text[1:]
    return text + script.full_stop


# --------------------------------------------------------------------------- corpus


def train_sizes(n_langs: int, min_size: int, max_size: int) -> list[int]:
    """Log-spaced sizes from ``min_size`` to ``max_size``."""
    if n_langs == 1:
        return [max_size]
    ratio = max_size / min_size
    return [round(min_size * ratio ** (k / (n_langs - 1))) for k in range(n_langs)]


def assign_sizes(langs: Sequence[Language], min_size: int, max_size: int) -> dict[str, int]:
    """Interleave families over the size ladder so each family spans the whole range."""
    member = {lang.code: int("abcdefgh".index(lang.code[2])) for lang in langs}
    family = {lang.code: lang.family.letter for lang in langs}
    ordered = sorted(langs, key=lambda lang: (member[lang.code], family[lang.code]))
    return dict(zip((lang.code for lang in ordered), train_sizes(len(langs), min_size, max_size)))


def generate_pairs(lang: Language, n: int, rng: random.Random, exclude: set[str]) -> Iterator[tuple[str, str]]:
    """``n`` (English, target) pairs whose English is not in ``exclude``."""
    made = 0
    while made < n:
        clause = sample_clause(rng)
        en = english(clause)
        if en in exclude or not 4 <= len(en.split()) <= 15:
            continue
        made += 1
        yield en, lang.translate(clause)


@dataclass(frozen=True)
class LangJob:
    """What to write for one language."""

    out: str
    """Corpus root."""
    seed: int
    """Corpus seed."""
    code: str
    """Language code."""
    train: int
    """Train pairs."""
    dev: int
    """Dev pairs."""
    test: int
    """Test pairs."""


def write_language(job: LangJob) -> str:
    """Write ``<out>/<code>-en/{train,dev,test}.{code,en}``; deterministic for (seed, code)."""
    lang = _languages(job.seed)[job.code]
    rng = random.Random(f"synthetic:{job.seed}:data:{job.code}")
    d = Path(job.out) / f"{job.code}-en"
    d.mkdir(parents=True, exist_ok=True)
    held_out: set[str] = set()  # English sentences of dev/test never appear in train
    for split, n in (("dev", job.dev), ("test", job.test), ("train", job.train)):
        if n == 0 and split == "test":
            continue
        with open(d / f"{split}.en", "w", encoding="utf-8", newline="\n") as fen, \
                open(d / f"{split}.{job.code}", "w", encoding="utf-8", newline="\n") as fxx:
            for en, xx in generate_pairs(lang, n, rng, held_out):
                fen.write(en + "\n")
                fxx.write(xx + "\n")
                if split != "train":
                    held_out.add(en)
    return job.code


@lru_cache(maxsize=4)
def _languages(seed: int) -> dict[str, Language]:
    return {lang.code: lang for lang in build_languages(seed)}


def generate_corpus(out: str | Path, seed: int = 0, min_size: int = 50, max_size: int = 50_000,
                    dev_size: int = 100, test_size: int = 100, langs: Sequence[str] | None = None,
                    sizes: dict[str, int] | None = None, workers: int = 1) -> list[dict]:
    """Write the corpus and ``langs.tsv``; returns the rows of ``langs.tsv``.

    ``langs.tsv`` is written last, so its presence means the corpus is complete.

    ``langs`` restricts to some codes; ``sizes`` overrides train sizes per code.
    """
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < --min-size <= --max-size, got {min_size} and {max_size}")
    all_langs = list(_languages(seed).values())
    chosen = [lang for lang in all_langs if langs is None or lang.code in langs]
    unknown = set(langs or ()) - {lang.code for lang in all_langs}
    if unknown:
        raise ValueError(f"unknown synthetic language code(s) {sorted(unknown)}; "
                         f"available: {[lang.code for lang in all_langs]}")
    size_of = assign_sizes(chosen, min_size, max_size) | (sizes or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "langs.tsv").unlink(missing_ok=True)  # written last: marks a complete corpus
    jobs = [LangJob(str(out), seed, lang.code, size_of[lang.code], dev_size, test_size) for lang in chosen]
    jobs.sort(key=lambda j: -j.train)  # biggest first balances the pool
    if workers > 1:
        from .binarize import worker_pool

        with worker_pool(workers) as pool:
            list(pool.imap_unordered(write_language, jobs))
    else:
        for job in jobs:
            write_language(job)
    rows = [{"code": lang.code, "family": lang.family.name, "script": lang.family.script.lower(),
             "word_order": lang.family.order, "morphology": lang.family.morphology,
             "train": size_of[lang.code], "dev": dev_size, "test": test_size} for lang in chosen]
    with open(out / "langs.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(rows[0]) + "\n")
        for r in rows:
            f.write("\t".join(str(v) for v in r.values()) + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="corpus root to write (plain layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=50, help="train pairs of the smallest language")
    ap.add_argument("--max-size", type=int, default=50_000, help="train pairs of the largest language")
    ap.add_argument("--dev-size", type=int, default=100)
    ap.add_argument("--test-size", type=int, default=100)
    ap.add_argument("--pairs", type=lambda s: [c for c in s.split(",") if c], help="subset of codes")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        rows = generate_corpus(args.out, args.seed, args.min_size, args.max_size, args.dev_size, args.test_size,
                               args.pairs, workers=args.workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} languages, {sum(r['train'] for r in rows)} train pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
