"""gefx.check, the self-test for a user's model: its verdicts, its tolerances, and that it can fail."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gefx
from gefx import pieces
from gefx.check import tolerance
import zoo
from helpers import served_live, tiny_model


def test_tiny_llama_every_kind_exact_in_both_modes_and_model_untouched(monkeypatch):
    model = tiny_model("llama", torch.float32).train()
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.get_rng_state()
    served = served_live(monkeypatch)
    report = gefx.check(model)
    assert served.count("a") == 2  # the online modes check a risk served by the step's backward
    assert report.ok and report.dtype == torch.float64  # a float64 copy fits
    assert {r.mode for r in report.rows} == {"eval", "eval+step", "train", "train+step"}
    assert {r.kind for r in report.rows} == {"Embedding", "Linear", "LlamaRMSNorm"}
    assert all(r.status == "exact" and r.error < 1e-12 for r in report.rows)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert torch.equal(torch.get_rng_state(), state)
    assert "ok: every counted parameter exact or refused" in str(report)


class TiedFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return F.linear(torch.tanh(self.mid(self.emb(input_ids))), self.emb.weight)


def test_refused_parameters_are_listed_and_the_rest_measured():
    torch.manual_seed(0)
    report = gefx.check(TiedFunctional().double(), modes=("eval",))
    refused = [r for r in report.rows if r.status == "refused"]
    assert report.ok and {r.kind for r in refused} == {"emb.weight"}
    assert all("F.linear" in r.reason for r in refused)
    exact = [r for r in report.rows if r.status == "exact"]
    assert {r.kind for r in exact} == {"Linear"} and all(r.params == 2 for r in exact)


def test_a_wrong_number_is_reported(monkeypatch):
    """Scaling one parameter's contraction by 1 + 1e-3 (a bug the rule verification cannot see)
    must show as WRONG in float32 and in float64."""
    real = pieces.contract

    def skewed(P, m):
        out = real(P, m)
        return out * (1 + 1e-3) if m.dim() == 1 and m.shape[0] == 16 else out  # the norms' weights

    monkeypatch.setattr("gefx.shards.contract", skewed)
    for float64 in (True, False):
        report = gefx.check(tiny_model("llama", torch.float32), modes=("eval",), float64=float64)
        wrong = [r for r in report.rows if r.status == "WRONG"]
        assert not report.ok and {r.kind for r in wrong} == {"LlamaRMSNorm"}
        assert "NOT OK" in str(report)


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_the_derived_tolerance_and_a_dropped_group_is_not(dtype, family, monkeypatch):
    """16-bit models measured in their own dtype (Gemma: offset norms x * (1 + w)): every entry
    within tol = 4 u_model + 64 u_f32 of S = sum |x y| (gefx.check's docstring gives the
    derivation); the same check fails when one parameter group's contribution is dropped."""
    model = (tiny_model("llama", torch.float32) if family == "llama" else zoo.build("gemma", dtype=torch.float32)).to(dtype)
    report = gefx.check(model, modes=("eval",), float64=False)
    assert report.dtype == dtype and report.tol == tolerance(dtype)
    assert report.ok and all(r.status == "exact" for r in report.rows)
    real = pieces.contract
    monkeypatch.setattr("gefx.shards.contract", lambda P, m: real(P, m) * (0 if m.dim() == 1 else 1))
    assert not gefx.check(model, modes=("eval",), float64=False).ok


def test_tolerances_follow_the_roundoffs():
    assert tolerance(torch.float32) == pytest.approx(4 * 2**-24 + 64 * 2**-24)
    assert tolerance(torch.bfloat16) == pytest.approx(4 * 2**-8 + 64 * 2**-24)
    assert tolerance(torch.float16) == pytest.approx(4 * 2**-11 + 64 * 2**-24)
    assert tolerance(torch.float64) == 1e-6


def test_cli_check_on_a_saved_model(tmp_path):
    tiny_model("qwen2", torch.float32).save_pretrained(tmp_path / "m")
    tok = tmp_path / "m"
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(61)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, pad_token="w0").save_pretrained(tok)
    r = subprocess.run([sys.executable, "-m", "gefx", "check", "--model", str(tok), "--modes", "eval"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Qwen2RMSNorm" in r.stdout and "ok: every counted parameter exact or refused" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "gefx", "check", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no such folder" in bad.stderr
