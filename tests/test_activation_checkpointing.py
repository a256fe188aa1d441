"""`train-stage2 --activation-checkpointing`: the same loss and gradients as without it, adapters included
(tiny Llama T3 and a tiny Turbo GPT-2 T3, CPU), through the stage-2 training forward (`Stage2Model`)."""
import pytest
import torch

from tts_core.stage2.model import Stage2Model
from tts_core.t3 import T3, T3Batch, T3Cond, T3Config, TurboT3, enable_activation_checkpointing, pad_sequences
from tts_core.t3 import turbo_config
from tts_core.t3.checkpointing import activation_checkpointing_on

TEXTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [3, 4]]
SPEECH = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [9, 9, 9]]


def _model(cfg: T3Config) -> T3:
    torch.manual_seed(0)
    m = (TurboT3 if cfg.backbone == "gpt2" else T3)(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters: a recompute without the instruction would change the activations
        for a in m.adapters:
            a.adapter.fc2.weight.copy_(torch.randn(a.adapter.fc2.weight.shape, generator=g) * 0.5)
            a.adapter.fc2.bias.copy_(torch.randn(a.adapter.fc2.bias.shape, generator=g) * 0.5)
    return m.train()


def _batch(cfg: T3Config) -> tuple[T3Batch, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    B = len(TEXTS)
    t, tl = pad_sequences(TEXTS)
    s, sl = pad_sequences(SPEECH)
    cond = T3Cond(speaker_emb=torch.randn(B, 256, generator=g),
                  prompt_tokens=torch.randint(0, 6561, (B, 6), generator=g), prompt_lens=torch.tensor([6, 0, 3, 6]),
                  emotion_adv=torch.full((B,), 0.5),
                  instruction_emb=torch.randn(B, cfg.instruction_dim, generator=g),
                  instruction_mask=torch.tensor([True, False, True, True]))
    return T3Batch(t, tl, s, sl, cond), torch.tensor([True, False, True, True])


def _loss_and_grads(cfg: T3Config, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m = _model(cfg)
    if checkpointing:
        enable_activation_checkpointing(m)
        assert activation_checkpointing_on(m) and m.tfmr.config.use_cache is False
    batch, inst = _batch(cfg)
    torch.manual_seed(3)  # dropout (perceiver, GPT-2): the same masks both ways
    loss, _ = Stage2Model(m)(batch, inst)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", [T3Config.preset("tiny"),
                                 turbo_config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                                              intermediate_size=128, instruction_dim=32, adapter_hidden=32,
                                              gpt2_vocab_size=64, text_vocab_size=64, max_position_embeddings=512)],
                         ids=["llama", "turbo-gpt2"])
def test_checkpointing_gives_the_same_loss_and_gradients(cfg):
    loss0, g0 = _loss_and_grads(cfg, checkpointing=False)
    loss1, g1 = _loss_and_grads(cfg, checkpointing=True)
    assert torch.isfinite(loss0) and loss0 > 1.0  # a real CE over 8194 / 6563 classes, not a zero
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert set(g1) == set(g0)
    adapter_grads = [n for n in g0 if ".adapter." in n]
    assert len(adapter_grads) == 4 * (2 * cfg.num_layers + (1 if cfg.adapt_final_norm else 0))  # fc1/fc2 w+b
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
    assert all(float(g0[n].abs().sum()) > 0 for n in adapter_grads)


def test_a_recompute_without_the_adapters_state_is_still_refused():
    m = _model(T3Config.preset("tiny"))
    m.tfmr.activation_checkpointing_enable()  # HF's own switch alone: norms recomputed without the instruction
    batch, inst = _batch(m.cfg)
    with pytest.raises(NotImplementedError, match="enable_activation_checkpointing"):
        Stage2Model(m)(batch, inst)


def test_generation_after_checkpointed_training_uses_the_kv_cache():
    m = _model(T3Config.preset("tiny"))
    enable_activation_checkpointing(m)
    batch, inst = _batch(m.cfg)
    Stage2Model(m)(batch, inst)[0].backward()
    m.eval()  # HF checkpoints only in train mode: generation keeps its cache
    out = m.generate(batch.text_tokens, batch.text_lens, batch.cond, max_new_tokens=3, do_sample=False, raw=True)
    assert [len(r) for r in out] == [3, 3, 3, 3] or all(1 <= len(r) <= 3 for r in out)
