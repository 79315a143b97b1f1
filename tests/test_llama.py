"""course_lib.llama: RMSNorm, RoPE, SwiGLU, the KV cache, greedy generation, and parity with
transformers' LlamaForCausalLM (in memory and from a save_pretrained folder)."""

import pytest
import torch
import transformers
from conftest import randomize_, report_diff

from course_lib.llama import (
    KVCache,
    Llama,
    LlamaConfig,
    RMSNorm,
    causal_mask_with_past,
    rotary_embedding,
)


def tiny(**kw) -> Llama:
    return Llama(LlamaConfig(vocab_size=40, dim=32, depth=2, num_heads=4, mlp_dim=48, **kw)).eval()


def test_rmsnorm_has_unit_root_mean_square():
    x = torch.randn(3, 5, 16) * 7 + 2
    y = RMSNorm(16, eps=0.0)(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-5)


def test_rotary_scores_depend_only_on_the_distance():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        qm, _ = rotary_embedding(torch.tensor([m]), 8)(q, q)
        _, kn = rotary_embedding(torch.tensor([n]), 8)(k, k)
        return float((qm * kn).sum())

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-6)  # position 0: no rotation


def test_mask_with_past_lets_new_tokens_see_the_cache():
    m = causal_mask_with_past(2, 3)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert causal_mask_with_past(1, 5) is None


def test_llama_is_causal_and_accepts_embeddings():
    model = tiny()
    ids = torch.randint(0, 40, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 40)
    assert torch.allclose(logits, model(inputs_embeds=model.embed(ids)))
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 40
    assert torch.allclose(model(changed)[:, :4], logits[:, :4], atol=1e-6)
    assert not torch.allclose(model(changed)[:, 4:], logits[:, 4:])
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="even width"):
        LlamaConfig(dim=12, num_heads=4)


def test_cached_forward_equals_full_forward_and_generation_agrees():
    model = randomize_(tiny(), std=0.3)
    ids = torch.randint(0, 40, (2, 9))
    full = model(ids)
    cache = KVCache(2)
    first = model(ids[:, :5], cache=cache)
    rest = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(5, 9)], dim=1)
    assert cache.length == 9
    report_diff("KV cache vs full forward", torch.cat([first, rest], dim=1), full, 1e-5)
    with_cache = model.generate(ids, max_new_tokens=12)
    without = model.generate(ids, max_new_tokens=12, use_cache=False)
    print("generated with cache:", with_cache[0].tolist())
    assert with_cache.shape == (2, 12) and torch.equal(with_cache, without)
    assert len(set(with_cache.flatten().tolist())) > 1  # random weights: not one repeated token


def _hf_llama(tie: bool = False) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_theta=500.0,
    )
    return randomize_(transformers.LlamaForCausalLM(config)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_parity_with_transformers_in_memory_and_from_folder(tmp_path, tie):
    ref = _hf_llama(tie)
    ids = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        ref_gen = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 11:]
    ref.save_pretrained(tmp_path)
    for tag, source in (("in memory", ref), ("from folder", str(tmp_path))):
        ours = Llama.from_hf(source).eval()
        assert ours.config.rope_theta == 500.0 and ours.config.tie_embeddings == tie
        with torch.no_grad():
            report_diff(f"Llama tie={tie} {tag}: logits", ours(ids), expected)
        assert torch.equal(ours.generate(ids, max_new_tokens=8), ref_gen)


def test_from_hf_refuses_grouped_query_attention():
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(NotImplementedError, match="grouped-query"):
        Llama.from_hf(transformers.LlamaForCausalLM(config))
