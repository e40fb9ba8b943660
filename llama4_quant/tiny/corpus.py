"""Deterministic, English-like demo text for tests, fixtures and demos.

The text comes from a small probabilistic grammar over a few hundred words: stories that keep
coming back to the same named people and objects, subject-verb agreement, correct arithmetic
facts ("7 plus 5 is 12."), counting sequences, shopping lists, question/answer and two-person
dialog turns, headings, dates, prices and long numbers. About one paragraph in fifty carries rarer
material (accented words, other scripts, an emoji, unusual punctuation, indentation, a code line).

A tiny language model learns most of this structure within a few hundred steps, so its perplexity
falls far below uniform and quantization damage is measurable. Nothing is downloaded.

Only ``random.Random.random()`` is drawn from (never ``choice``/``randrange``), because that is the
one stream Python promises to keep stable across versions: the same seed gives the same text.
"""

from __future__ import annotations

import functools
import hashlib
import random


# Characters per split returned by corpus_splits().
SPLIT_SIZES: dict[str, int] = {"train": 1_500_000, "calib": 100_000, "test": 60_000}

# ---------------------------------------------------------------------------------------------
# Word lists

_NAMES = (
    "Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara",
    "Uma", "Victor", "Wren", "Yara", "Zoe", "Arjun", "Beatriz", "Colin", "Dmitri", "Esme",
    "Felix", "Hana", "Ivo", "Lena", "Marco", "Nadia", "Oskar", "Pia", "Ruth", "Teo",
)
_RARE_NAMES = ("José", "Zoë", "Søren", "Ana-María", "Łukasz", "Chloé", "Björn", "Renée")

_CITIES = (
    "Paris", "Lisbon", "Oslo", "Kyoto", "Lagos", "Lima", "Cairo", "Quito", "Dublin", "Perth",
    "Nairobi", "Seoul", "Madrid", "Vienna", "Boston", "Hanoi",
)
_RARE_CITIES = ("Zürich", "São Paulo", "Kraków", "Reykjavík", "東京", "Москва", "Αθήνα", "北京")

_PLACES = (
    "kitchen", "garden", "library", "market", "station", "school", "harbor", "forest",
    "village", "museum", "bakery", "office", "park", "hall", "attic", "cellar",
)
_ON_PLACES = ("table", "shelf", "bench", "desk", "roof", "floor", "bridge", "wall")

# (singular, plural)
_ANIMALS = (
    ("cat", "cats"), ("dog", "dogs"), ("fox", "foxes"), ("mouse", "mice"), ("horse", "horses"),
    ("bird", "birds"), ("rabbit", "rabbits"), ("goat", "goats"), ("owl", "owls"), ("sheep", "sheep"),
    ("duck", "ducks"), ("wolf", "wolves"),
)
_OBJECTS = (
    ("box", "boxes"), ("book", "books"), ("apple", "apples"), ("key", "keys"), ("lamp", "lamps"),
    ("cup", "cups"), ("letter", "letters"), ("map", "maps"), ("chair", "chairs"), ("clock", "clocks"),
    ("coat", "coats"), ("basket", "baskets"), ("kite", "kites"), ("bottle", "bottles"),
    ("candle", "candles"), ("ring", "rings"), ("hat", "hats"), ("pen", "pens"), ("egg", "eggs"),
    ("orange", "oranges"), ("umbrella", "umbrellas"), ("radio", "radios"), ("bell", "bells"),
    ("loaf", "loaves"),
)
_PEOPLE_NOUNS = (
    ("teacher", "teachers"), ("farmer", "farmers"), ("baker", "bakers"), ("doctor", "doctors"),
    ("child", "children"), ("sailor", "sailors"), ("painter", "painters"), ("guard", "guards"),
)
_ADJECTIVES = (
    "red", "blue", "green", "yellow", "small", "large", "old", "new", "quiet", "bright",
    "heavy", "light", "warm", "cold", "round", "tall", "soft", "broken", "shiny", "wooden",
    "empty", "full", "little", "famous", "strange", "clean",
)
_FEELINGS = ("happy", "tired", "hungry", "busy", "calm", "curious", "late", "ready", "sad", "proud")

# (base, third person singular, past)
_TRANSITIVE = (
    ("see", "sees", "saw"), ("find", "finds", "found"), ("carry", "carries", "carried"),
    ("paint", "paints", "painted"), ("open", "opens", "opened"), ("like", "likes", "liked"),
    ("want", "wants", "wanted"), ("bring", "brings", "brought"), ("watch", "watches", "watched"),
    ("buy", "buys", "bought"), ("clean", "cleans", "cleaned"), ("hold", "holds", "held"),
    ("lose", "loses", "lost"), ("sell", "sells", "sold"), ("fix", "fixes", "fixed"),
    ("draw", "draws", "drew"), ("keep", "keeps", "kept"), ("move", "moves", "moved"),
)
_INTRANSITIVE = (
    ("sleep", "sleeps", "slept"), ("run", "runs", "ran"), ("sing", "sings", "sang"),
    ("wait", "waits", "waited"), ("laugh", "laughs", "laughed"), ("walk", "walks", "walked"),
    ("swim", "swims", "swam"), ("dance", "dances", "danced"), ("rest", "rests", "rested"),
    ("work", "works", "worked"),
)
_ADVERBS = ("quickly", "slowly", "quietly", "carefully", "happily", "loudly", "again", "together")
_TIME_PAST = ("Yesterday", "Last week", "This morning", "Long ago", "Once", "Last night", "In the spring")
_TIME_PRESENT = ("Every day", "Today", "Now", "Every morning", "Often", "On Sundays", "Usually")

_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_RARE_WORDS = (
    "café", "naïve", "résumé", "façade", "jalapeño", "über", "fiancée", "crème brûlée",
    "smörgåsbord", "piñata", "déjà vu", "Ångström",
)
_RARE_SNIPPETS = (
    "🙂", "→", "…", "—", "«bonjour»", "№ 7", "½", "±3", "°C", "™", "©", "µm", "€",
    "こんにちは", "你好", "שלום", "مرحبا", "привет", "ñ", "∑", "≈",
)


class _Gen:
    """One generator state: an RNG drawing only random(), plus helpers."""

    __slots__ = ("r",)

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed).random

    # -- primitives (all built on random()) --------------------------------------------------
    def pick(self, seq):
        return seq[int(self.r() * len(seq))]

    def int_in(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return lo + int(self.r() * (hi - lo + 1))

    def chance(self, p: float) -> bool:
        return self.r() < p

    # -- noun phrases ------------------------------------------------------------------------
    @staticmethod
    def article(word: str) -> str:
        return "an" if word[0] in "aeiou" else "a"

    def thing(self, pool=_OBJECTS):
        """(noun phrase with article, definite form, plural?) for an object or animal."""
        sg, pl = self.pick(pool)
        adj = self.pick(_ADJECTIVES) if self.chance(0.6) else ""
        plural = self.chance(0.3)
        head = f"{adj} {pl if plural else sg}".strip()
        if plural:
            n = self.int_in(2, 9)
            indef = f"{self.number_text(n)} {head}" if self.chance(0.7) else f"some {head}"
        else:
            indef = f"{self.article(head)} {head}"
        return indef, f"the {head}", plural

    def number_text(self, n: int) -> str:
        return _NUMBER_WORDS[n] if n <= 20 and self.chance(0.5) else str(n)

    def subject(self):
        """(text, third-person-singular?) for a sentence subject."""
        x = self.r()
        if x < 0.4:
            return self.name(), True
        if x < 0.7:
            sg, pl = self.pick(_ANIMALS if self.chance(0.5) else _PEOPLE_NOUNS)
            adj = self.pick(_ADJECTIVES) + " " if self.chance(0.4) else ""
            if self.chance(0.6):
                return f"The {adj}{sg}", True
            return f"The {adj}{pl}", False
        pron = self.pick(("I", "You", "We", "They", "He", "She", "It"))
        return pron, pron in ("He", "She", "It")

    def name(self) -> str:
        return self.pick(_RARE_NAMES) if self.chance(0.01) else self.pick(_NAMES)

    def location(self) -> str:
        x = self.r()
        if x < 0.45:
            return f"in the {self.pick(_PLACES)}"
        if x < 0.7:
            return f"on the {self.pick(_ON_PLACES)}"
        if x < 0.9:
            return f"near the {self.pick(_PLACES)}"
        return f"in {self.city()}"

    def city(self) -> str:
        return self.pick(_RARE_CITIES) if self.chance(0.03) else self.pick(_CITIES)

    # -- sentences ---------------------------------------------------------------------------
    def simple_sentence(self) -> str:
        subj, sing = self.subject()
        tense = self.r()
        if tense < 0.5:
            prefix = f"{self.pick(_TIME_PRESENT)}, " if self.chance(0.2) else ""
            verb_i = 1 if sing else 0
        else:
            prefix = f"{self.pick(_TIME_PAST)}, " if self.chance(0.3) else ""
            verb_i = 2
        if prefix and subj.split()[0] in ("The", "You", "We", "They", "He", "She", "It"):
            subj = subj[0].lower() + subj[1:]
        kind = self.r()
        if kind < 0.55:
            verb = self.pick(_TRANSITIVE)[verb_i]
            obj, _, _ = self.thing(_OBJECTS if self.chance(0.7) else _ANIMALS)
            tail = f" {self.location()}" if self.chance(0.5) else ""
            body = f"{subj} {verb} {obj}{tail}"
        elif kind < 0.8:
            verb = self.pick(_INTRANSITIVE)[verb_i]
            adv = f" {self.pick(_ADVERBS)}" if self.chance(0.5) else ""
            tail = f" {self.location()}" if self.chance(0.5) else ""
            body = f"{subj} {verb}{adv}{tail}"
        else:
            if verb_i == 2:
                be = "was" if (sing or subj == "I") else "were"
            elif subj == "I":
                be = "am"
            else:
                be = "is" if sing else "are"
            body = f"{subj} {be} {self.pick(_FEELINGS)}"
        s = prefix + body + "."
        return s[0].upper() + s[1:]

    def arithmetic_fact(self, words: bool | None = None) -> str:
        a, b, op = self._arith()
        if words is None:
            words = self.chance(0.15)
        if words and max(a, b, op[1]) <= 20:
            fa, fb, fc = _NUMBER_WORDS[a], _NUMBER_WORDS[b], _NUMBER_WORDS[op[1]]
        else:
            fa, fb, fc = str(a), str(b), str(op[1])
        s = f"{fa} {op[0]} {fb} is {fc}."
        return s[0].upper() + s[1:]

    def _arith(self):
        x = self.r()
        if x < 0.4:
            a, b = self.int_in(0, 20), self.int_in(0, 20)
            return a, b, ("plus", a + b)
        if x < 0.65:
            a = self.int_in(0, 30)
            b = self.int_in(0, a)
            return a, b, ("minus", a - b)
        if x < 0.9:
            a, b = self.int_in(1, 12), self.int_in(1, 12)
            return a, b, ("times", a * b)
        b = self.int_in(1, 10)
        c = self.int_in(1, 10)
        return b * c, b, ("divided by", c)

    def counting(self) -> str:
        step = self.pick((1, 1, 1, 2, 3, 5, 10))
        start = self.int_in(0, 20) * (step if step > 1 else 1)
        n = self.int_in(4, 9)
        seq = [start + i * step for i in range(n)]
        if step == 1 and seq[-1] <= 20 and self.chance(0.4):
            items = [_NUMBER_WORDS[v] for v in seq]
            return ", ".join(items) + "."
        lead = self.pick(("Count: ", "Counting by {}: ".format(step), "", "Sequence: "))
        return lead + ", ".join(str(v) for v in seq) + "."

    # -- paragraphs --------------------------------------------------------------------------
    def story(self) -> str:
        a, b = self.name(), self.name()
        while b == a:
            b = self.name()
        adj = self.pick(_ADJECTIVES)
        sg, _pl = self.pick(_OBJECTS)
        obj = f"{adj} {sg}"
        place = self.pick(_PLACES)
        city = self.city()
        lines = [f"{a} lives in {city} and has {self.article(obj)} {obj}."]
        if self.chance(0.5):
            lines.append(f"{a} keeps the {obj} in the {place}.")
        met_b = False
        for _ in range(self.int_in(1, 4)):
            x = self.r()
            met_b = met_b or x < 0.7
            if x < 0.2:
                lines.append(f"One day, {b} visits {a} in {city}.")
            elif x < 0.4:
                lines.append(f"{b} asks {a} about the {obj}.")
            elif x < 0.55:
                lines.append(f"{a} gives the {obj} to {b}.")
            elif x < 0.7:
                lines.append(f'{b} says: "Thank you, {a}!"')
            elif x < 0.8:
                lines.append(f"The {obj} is {self.pick(('old', 'heavy', 'new', 'lovely', 'useful'))}.")
            else:
                lines.append(self.simple_sentence())
        if met_b and self.chance(0.6):
            lines.append(f"In the end, {b} has the {obj} and {a} is {self.pick(_FEELINGS)}.")
        return " ".join(lines)

    def prose(self) -> str:
        return " ".join(self.simple_sentence() for _ in range(self.int_in(2, 6)))

    def math_paragraph(self) -> str:
        return " ".join(self.arithmetic_fact() for _ in range(self.int_in(2, 6)))

    def qa(self) -> str:
        out = []
        for _ in range(self.int_in(1, 3)):
            x = self.r()
            if x < 0.6:
                a, b, (op, c) = self._arith()
                out.append(f"Q: What is {a} {op} {b}?\nA: {a} {op} {b} is {c}.")
            elif x < 0.8:
                n = self.name()
                city = self.city()
                out.append(f"Q: Where does {n} live?\nA: {n} lives in {city}.")
            else:
                sg, pl = self.pick(_ANIMALS)
                k = self.int_in(2, 9)
                legs = k * (2 if sg in ("bird", "owl", "duck") else 4)
                out.append(f"Q: How many legs do {k} {pl} have?\nA: {k} {pl} have {legs} legs.")
        return "\n".join(out)

    def dialog(self) -> str:
        a, b = self.name(), self.name()
        while b == a:
            b = self.name()
        adj, (sg, _pl) = self.pick(_ADJECTIVES), self.pick(_OBJECTS)
        place = self.pick(_PLACES)
        turns = [
            f"{a}: Hello, {b}. Where is the {adj} {sg}?",
            f"{b}: The {adj} {sg} is in the {place}.",
        ]
        if self.chance(0.6):
            turns.append(f"{a}: Can you bring it to me?")
            turns.append(f"{b}: Yes, I will bring the {adj} {sg} {self.pick(('now', 'soon', 'later', 'tomorrow'))}.")
        if self.chance(0.5):
            x, y = self.int_in(2, 9), self.int_in(2, 9)
            turns.append(f"{a}: What is {x} times {y}?")
            turns.append(f"{b}: It is {x * y}.")
        turns.append(f"{a}: Thank you, {b}!")
        return "\n".join(turns)

    def shopping_list(self) -> str:
        n = self.name()
        head = self.pick((f"{n}'s shopping list:", "Shopping list:", f"Things {n} needs:", "To buy:"))
        items = []
        used = set()
        for _ in range(self.int_in(2, 6)):
            sg, pl = self.pick(_OBJECTS)
            if sg in used:
                continue
            used.add(sg)
            k = self.int_in(1, 12)
            items.append(f"- {k} {sg if k == 1 else pl}")
        total = self.int_in(1, 99)
        cents = self.int_in(0, 99)
        tail = f"\nTotal: ${total}.{cents:02d}" if self.chance(0.5) else ""
        return head + "\n" + "\n".join(items) + tail

    def facts(self) -> str:
        n = self.name()
        age = self.int_in(5, 90)
        # The stories are set in 2030, so age and birth year always agree.
        out = [f"{n} is {age} years old.", f"{n} was born in {2030 - age}."]
        if self.chance(0.5):
            out.append(f"{n} lives in {self.city()}.")
        if self.chance(0.4):
            other = self.name()
            while other == n:
                other = self.name()
            when = f"{self.pick(_DAYS)}, {self.int_in(1, 28)} {self.pick(_MONTHS)}"
            out.append(f"On {when}, {n} met {other} at {self.int_in(1, 12)}:{self.pick(('00', '15', '30', '45'))}.")
        if self.chance(0.4):
            big = self.int_in(1000, 99_999_999)
            out.append(f"The {self.pick(_PLACES)} has {big} {self.pick(_OBJECTS)[1]}.")
        return " ".join(out)

    def heading(self) -> str:
        adj, (sg, _pl) = self.pick(_ADJECTIVES), self.pick(_OBJECTS)
        return f"## Chapter {self.int_in(1, 40)}: The {adj.capitalize()} {sg.capitalize()}"

    def rare(self) -> str:
        x = self.r()
        if x < 0.3:
            w = self.pick(_RARE_WORDS)
            return f"{self.name()} ordered a {w} in {self.pick(_RARE_CITIES)} {self.pick(_RARE_SNIPPETS)}"
        if x < 0.5:
            a, b = self.int_in(1, 9), self.int_in(1, 9)
            return f"    x = {a} * {b}  # {a * b}\n    y = x / {a}\t# {b}.0"
        if x < 0.7:
            c = self.int_in(-20, 40)
            f = round(c * 9 / 5 + 32)
            return f"Note; the temperature was {c} °C (about {f} °F) — {self.pick(_RARE_SNIPPETS)}"
        if x < 0.85:
            return "  ".join(self.pick(_RARE_SNIPPETS) for _ in range(self.int_in(2, 5)))
        return f"{self.name()} wrote: «{self.simple_sentence()}» … {self.pick(_RARE_SNIPPETS)}"

    def paragraph(self) -> str:
        x = self.r()
        if x < 0.22:
            return self.story()
        if x < 0.40:
            return self.prose()
        if x < 0.52:
            return self.math_paragraph()
        if x < 0.62:
            return self.qa()
        if x < 0.72:
            return self.dialog()
        if x < 0.78:
            return self.counting()
        if x < 0.85:
            return self.shopping_list()
        if x < 0.94:
            return self.facts()
        if x < 0.98:
            return self.heading()
        return self.rare()


def generate_corpus(n_chars: int, seed: int = 0) -> str:
    """Return exactly ``n_chars`` characters of grammar-generated text; same seed, same text."""
    if n_chars < 0:
        raise ValueError(f"n_chars must be >= 0, got {n_chars}")
    g = _Gen(seed)
    parts: list[str] = []
    total = 0
    while total < n_chars:
        p = g.paragraph()
        parts.append(p)
        total += len(p) + 2
    return "\n\n".join(parts)[:n_chars]


def _split_seed(split: str, seed: int) -> int:
    # the seed string names the module where the corpus was first defined; kept so the corpus stays identical
    digest = hashlib.sha256(f"llama4_quant.testing.corpus/{split}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@functools.lru_cache(maxsize=4)
def _splits(seed: int) -> tuple[tuple[str, str], ...]:
    return tuple((name, generate_corpus(n, _split_seed(name, seed))) for name, n in SPLIT_SIZES.items())


def corpus_splits(seed: int = 0) -> dict[str, str]:
    """``{"train": ~1.5 MB, "calib": ~100 KB, "test": ~60 KB}``, each from its own derived seed."""
    return dict(_splits(seed))
