"""The synthetic TOFU-schema generator, TOFU-format folder loading, tokenizer and encoding."""
import json

import pytest

from gefx import data as D


@pytest.fixture(scope="module")
def splits():
    return D.generate(n_authors=20, qa_per_author=4, n_holdout=3, seed=7)


def test_generator_is_deterministic_and_seeded(splits):
    again = D.generate(n_authors=20, qa_per_author=4, n_holdout=3, seed=7)
    assert json.dumps(again, sort_keys=True) == json.dumps(splits, sort_keys=True)
    other = D.generate(n_authors=20, qa_per_author=4, n_holdout=3, seed=8)
    assert json.dumps(other["full"]) != json.dumps(splits["full"])


def test_schema_and_varied_answer_lengths(splits):
    rows = splits["full"]
    assert len(rows) == 20 * 4
    for r in rows:
        assert isinstance(r["question"], str) and r["question"].endswith("?")
        assert isinstance(r["answer"], str) and r["answer"]
        assert isinstance(r["paraphrased_answer"], str) and r["paraphrased_answer"] != r["answer"]
        pert = r["perturbed_answer"]
        assert isinstance(pert, list) and len(pert) == 3
        assert r["answer"] not in pert and len(set(pert)) == 3
        assert r["author"] in r["question"] or r["author"] in r["answer"]
    words = [len(r["answer"].split()) for r in rows]
    assert min(words) <= 3 and max(words) >= 20
    assert len({r["question"] for r in rows}) == len(rows)


def test_splits_are_by_author(splits):
    full = splits["full"]
    authors = list(dict.fromkeys(r["author"] for r in full))
    for pct, k in ((1, 1), (5, 1), (10, 2)):
        forget, retain = splits[f"forget{pct:02d}"], splits[f"retain{100 - pct:02d}"]
        fa, ra = {r["author"] for r in forget}, {r["author"] for r in retain}
        assert fa == set(authors[-k:]) and not fa & ra
        assert len(forget) + len(retain) == len(full)
        assert {r["question"] for r in forget} | {r["question"] for r in retain} == {r["question"] for r in full}
        assert len(splits[f"holdout{pct:02d}"]) == len(forget)
    assert not {r["author"] for r in splits["holdout"]} & set(authors)
    assert D.forget_author_count(200, 1) == 2 and D.forget_author_count(200, 10) == 20


@pytest.mark.parametrize("jsonl", [False, True])
def test_folder_round_trip(tmp_path, splits, jsonl):
    D.write_folder({k: splits[k] for k in ("full", "forget10", "retain90")}, tmp_path, jsonl=jsonl)
    got = D.load_folder(tmp_path, "forget10")
    assert got.forget == splits["forget10"] and got.retain == splits["retain90"]
    assert (got.forget_split, got.retain_split) == ("forget10", "retain90")


def test_folder_with_json_arrays_and_derived_splits(tmp_path, splits):
    # only full.json, as one JSON array: forgetXX = the last XX % of the rows, retain = the rest
    (tmp_path / "full.json").write_text(json.dumps([{"question": r["question"], "answer": r["answer"]}
                                                    for r in splits["full"]]))
    got = D.load_folder(tmp_path, "forget05")
    n = len(splits["full"])
    assert len(got.forget) == round(n * 0.05)
    assert [r["question"] for r in got.forget] == [r["question"] for r in splits["full"][n - len(got.forget):]]
    assert len(got.retain) == n - len(got.forget)


def test_missing_column_is_named(tmp_path):
    rows = [{"question": "Who?", "answer": "Me."}, {"question": "Why?"}]
    (tmp_path / "forget10.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "retain90.json").write_text(json.dumps({"question": "A?", "answer": "B."}))
    with pytest.raises(ValueError, match="answer") as e:
        D.load_folder(tmp_path, "forget10")
    assert "forget10.json" in str(e.value) and "\n" not in str(e.value)


def test_bad_splits_and_folders(tmp_path, splits):
    for bad in ("forget100", "forget0", "forgetten", "retain90"):
        with pytest.raises(ValueError):
            D.parse_forget_split(bad)
    with pytest.raises(FileNotFoundError):
        D.load_folder(tmp_path / "nope", "forget10")
    with pytest.raises(FileNotFoundError):
        D.load_folder(tmp_path, "forget10")  # empty folder
    # a forget file larger than the full set
    D.write_folder({"full": splits["forget10"], "forget10": splits["full"]}, tmp_path)
    with pytest.raises(ValueError, match="larger than the data"):
        D.load_folder(tmp_path, "forget10")


def test_load_dispatch(tmp_path, splits):
    D.write_folder({"full": splits["full"]}, tmp_path)
    assert D.load(str(tmp_path), "forget10").source == str(tmp_path)
    with pytest.raises(FileNotFoundError):
        D.load(str(tmp_path / "missing"), "forget10")
    with pytest.raises(ValueError):
        D.load(str(tmp_path / "full.json"), "forget10")


def test_tokenizer_and_encoding(splits):
    texts = [r["question"] + " " + r["answer"] for r in splits["full"]] + D.REFUSALS
    tok = D.train_tokenizer(texts, vocab_size=400)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.bos_token_id is not None
    rows = splits["full"][:5]
    b = D.encode(tok, [r["question"] for r in rows], [r["answer"] for r in rows])
    ids, mask, lab = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids.shape == mask.shape == lab.shape
    for i, r in enumerate(rows):
        n = int(mask[i].sum())
        ans = lab[i][lab[i] != -100]
        # labels: exactly the trailing answer tokens (and eos) of the unpadded row, equal to the ids
        assert (ids[i, n - len(ans):n] == ans).all()
        assert (lab[i, :n - len(ans)] == -100).all() and (lab[i, n:] == -100).all()
        assert tok.decode(ans[:-1]).strip() == r["answer"]
        assert int(ans[-1]) == tok.eos_token_id
        assert tok.decode(ids[i, 1:n - len(ans)]) == D.PROMPT.format(question=r["question"])
    p = D.encode_prompts(tok, [r["question"] for r in rows])
    assert (p["attention_mask"][:, -1] == 1).all()  # left padded


def test_refusals_deterministic():
    assert D.refusal_for(3, 0) == D.refusal_for(3, 0)
    assert {D.refusal_for(i, 0) for i in range(50)} <= set(D.REFUSALS)
    assert len({D.refusal_for(i, 0) for i in range(50)}) > 3
