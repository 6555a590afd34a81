"""Run the README's open-unlearning recipe against a checkout of the real open-unlearning (issue 25):
its src/ copied to a temporary folder, the README's lines appended to src/trainer/__init__.py as
written, every trainer of its registry built by name and trained 2 steps on a tiny Llama with
gefx_every=1, against the unmeasured trainer from the same seed. Needs open-unlearning's own
dependencies (transformers 4.45 as it pins, accelerate, deepspeed, datasets, omegaconf).

    python bench/open_unlearning_check.py /path/to/open-unlearning   # -> bench/out/open_unlearning.json
"""
import copy, json, re, shutil, sys, tempfile, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
checkout = Path(sys.argv[1])
tmp = Path(tempfile.mkdtemp())
shutil.copytree(checkout / "src", tmp / "src")
readme = (ROOT / "README.md").read_text()
recipe = re.search(r"```python\n(.*?)```", readme[readme.index("**open-unlearning**"):], re.S).group(1)
with open(tmp / "src" / "trainer" / "__init__.py", "a") as f:
    f.write("\n" + recipe)
sys.path[:0] = [str(tmp / "src"), str(ROOT)]
warnings.filterwarnings("ignore")
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
import trainer as T
from data.unlearn import ForgetRetainDataset
import gefx
print("transformers", transformers.__version__, "gefx", gefx.__file__)
print("registry:", sorted(T.TRAINER_REGISTRY))

def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()

def item(seed, t=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (t,), generator=g)
    labels = ids.clone(); labels[:3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones(t, dtype=torch.long), "labels": labels}

def collate(items):
    def stack(xs):
        return {k: stack([x[k] for x in xs]) for k in xs[0]} if isinstance(xs[0], dict) else torch.stack(xs)
    return stack(items)

ARGS = {"GradAscent": {}, "GradDiff": {}, "NPO": {"beta": 0.5}, "SimNPO": {}, "DPO": {"beta": 0.5},
        "RMU": {"module_regex": r"model\.layers\.1", "trainable_params_regex": [r".*"], "steering_coeff": 2,
                "retain_loss_type": "EMBED_DIFF"},
        "RMU (partial)": {"module_regex": r"model\.layers\.1",
                          "trainable_params_regex": [r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"], "steering_coeff": 2,
                          "retain_loss_type": "EMBED_DIFF"},
        "UNDIAL": {}, "CEU": {}, "SatImp": {}, "WGA": {}, "PDU": {}}
out = {}
for label, margs in ARGS.items():
    name = label.split()[0]
    pref = name == "DPO"
    forget = [{"original": item(10 + k), "alternate": item(20 + k)} if pref else item(10 + k) for k in range(4)]
    retain = [item(30 + k) for k in range(4)]
    ds = ForgetRetainDataset(forget, retain)
    res = {}
    for measured in (False, True):
        torch.manual_seed(0)
        base = tiny()
        cls = T.TRAINER_REGISTRY[("Measured" if measured else "") + name]
        args = transformers.TrainingArguments(output_dir=f"{tmp}/out/{label}", per_device_train_batch_size=2,
                                              max_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
                                              use_cpu=True, remove_unused_columns=False, seed=0, logging_steps=1)
        try:
            tr = cls(model=base, args=args, train_dataset=ds, data_collator=collate, evaluators=None,
                     template_args=None, **margs, **({"gefx_every": 1, "gefx_out": None} if measured else {}))
            tr.train()
            res["measured" if measured else "plain"] = [p.detach().clone() for p in base.parameters()]
            if measured:
                first = tr.gefx_records[0][1]
                res["mode"] = tr.gefx_mode
                res["values"] = {r: float(first[r].total) for r in first}
                res["groups"] = first.groups
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            break
    if "error" not in res:
        res["trained_alike"] = all(torch.equal(a, b) for a, b in zip(res.pop("plain"), res.pop("measured")))
    out[label] = res
    print(label, res, flush=True)
(ROOT / "bench" / "out" / "open_unlearning.json").write_text(json.dumps(out, indent=1))
