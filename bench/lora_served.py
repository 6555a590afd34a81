"""gefx online against the plain step under PEFT LoRA (the lm_head frozen): llama-10m, B = 16,
T = 128, LoRA r = 16 on q / v / up / down, GA (mean), forget and retain risks; medians of five
alternating steps. ``python bench/lora_served.py LABEL`` (LABEL names the code version in the output).
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import e2e_providers as E, gefx, peft
from gefx.losses import sequence_nll
torch.manual_seed(0)
w = E.Workload("llama-10m", 16, 128, "ga", device=torch.device("cpu"), dtype=torch.float32)
m = peft.get_peft_model(w.model, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights=False))
def step(measure):
    m.zero_grad(set_to_none=True)
    t = time.perf_counter()
    if measure:
        with gefx.trace(m) as tape:
            f = sequence_nll(m(w.f_ids).logits, w.f_lab)
            r = sequence_nll(m(w.r_ids).logits, w.r_lab)
            gefx.g_effect(tape, -f.mean(), {"forget": f, "retain": r}, backward=True)
    else:
        f = sequence_nll(m(w.f_ids).logits, w.f_lab); r = sequence_nll(m(w.r_ids).logits, w.r_lab)
        (-f.mean()).backward()
    return time.perf_counter() - t
step(True); step(False)
ts = {True: [], False: []}
for _ in range(5):
    for mm in (False, True):
        ts[mm].append(step(mm))
med = lambda x: sorted(x)[len(x)//2]
print(sys.argv[1], "plain %.3f gefx %.3f ratio %.2f" % (med(ts[False]), med(ts[True]), med(ts[True]) / med(ts[False])))
