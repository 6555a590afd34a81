"""Models for ``gefx profile``: the offline default and any Hugging Face causal LM.

The default is a tiny Llama-architecture model built from a config (eager attention), with a
tokenizer trained on the synthetic TOFU-style set of :mod:`gefx.data`, fine-tuned on the full set
until the forget10 answers are memorised (teacher-forced greedy token accuracy >= 0.99), and
cached on disk under ``$GEFX_CACHE`` (default ``~/.cache/gefx``) in a folder keyed by a hash of
the generator, the config and the training recipe, so only the first run pays for it. The cache
folder holds ``model/`` (``save_pretrained`` model and tokenizer), ``data/`` (the synthetic splits
as TOFU-format JSON files) and ``meta.json`` (how the fine-tuning went).

``load_model(name_or_path)`` loads anything ``AutoModelForCausalLM`` / ``AutoTokenizer`` can.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import data as gdata

MODEL_VERSION = "tiny-llama-v1"
DEFAULT_DATA = dict(n_authors=40, qa_per_author=5, n_holdout=4, n_perturbed=3, seed=0)
DEFAULT_CONFIG = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, rope_theta=10000.0)
DEFAULT_TRAIN = dict(lr=4e-3, batch_size=16, max_epochs=150, target_accuracy=0.99, weight_decay=0.0,
                     seed=0, vocab_size=768)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def cache_root() -> Path:
    return Path(os.environ.get("GEFX_CACHE") or Path.home() / ".cache" / "gefx").expanduser()


def default_key() -> str:
    blob = json.dumps([gdata.GENERATOR_VERSION, MODEL_VERSION, DEFAULT_DATA, DEFAULT_CONFIG, DEFAULT_TRAIN],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_dir() -> Path:
    return cache_root() / f"default-{default_key()}"


# --------------------------------------------------------------------------------------------
def tiny_llama(vocab_size: int, tokenizer=None, **overrides):
    """An untrained Llama-architecture causal LM built from DEFAULT_CONFIG (eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(DEFAULT_CONFIG, **overrides)
    special = {}
    if tokenizer is not None:
        special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(vocab_size=vocab_size, attn_implementation="eager", **special, **cfg)
    return LlamaForCausalLM(config)


@torch.no_grad()
def answer_accuracy(model, batch: dict[str, torch.Tensor], chunk: int = 64) -> float:
    """Teacher-forced greedy token accuracy over the answer tokens (1.0 = every answer token is the
    model's argmax prediction, i.e. greedy decoding reproduces the answers)."""
    hits = total = 0
    n = batch["input_ids"].shape[0]
    for s in range(0, n, chunk):
        b = {k: v[s:s + chunk] for k, v in batch.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        lab = b["labels"][:, 1:]
        m = lab != gdata.IGNORE_INDEX
        hits += ((logits.argmax(-1) == lab) & m).sum().item()
        total += m.sum().item()
    return hits / max(total, 1)


def finetune(model, tokenizer, rows: list[dict], check_rows: list[dict], *, lr: float, batch_size: int,
             max_epochs: int, target_accuracy: float, weight_decay: float = 0.0, seed: int = 0,
             progress: bool = True, device="cpu") -> dict:
    """Fine-tune on rows (AdamW, cosine-free constant LR after a short warm-up) until the
    teacher-forced answer accuracy on check_rows reaches target_accuracy or max_epochs pass."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    enc = gdata.encode(tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], device=device)
    chk = gdata.encode(tokenizer, [r["question"] for r in check_rows], [r["answer"] for r in check_rows],
                       device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = enc["input_ids"].shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    warm = steps_per_epoch * 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    acc, epoch, t0 = 0.0, 0, time.time()
    bar = tqdm(total=max_epochs, desc="fine-tuning the default model (once)", disable=not progress,
               leave=False, unit="epoch")
    for epoch in range(1, max_epochs + 1):
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            b = {k: v[idx] for k, v in enc.items()}
            T = int(b["attention_mask"].sum(1).max())
            out = model(input_ids=b["input_ids"][:, :T], attention_mask=b["attention_mask"][:, :T],
                        labels=b["labels"][:, :T])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        bar.update(1)
        if epoch % 5 == 0 or epoch == max_epochs:
            model.eval()
            acc = answer_accuracy(model, chk)
            model.train()
            bar.set_postfix(loss=f"{out.loss.item():.3f}", forget_acc=f"{acc:.3f}")
            if acc >= target_accuracy:
                break
    bar.close()
    model.eval()
    return {"epochs": epoch, "forget_answer_accuracy": acc, "final_loss": float(out.loss.item()),
            "seconds": round(time.time() - t0, 1)}


def build_default(folder: Path, progress: bool = True) -> dict:
    """Generate data, train the tokenizer, fine-tune the tiny model, save everything in folder."""
    splits = gdata.generate(**DEFAULT_DATA)
    texts = []
    for rows in splits.values():
        for r in rows:
            texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    texts += gdata.REFUSALS + [gdata.PROMPT.format(question="")]
    tokenizer = gdata.train_tokenizer(texts, vocab_size=DEFAULT_TRAIN["vocab_size"])
    torch.manual_seed(DEFAULT_TRAIN["seed"])
    model = tiny_llama(len(tokenizer), tokenizer)
    tr = {k: v for k, v in DEFAULT_TRAIN.items() if k != "vocab_size"}
    meta = finetune(model, tokenizer, splits["full"], splits["forget10"], progress=progress, **tr)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    gdata.write_folder(splits, folder / "data")
    meta.update(key=default_key(), data=DEFAULT_DATA, config=DEFAULT_CONFIG, train=DEFAULT_TRAIN,
                torch=torch.__version__)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def ensure_default(progress: bool = True) -> Path:
    """The cache folder of the default model, building it on first use (atomic rename)."""
    final = default_dir()
    if (final / "meta.json").is_file():
        return final
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    except OSError as exc:
        raise PermissionError(f"cannot write the model cache {str(root)!r} ({exc.strerror}); set GEFX_CACHE "
                              f"to a writable folder") from None
    try:
        build_default(tmp, progress=progress)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # someone else won the race if it exists
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_model(device="cpu", dtype: torch.dtype = torch.float32, progress: bool = True):
    """(model, tokenizer, data_folder, meta) of the default, fine-tuned once and cached."""
    folder = ensure_default(progress=progress)
    model, tok = load_model(str(folder / "model"), device=device, dtype=dtype)
    return model, tok, folder / "data", json.loads((folder / "meta.json").read_text())


def load_model(name_or_path: str, device="cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = "eager"):
    """(model, tokenizer) through AutoModelForCausalLM / AutoTokenizer; one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def first_line(exc):
        s = str(exc).strip()
        return s.splitlines()[0] if s else type(exc).__name__

    p = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) and not p.exists():
        raise FileNotFoundError(f"--model {name_or_path!r}: no such folder")
    try:
        config = AutoConfig.from_pretrained(str(p) if p.exists() else name_or_path)
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(f"--model {name_or_path!r}: cannot load a config ({first_line(exc)})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--model {name_or_path!r} is a {type(config).__name__} ({config.model_type!r}), "
                         f"which has no causal LM head in transformers")
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p) if p.exists() else name_or_path, **kw)
    except (ValueError, TypeError) as exc:
        if "attn_implementation" in kw and "attn" in str(exc).lower():
            kw.pop("attn_implementation")
            model = AutoModelForCausalLM.from_pretrained(str(p) if p.exists() else name_or_path, **kw)
        else:
            raise ValueError(f"--model {name_or_path!r}: {first_line(exc)}") from None
    except OSError as exc:
        raise FileNotFoundError(f"--model {name_or_path!r}: {first_line(exc)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else name_or_path)
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(f"--model {name_or_path!r}: cannot load its tokenizer ({first_line(exc)})") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"--model {name_or_path!r}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    return model, tok


def frozen_copy(model):
    """The frozen reference model theta_o (a deep copy, eval mode, no gradients)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
