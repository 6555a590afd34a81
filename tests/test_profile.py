"""`gefx profile` end to end on the default fine-tuned model: outputs, the paper's qualitative
findings (sanity), loading real models / data folders, and one-line errors on bad input.

The default model is fine-tuned once and cached ($GEFX_CACHE, default ~/.cache/gefx); the first
session pays ~20-60 s for it, later ones load it.
"""
import csv
import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from gefx import cli, models
from gefx import data as D
from gefx import profile as P
from gefx.integrations import read_records

STEPS = 6


@pytest.fixture(scope="session")
def default():
    model, tok, folder, meta = models.default_model(progress=False)
    return model, tok, folder, meta


@pytest.fixture(scope="session")
def run(default, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    args = P.build_parser().parse_args(["--objectives", "ga,npo,po", "--steps", str(STEPS), "--every", "1",
                                        "--out", str(out), "--no-progress"])
    return P.run(args)


def _totals(rows, objective, risk):
    return [r["value"] for r in sorted(rows, key=lambda r: r["step"])
            if r["objective"] == objective and r["risk"] == risk and r["group"] == "total"]


def _metric(metrics, objective, key):
    return [m[key] for m in sorted(metrics, key=lambda m: m["step"]) if m["objective"] == objective and key in m]


# ------------------------------------------------------------------ sanity (docs/METHOD.md §3)
def test_default_model_memorised_the_forget_answers(default, run):
    _, _, _, meta = default
    assert meta["forget_answer_accuracy"] >= models.DEFAULT_TRAIN["target_accuracy"]
    assert _metric(run["metrics"], "ga", "forget_token_acc")[0] >= models.DEFAULT_TRAIN["target_accuracy"]


def test_ga_unlearning_g_effect_negative_at_first_step(run):
    assert _totals(run["rows"], "ga", "forget")[0] < 0


def test_npo_instance_weights_start_at_one_and_fall(run):
    w = _metric(run["metrics"], "npo", "weight:instance_weight")
    assert len(w) == STEPS
    assert abs(w[0] - 1) < 1e-5          # theta = theta_o at the first step
    assert w[-1] < w[0]
    assert np.mean(w[STEPS // 2:]) < np.mean(w[:STEPS // 2])


def test_po_unlearning_g_effect_starts_negative(run):
    assert _totals(run["rows"], "po", "forget")[0] < 0


def test_unlearning_raises_forget_nll(run):
    for obj in ("ga", "npo"):
        nll = _metric(run["metrics"], obj, "forget_nll")
        assert nll[-1] > nll[0]


# ------------------------------------------------------------------ outputs
def test_records_log_holds_every_measurement(run):
    """records.jsonl, appended as each measurement is made, holds exactly what the report shows."""
    got = read_records(run["out"])
    assert [(r.objective, r.step) for r in got] == [(o, s) for o in ("ga", "npo", "po") for s in range(STEPS)]
    totals = {(r["objective"], r["step"], r["risk"]): r["value"] for r in run["rows"] if r["group"] == "total"}
    assert {(r.objective, r.step, name): e.total for r in got for name, e in r.effects.items()} == totals
    assert all(r.data_rows and r.actual_change for r in got)


def test_csv_json_and_group_sums(run):
    out = run["out"]
    with open(out / "g_effects.csv") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["objective", "step", "risk", "group", "value", "predicted_change", "actual_change"]
        rows = list(reader)
    js = json.loads((out / "g_effects.json").read_text())
    assert len(js["g_effects"]) == len(rows) > 0
    assert {r["objective"] for r in rows} == {"ga", "npo", "po"}
    assert {r["risk"] for r in rows} == {"forget", "retain"}
    groups = defaultdict(float)
    totals = {}
    for r in rows:
        key = (r["objective"], r["step"], r["risk"])
        if r["group"] == "total":
            totals[key] = float(r["value"])
        else:
            groups[key] += float(r["value"])
    assert set(totals) == set(groups) and len(totals) == 3 * STEPS * 2
    for k, v in totals.items():
        assert groups[k] == pytest.approx(v, rel=1e-4, abs=1e-6)
    assert {"embed", "shallow", "middle", "deep", "lm_head"} <= {r["group"] for r in rows}


def test_per_instance_arrays_add_up(run):
    arrs = np.load(run["out"] / "per_instance.npz")
    for obj in ("ga", "npo", "po"):
        steps = arrs[f"{obj}__steps"]
        assert steps.tolist() == list(range(STEPS))
        for risk in ("forget", "retain"):
            tot = np.array(_totals(run["rows"], obj, risk))
            pi = arrs[f"{obj}__{risk}__per_instance"]
            poi = arrs[f"{obj}__{risk}__per_objective_instance"]
            assert pi.shape == poi.shape == (STEPS, 4)
            np.testing.assert_allclose(pi.sum(1), tot, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(poi.sum(1), tot, rtol=1e-4, atol=1e-6)
            assert arrs[f"{obj}__{risk}__per_instance_group"].shape[0::2] == (STEPS, 4)


def test_plots_metrics_and_table(run, capsys):
    out = run["out"]
    for name in ("g_effects.png", "per_instance.png", "weights.png", "metrics.png", "fidelity.png", "tokens.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with open(out / "metrics.csv") as fh:
        m = list(csv.DictReader(fh))
    assert {"forget_nll", "retain_nll", "forget_extraction", "retain_extraction"} <= set(m[0])
    assert len([r for r in m if r["objective"] == "npo"]) == STEPS + 1  # measured steps + final
    lines = run["table"].splitlines()
    assert lines[0].split()[0] == "objective" and [ln.split()[0] for ln in lines[2:]] == ["ga", "npo", "po"]


def test_g_effects_match_per_sample_autograd(default, tmp_path):
    """The main job's numbers (online mode, float32) against an independent replay: a plain float32
    loop (same batches, objective, AdamW) gives each measured step's weights; on a float64 copy of
    them, per-sample risk gradients by autograd one instance at a time and the objective's gradient.
    (The oracle follows the float32 trajectory: AdamW's first steps move each weight by about
    lr * sign(grad), so a float64 trajectory differs wherever a gradient is near zero.)"""
    import copy
    from gefx import objectives as O
    model, tok, folder, _ = default
    args = P.build_parser().parse_args(["--objectives", "ga,npo,gd", "--steps", "3", "--every", "2", "--no-plots",
                                        "--no-progress", "--out", str(tmp_path)])
    res = P.run(args)
    plan = P.make_plan(args, tok, P._load_data(args, folder), "cpu")
    ref = models.frozen_copy(model)
    for spec in ("ga", "npo", "gd"):
        obj, m32 = O.make(spec), copy.deepcopy(model)
        opt = torch.optim.AdamW(m32.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        for step in range(3):
            batches = plan.batches(step)
            before = [p.detach().clone() for p in m32.parameters()]
            refs = {b: O.forward(ref, batches[b]) for b in obj.ref_batches}
            opt.zero_grad()
            obj({b: O.forward(m32, batches[b]) for b in obj.batches}, refs).for_g_effect().sum().backward()
            opt.step()
            if step % 2 == 0:  # the update this step made, from the real optimizer
                delta = torch.cat([(p.detach() - q).flatten() for p, q in zip(m32.parameters(), before)]).double()
                m64 = copy.deepcopy(m32).double()
                with torch.no_grad():
                    for p, q in zip(m64.parameters(), before):
                        p.copy_(q)
                _check_step(res["arrays"], spec, step // 2, obj, m64, models.frozen_copy(ref).double(), batches,
                            delta, copy.deepcopy(m32).double())


def _check_step(arrays, spec, k, obj, m64, ref64, batches, delta, after64):
    from gefx import objectives as O
    from gefx.losses import token_mean_nll
    params = list(m64.parameters())
    cur = {b: O.forward(m64, batches[b]) for b in set(obj.batches) | {"forget", "retain"}}
    refs = {b: O.forward(ref64, batches[b]) for b in obj.ref_batches}
    g_obj = torch.autograd.grad(obj(cur, refs).for_g_effect().sum(), params, retain_graph=True)
    for risk in ("forget", "retain"):
        vec = token_mean_nll(cur[risk].logits, cur[risk].labels)
        expected = torch.stack([sum((g * h).sum() for g, h in zip(
            torch.autograd.grad(vec[i], params, retain_graph=True), g_obj)) for i in range(len(vec))])
        got = torch.as_tensor(arrays[f"{spec}__{risk}__per_instance"][k])
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (spec, k, risk, got, expected)
        # predicted change: <grad r_i, delta theta> for the update the real AdamW step made
        predicted = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(vec[i], params, retain_graph=True)])
                                 @ delta for i in range(len(vec))])
        got = torch.as_tensor(arrays[f"{spec}__{risk}__predicted_change"][k])
        assert (got - predicted).abs().max() <= 1e-3 * predicted.abs().max(), (spec, k, risk, got, predicted)
        # actual change: the risk re-evaluated after the step
        with torch.no_grad():
            out = O.forward(after64, batches[risk])
            actual = token_mean_nll(out.logits, out.labels) - vec.detach()
        got = torch.as_tensor(arrays[f"{spec}__{risk}__actual_change"][k])
        assert (got - actual).abs().max() <= 1e-3 * actual.abs().max() + 1e-6, (spec, k, risk, got, actual)


def _greedy_fractions(model, tok, rows) -> list[float]:
    """Independently of gefx: generate token by token and compare with each gold answer."""
    fracs = []
    for r in rows:
        prompt = D.encode_prompts(tok, [r["question"]])
        gold = tok(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        gen = model.generate(**prompt, max_new_tokens=len(gold), do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)[0, prompt["input_ids"].shape[1]:]
        k = 0
        while k < len(gold) and k < len(gen) and int(gen[k]) == gold[k]:
            k += 1
        fracs.append(k / len(gold))
    return fracs


def test_extraction_equals_greedy_generation(default):
    model, tok, folder, _ = default
    rows = D.load_folder(folder, "forget10").forget[:8]
    # damage the model so that greedy answers are partly wrong: how much noise that takes depends on
    # the fine-tune, which differs between CPUs, so the scale grows until they are
    for scale in (0.08, 0.15, 0.3, 0.6):
        noisy = models.frozen_copy(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
        fracs = _greedy_fractions(noisy, tok, rows)
        if 0 < np.mean(fracs) < 1:
            break
    assert 0 < np.mean(fracs) < 1, f"no noise scale left the answers partly right: {fracs}"
    enc = P.Rows(tok, [r["question"] for r in rows], [r["answer"] for r in rows], 512, "cpu")
    got = P.evaluate(noisy, enc)["extraction"]
    assert got == pytest.approx(np.mean(fracs), abs=1e-6)


# ------------------------------------------------------------------ real models and data
def test_save_pretrained_model_loads_via_model_flag(default, tmp_path, capsys):
    model, tok, _, _ = default
    mdir = tmp_path / "my model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    out = tmp_path / "out"
    rc = cli.main(["profile", "--model", str(mdir), "--objectives", "ga", "--steps", "2", "--no-plots",
                   "--no-progress", "--forget-split", "forget05", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "g_effects.json").read_text())["meta"]
    assert meta["model"] == str(mdir) and meta["n_forget"] == 10


def test_tofu_folder_loads_via_data_flag(default, tmp_path):
    splits = D.generate(**models.DEFAULT_DATA)
    folder = tmp_path / "tofu"
    D.write_folder({k: splits[k] for k in ("full", "forget05", "retain95")}, folder)
    out = tmp_path / "out"
    rc = cli.main(["profile", "--data", str(folder), "--forget-split", "forget05", "--objectives", "npo",
                   "--steps", "1", "--no-plots", "--no-progress", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "g_effects.json").read_text())["meta"]
    assert (meta["data"], meta["n_forget"], meta["n_retain"]) == (str(folder), 10, 190)


def test_other_objectives_run(default, tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["profile", "--objectives", "wtnpo,simnpo,dpo,rmu:layer=2,gd,npo+kl:lambda=0.5,wga+rr",
                   "--steps", "2", "--no-progress", "--out", str(out), "--groups", "block"])
    assert rc == 0
    with open(out / "g_effects.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["objective"] for r in rows}) == 7
    assert all(np.isfinite(float(r["value"])) for r in rows)
    assert (out / "per_instance.png").is_file()


# ------------------------------------------------------------------ bad input
def _one_line_error(capsys, argv, *needles):
    rc = cli.main(["profile", *argv, "--no-progress", "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_objective_and_group(capsys, tmp_path):
    _one_line_error(capsys, ["--objectives", "ga,bogus", "--out", str(tmp_path)], "bogus")
    _one_line_error(capsys, ["--objectives", "ga+nope", "--out", str(tmp_path)], "nope")
    _one_line_error(capsys, ["--groups", "layerz", "--out", str(tmp_path)], "layerz")
    _one_line_error(capsys, ["--risks", "forget,holdout", "--out", str(tmp_path)], "holdout")


def test_data_missing_columns(default, capsys, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "full.json").write_text("\n".join(json.dumps({"question": f"Q{i}?", "response": "A."})
                                                for i in range(30)))
    _one_line_error(capsys, ["--data", str(folder), "--out", str(tmp_path / "o")], "answer", "full.json")


def test_model_without_causal_lm_head(capsys, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel
    cfg = DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    DistilBertModel(cfg).save_pretrained(tmp_path / "enc")
    _one_line_error(capsys, ["--model", str(tmp_path / "enc"), "--out", str(tmp_path / "o")], "causal LM")
    _one_line_error(capsys, ["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "o")], "absent")


def test_split_larger_than_data(default, capsys, tmp_path):
    _one_line_error(capsys, ["--forget-split", "forget100", "--out", str(tmp_path)], "larger than the data")
    _one_line_error(capsys, ["--forget-split", "forget01", "--batch-size", "6", "--out", str(tmp_path)],
                    "larger than the forget split")


def test_unwritable_out(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_line_error(capsys, ["--out", str(tmp_path / "afile" / "sub")], "cannot write")


def test_cli_process_exit_status_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gefx", "profile", "--objectives", "unknownobj", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "unknownobj" in r.stderr


def test_retain_eval_whole_set_risk_matches_per_sample_autograd(default, tmp_path):
    """--retain-eval N: the retaining G-effect of step 0 over N retain rows (risk: the token-mean NLL
    over all of them, one instance per row, streamed in batches) against float64 autograd."""
    import copy
    from gefx import objectives as O
    from gefx.losses import token_nll
    model, tok, folder, _ = default
    args = P.build_parser().parse_args(["--objectives", "ga", "--steps", "1", "--retain-eval", "18", "--no-plots",
                                        "--no-progress", "--out", str(tmp_path)])
    res = P.run(args)
    plan = P.make_plan(args, tok, P._load_data(args, folder), "cpu")
    m64 = copy.deepcopy(model).double()
    params = list(m64.parameters())
    obj = O.make("ga")
    g_obj = torch.autograd.grad(obj({"forget": O.forward(m64, plan.batches(0)["forget"])}, None).for_g_effect().sum(),
                                params)
    rows = plan.retain_eval
    b = rows.batch(list(range(rows.n)))
    nll, mask = token_nll(O.forward(m64, b).logits, b["labels"])
    vec = nll.sum(1) / mask.sum()
    expected = torch.stack([sum((g * h).sum() for g, h in zip(torch.autograd.grad(vec[i], params, retain_graph=True),
                                                               g_obj)) for i in range(rows.n)])
    got = torch.as_tensor(res["arrays"]["ga__retain_eval__per_instance"][0])
    assert got.shape == (18,)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert res["arrays"]["ga__retain_eval__predicted_change"].shape == (1, 18)
