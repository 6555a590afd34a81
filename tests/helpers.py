"""Tiny models, batches and the brute-force oracle shared by the engine tests.

The oracle is independent of gefx: one torch.autograd.grad per sample of the per-sample loss,
giving each sample's full flattened gradient, in float64.
"""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 61
FAMILIES = ("llama", "gpt2", "qwen2")


def tiny_model(family: str, dtype=torch.float64, seed: int = 0, layers: int = 2):
    """A random-initialised causal LM from a config: no download."""
    torch.manual_seed(seed)
    if family == "llama":  # grouped-query attention, untied head, RMSNorm
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":  # Conv1D, tied embeddings, LayerNorm with bias, absolute positions
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=64,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    elif family == "qwen2":  # q/k/v biases, untied head
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval()


def batch(b: int, t: int, seed: int, pad: int = 2, question: int = 3):
    """input ids, right-padded attention mask, and labels with question and padding at -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :question] = -100
    for i in range(b):
        n = (i * pad) % (t - question)  # varied padding per row, row 0 unpadded
        if n:
            mask[i, t - n:] = 0
            labels[i, t - n:] = -100
            ids[i, t - n:] = 0
    return ids, mask, labels


def per_sample_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """[B, P]: sample k's full gradient of loss[k] (zeros where a parameter is unused)."""
    rows = []
    for k in range(loss.shape[0]):
        gs = torch.autograd.grad(loss[k], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, params)]))
    return torch.stack(rows).to(torch.float64)


def full_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, params)]).to(torch.float64)


def slices(tape, params: list[torch.Tensor]) -> dict[str, slice]:
    """Canonical parameter name -> its slice in the flattened oracle gradient."""
    out, k = {}, 0
    for p in params:
        out[tape.names[id(p)]] = slice(k, k + p.numel())
        k += p.numel()
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def served_live(monkeypatch) -> list[str]:
    """The names of the risks the step's backward serves as its gradients come (gefx.step.Serving.serve),
    appended as each measurement serves them."""
    from gefx import step as S
    served, serve = [], S.Serving.serve

    def spy(self, *args):
        live = serve(self, *args)
        served.extend(live)
        return live
    monkeypatch.setattr(S.Serving, "serve", spy)
    return served
