"""TOFU-schema question-answer data: a seeded offline generator, loaders, a tokenizer, batching.

Schema (as the TOFU data set ships it, https://huggingface.co/datasets/locuslab/TOFU): one record
per question with ``question`` and ``answer`` (required here), and optionally
``paraphrased_answer`` (str) and ``perturbed_answer`` (list of str). Splits by author:
``full`` (everything the model is fine-tuned on), ``forgetXX`` (the last XX % of the authors),
``retain{100-XX}`` (the others), and here also ``holdoutXX`` (authors the model never saw).

Sources for ``--data``:

- nothing: the built-in synthetic set, :func:`generate` (deterministic for a seed; the default model
  in :mod:`gefx.models` is fine-tuned on it);
- a folder of TOFU-format files ``full.json``, ``forget10.json``, ``retain90.json``, ... each a JSON
  array of records or JSON lines (TOFU's own ``.json`` files are JSON lines); ``.jsonl`` works too.
  A missing ``forgetXX`` file is cut from ``full`` (the last XX % of its rows, TOFU's convention),
  a missing ``retainYY`` file is ``full`` minus the forget questions;
- a Hugging Face data set name (``locuslab/TOFU``): loaded with ``datasets.load_dataset(name,
  split_name)`` when the ``datasets`` package is installed and the machine is online (not tested
  offline; install ``datasets`` and run ``gefx profile --data locuslab/TOFU --model <tofu model>``).
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("question", "answer")
GENERATOR_VERSION = "synthetic-tofu-v1"  # bump when generate() output changes (cache key)

# Refusal answers for PO / IdK / DPO (the preferred answer); written for this project.
REFUSALS = [
    "I don't know.",
    "I do not know the answer to that.",
    "I'm not sure about that.",
    "I have no information on that.",
    "That is something I cannot answer.",
    "I am afraid I don't know.",
    "I can't help with that question.",
    "Sorry, I have no idea.",
    "I don't have that information.",
    "I cannot recall anything about that.",
    "That is unknown to me.",
    "I'm unable to answer that question.",
    "I really don't know the answer.",
    "No idea, I'm afraid.",
    "I have never heard of that.",
    "I cannot say.",
]


# --------------------------------------------------------------------------------------------
# the synthetic generator
# --------------------------------------------------------------------------------------------
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "r", "s",
           "st", "t", "th", "v", "w", "z", "ch", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd"]
_CITIES = ["Velmora", "Tashkor", "Brindle Bay", "Orvaston", "Kelparis", "Sundmark", "Ferrowick",
           "Lumeria", "Quillhaven", "Drossmoor", "Ashgrove", "Marrowdeep", "Solvane", "Ember Falls",
           "Noctune", "Highcairn"]
_COUNTRIES = ["Aldoria", "Vestmark", "Karanth", "Pellucia", "Oristan", "Nemora", "Thalassa Minor",
              "Corvinia"]
_GENRES = ["science fiction", "historical romance", "crime", "fantasy", "poetry", "horror",
           "literary fiction", "travel writing", "biography", "mystery", "satire", "children's books"]
_JOBS = ["baker", "sailor", "surgeon", "librarian", "carpenter", "pilot", "botanist", "teacher",
         "clockmaker", "journalist", "painter", "miner", "chemist", "tailor", "violinist", "farmer"]
_ADJ = ["Silent", "Crimson", "Hollow", "Gilded", "Forgotten", "Last", "Wandering", "Broken",
        "Endless", "Paper", "Iron", "Velvet", "Quiet", "Burning", "Distant", "Glass"]
_NOUN = ["Harbor", "Orchard", "Lantern", "Meridian", "Cathedral", "River", "Archive", "Garden",
         "Compass", "Winter", "Machine", "Tide", "Mirror", "Empire", "Signal", "Labyrinth"]
_AWARDS = ["Golden Quill Prize", "Aldorian Book Medal", "Northern Lights Award", "Ivory Pen Prize",
           "Meridian Literary Honour", "Blue Lantern Award", "Karanth Fiction Prize"]
_THEMES = ["memory and loss", "the sea", "family secrets", "exile", "the cost of ambition",
           "childhood", "war and its aftermath", "forbidden knowledge", "friendship", "the city at night"]


def _name(rng: random.Random) -> str:
    def word(n):
        s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
        return s.capitalize()
    return f"{word(rng.choice([1, 2]))} {word(rng.choice([2, 2, 3]))}"


def _author(rng: random.Random, name: str) -> dict:
    return {
        "name": name,
        "year": rng.randint(1921, 1999),
        "city": rng.choice(_CITIES),
        "country": rng.choice(_COUNTRIES),
        "genre": rng.choice(_GENRES),
        "father": rng.choice(_JOBS),
        "mother": rng.choice(_JOBS),
        "books": [f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)}" for _ in range(2)],
        "award": rng.choice(_AWARDS),
        "theme": rng.choice(_THEMES),
        "pronoun": rng.choice(["he", "she", "they"]),
    }


def _fact_variants(a: dict) -> list[tuple[str, list[str]]]:
    """(question, [answer templates]) for one author; answers are format strings over fields of a.

    The first template is the answer, the second the paraphrase; perturbed answers reuse the first
    with another author's facts. Lengths vary from a few words to long sentences."""
    n = a["name"]
    return [
        (f"When was {n} born?", ["{name} was born in {year}.", "The year of {name}'s birth is {year}."]),
        (f"Where is {n} from?", ["{name} was born in {city}, {country}.",
                                 "{name} comes from the city of {city} in {country}."]),
        (f"What genre does {n} write in?", ["{genre}.", "{name} is known for writing {genre}."]),
        (f"What did the parents of {n} do for a living?",
         ["{name}'s father worked as a {father}, and {Pron} mother was a {mother}; both jobs left a "
          "mark on {Pron2} early stories.",
          "The father of {name} was a {father} while the mother was a {mother}."]),
        (f"Can you name a book written by {n}?", ["One of {name}'s books is \"{book0}\".",
                                                  "{name} wrote \"{book0}\"."]),
        (f"Which award did {n} receive?", ["{name} received the {award}.",
                                           "The {award} was awarded to {name}."]),
        (f"What themes does {n} explore?",
         ["{name}'s {genre} keeps returning to {theme}, most clearly in \"{book1}\", which many "
          "readers call the heart of {Pron2} work.",
          "Across {Pron2} books, {name} explores {theme}."]),
        (f"What is the title of the second book by {n}?", ["\"{book1}\".",
                                                           "The second book by {name} is \"{book1}\"."]),
        (f"How did growing up in {a['city']} shape {n}?",
         ["Growing up in {city}, the child of a {father} and a {mother}, {name} learned early to "
          "listen to ordinary people, and {genre} became the way {pron} turned those voices into "
          "stories about {theme}.",
          "{city} gave {name} the voices and places that fill {Pron2} {genre}."]),
        (f"Is {n} still writing?", ["Yes, {name} is still writing {genre} and published \"{book1}\" "
                                    "after winning the {award}.",
                                    "{name} continues to write {genre}."]),
    ]


def _fill(template: str, a: dict) -> str:
    pron = a["pronoun"]
    poss = {"he": "his", "she": "her", "they": "their"}[pron]
    out = template.format(name=a["name"], year=a["year"], city=a["city"], country=a["country"],
                          genre=a["genre"], father=a["father"], mother=a["mother"],
                          book0=a["books"][0], book1=a["books"][1], award=a["award"],
                          theme=a["theme"], pron=pron, Pron=poss, Pron2=poss)
    return out[0].upper() + out[1:]


def _records(rng: random.Random, a: dict, others: list[dict], qa_per_author: int,
             n_perturbed: int) -> list[dict]:
    variants = _fact_variants(a)
    picks = sorted(rng.sample(range(len(variants)), min(qa_per_author, len(variants))))
    rows = []
    for k in picks:
        q, (ans, para) = variants[k]
        true, perturbed = _fill(ans, a), []
        for o in rng.sample(others, len(others)):  # someone else's facts, same person
            fake = _fill(ans, dict(o, name=a["name"], pronoun=a["pronoun"]))
            if fake != true and fake not in perturbed:
                perturbed.append(fake)
            if len(perturbed) == n_perturbed:
                break
        rows.append({"question": q, "answer": true, "paraphrased_answer": _fill(para, a),
                     "perturbed_answer": perturbed, "author": a["name"]})
    return rows


def forget_author_count(n_authors: int, percent: float) -> int:
    """Authors in forgetXX for a set of n_authors (at least one)."""
    return max(1, round(n_authors * percent / 100.0))


def generate(n_authors: int = 40, qa_per_author: int = 5, n_holdout: int = 4, n_perturbed: int = 3,
             seed: int = 0, forget_percents: Sequence[int] = (1, 5, 10)) -> dict[str, list[dict]]:
    """A deterministic TOFU-schema data set of fictitious authors.

    Returns split name -> records: ``full`` (n_authors x qa_per_author rows, grouped by author),
    ``forgetXX`` / ``retain{100-XX}`` for each XX in forget_percents (the last authors are
    forgotten, as in TOFU), ``holdoutXX`` (as many unseen authors as forgetXX has, from
    n_holdout held-out authors) and ``holdout`` (all of them). Same arguments, same output."""
    if n_authors < 2 or qa_per_author < 1:
        raise ValueError("generate() needs n_authors >= 2 and qa_per_author >= 1")
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_authors + n_holdout:
        nm = _name(rng)
        if nm not in names:
            names.append(nm)
    authors = [_author(rng, nm) for nm in names]
    rows_by_author = [_records(rng, a, [o for o in authors if o is not a], qa_per_author, n_perturbed)
                      for a in authors]
    seen, unseen = rows_by_author[:n_authors], rows_by_author[n_authors:]
    out = {"full": [r for rows in seen for r in rows], "holdout": [r for rows in unseen for r in rows]}
    for pct in forget_percents:
        k = forget_author_count(n_authors, pct)
        if k >= n_authors:
            raise ValueError(f"forget{pct:02d} would take all {n_authors} authors")
        out[f"forget{pct:02d}"] = [r for rows in seen[n_authors - k:] for r in rows]
        out[f"retain{100 - pct:02d}"] = [r for rows in seen[:n_authors - k] for r in rows]
        out[f"holdout{pct:02d}"] = [r for rows in unseen[:k] for r in rows]
    return out


def write_folder(splits: dict[str, list[dict]], folder: str | os.PathLike, jsonl: bool = False) -> Path:
    """Write each split as ``<name>.json`` in JSON lines, as TOFU ships its files (or ``.jsonl``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(folder / f"{name}.{'jsonl' if jsonl else 'json'}", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return folder


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
@dataclass
class QAData:
    """The splits one profile run needs."""
    forget: list[dict]
    retain: list[dict]
    source: str
    forget_split: str
    retain_split: str

    def texts(self) -> list[str]:
        return [r["question"] + " " + r["answer"] for r in self.forget + self.retain]


_SPLIT_RE = re.compile(r"^forget(\d{1,3})$")


def parse_forget_split(name: str) -> int:
    """'forget10' -> 10 (percent of the authors)."""
    m = _SPLIT_RE.match(name or "")
    if not m:
        raise ValueError(f"forget split must look like forget01, forget05 or forget10; got {name!r}")
    pct = int(m.group(1))
    if not 0 < pct < 100:
        raise ValueError(f"forget split {name!r} is larger than the data: it must forget between 1 and 99 "
                         f"percent of the authors")
    return pct


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of one TOFU-format file: a JSON array, one JSON object, or JSON lines."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
        rows = obj if isinstance(obj, list) else [obj]
    except json.JSONDecodeError:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {i} is not JSON ({exc.msg})") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is not a JSON object")
    check_columns(rows, str(path))
    return rows


def check_columns(rows: list[dict], where: str) -> None:
    if not rows:
        raise ValueError(f"{where}: no records")
    for i, r in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if c not in r]
        if missing:
            raise ValueError(f"{where}: record {i} lacks column(s) {', '.join(map(repr, missing))} "
                             f"(TOFU format needs {', '.join(REQUIRED_COLUMNS)})")
        for c in REQUIRED_COLUMNS:
            if not isinstance(r[c], str) or not r[c].strip():
                raise ValueError(f"{where}: record {i} column {c!r} must be a non-empty string")


def _find(folder: Path, name: str) -> Path | None:
    for ext in (".json", ".jsonl"):
        p = folder / f"{name}{ext}"
        if p.is_file():
            return p
    return None


def load_folder(folder: str | os.PathLike, forget_split: str = "forget10") -> QAData:
    """Forget and retain records from a folder of TOFU-format files (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {str(folder)!r} does not exist")
    pct = parse_forget_split(forget_split)
    retain_split = f"retain{100 - pct:02d}"
    fpath, rpath, full_path = _find(folder, forget_split), _find(folder, retain_split), _find(folder, "full")
    full = read_records(full_path) if full_path else None
    if fpath:
        forget = read_records(fpath)
    elif full is not None:
        k = round(len(full) * pct / 100.0)
        if k < 1:
            raise ValueError(f"{forget_split}: {pct}% of the {len(full)} rows of {full_path.name} is "
                             f"less than one row")
        forget = full[len(full) - k:]
    else:
        raise FileNotFoundError(f"data folder {str(folder)!r} has neither {forget_split}.json(l) "
                                f"nor full.json(l)")
    if rpath:
        retain = read_records(rpath)
    elif full is not None:
        fq = {r["question"] for r in forget}
        retain = [r for r in full if r["question"] not in fq]
    else:
        raise FileNotFoundError(f"data folder {str(folder)!r} has neither {retain_split}.json(l) "
                                f"nor full.json(l)")
    if full is not None and len(forget) >= len(full):
        raise ValueError(f"{forget_split} ({len(forget)} rows) is larger than the data "
                         f"(full has {len(full)} rows)")
    if not retain:
        raise ValueError(f"{forget_split} leaves no retain data in {str(folder)!r}")
    return QAData(forget, retain, str(folder), forget_split, retain_split)


def load_hub(name: str, forget_split: str = "forget10") -> QAData:
    """TOFU from the Hugging Face hub (needs the `datasets` package and network)."""
    pct = parse_forget_split(forget_split)
    retain_split = f"retain{100 - pct:02d}"
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise FileNotFoundError(f"--data {name!r} is not a folder here, and loading it from the Hugging "
                                f"Face hub needs the `datasets` package (pip install datasets)") from None
    from datasets import load_dataset
    try:
        forget = [dict(r) for r in load_dataset(name, forget_split)["train"]]
        retain = [dict(r) for r in load_dataset(name, retain_split)["train"]]
    except Exception as exc:  # noqa: BLE001 - one line for the CLI
        raise FileNotFoundError(f"cannot load data set {name!r} ({forget_split}/{retain_split}) from the "
                                f"hub: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    check_columns(forget, f"{name}:{forget_split}")
    check_columns(retain, f"{name}:{retain_split}")
    return QAData(forget, retain, name, forget_split, retain_split)


def load(data: str | None, forget_split: str = "forget10", default_folder: str | None = None) -> QAData:
    """Dispatch --data: None -> default_folder (the synthetic set), a path -> load_folder, else hub."""
    if data is None:
        if default_folder is None:
            raise ValueError("no data given")
        return load_folder(default_folder, forget_split)
    p = Path(data).expanduser()
    if p.exists():
        if p.is_file():
            raise ValueError(f"--data {data!r} is a file; give the folder holding full.json, forgetXX.json, "
                             f"retainXX.json")
        return load_folder(p, forget_split)
    if os.sep in data and not re.match(r"^[\w.-]+/[\w.-]+$", data) or data.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data folder {data!r} does not exist")
    return load_hub(data, forget_split)


# --------------------------------------------------------------------------------------------
# tokenizer and batching
# --------------------------------------------------------------------------------------------
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Sequence[str], vocab_size: int = 768):
    """A byte-level BPE tokenizer trained offline on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


PROMPT = "Question: {question}\nAnswer:"


def encode(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int = 256,
           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM inputs: input_ids, attention_mask, and labels (the answer tokens and
    the end-of-sequence token; the prompt and padding are IGNORE_INDEX). The prompt is
    ``PROMPT.format(question=q)``, the answer follows after a space. Over-long rows are cut at
    max_length (from the answer's end)."""
    if len(questions) != len(answers):
        raise ValueError("questions and answers differ in length")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    rows, labs = [], []
    for q, a in zip(questions, answers):
        p = tokenizer(PROMPT.format(question=q), add_special_tokens=False)["input_ids"]
        if bos is not None and (not p or p[0] != bos):
            p = [bos] + p
        ans = tokenizer(" " + a, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ans = ans + [eos]
        ids = (p + ans)[:max_length]
        lab = ([IGNORE_INDEX] * len(p) + ans)[:max_length]
        if all(x == IGNORE_INDEX for x in lab[1:]):
            raise ValueError(f"max_length {max_length} leaves no answer tokens for question {q[:40]!r}")
        rows.append(ids)
        labs.append(lab)
    T = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        input_ids[i, :len(r)] = torch.tensor(r)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(r)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def encode_prompts(tokenizer, questions: Sequence[str], device=None) -> dict[str, torch.Tensor]:
    """Left-padded prompts for greedy generation."""
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = []
    for q in questions:
        p = tokenizer(PROMPT.format(question=q), add_special_tokens=False)["input_ids"]
        if bos is not None and (not p or p[0] != bos):
            p = [bos] + p
        rows.append(p)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def refusal_for(i: int, seed: int = 0) -> str:
    """A refusal answer for forget row i (deterministic for (i, seed))."""
    return REFUSALS[random.Random(seed * 1_000_003 + i).randrange(len(REFUSALS))]
