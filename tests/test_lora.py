"""course_lib.lora: the wrapped layer starts unchanged, only the factors train, merging keeps the
outputs, and it equals the peft library's LoRA on the same weights (outputs and gradients)."""

import copy

import peft
import pytest
import torch
import transformers  # noqa: F401  (imported unconditionally, as in every test file)
from conftest import report_diff
from torch import nn

from course_lib.llama import Llama, LlamaConfig
from course_lib.lora import LoRALinear, apply_lora, lora_parameters, merge_lora


def tiny_llama() -> Llama:
    return Llama(LlamaConfig(vocab_size=30, dim=32, depth=2, num_heads=4, mlp_dim=48)).eval()


def test_wrapped_layer_starts_unchanged_and_merges():
    base = nn.Linear(12, 7)
    x = torch.randn(4, 12)
    lora = LoRALinear(copy.deepcopy(base), r=3, alpha=6.0)
    assert torch.equal(lora(x), base(x))  # B = 0 at init
    assert lora.lora_A.shape == (3, 12) and lora.lora_B.shape == (7, 3) and lora.scaling == 2.0
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    with torch.no_grad():
        lora.lora_B.normal_()
    assert not torch.allclose(lora(x), base(x))
    report_diff("merged vs unmerged LoRA layer", lora.merge()(x), lora(x), 1e-5)
    with pytest.raises(ValueError, match="rank r=9"):
        LoRALinear(nn.Linear(8, 4), r=9)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(3, 3, 1))


def test_apply_lora_freezes_the_rest_and_reports_typos():
    model = apply_lora(tiny_llama(), ["qkv", "mlp.down"], r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(lora_parameters(model)) == 8
    assert isinstance(model.blocks[1].attn.qkv, LoRALinear) and isinstance(model.blocks[1].mlp.up, nn.Linear)
    with pytest.raises(ValueError, match="qkv"):
        apply_lora(tiny_llama(), ["q_proj"])


@pytest.mark.slow
def test_equal_to_peft_outputs_and_gradients():
    torch.manual_seed(0)
    model = tiny_llama()
    targets = ["qkv", "proj", "gate", "up", "down"]
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=targets, r=4, lora_alpha=12, lora_dropout=0.0))
    ours = apply_lora(copy.deepcopy(model), targets, r=4, alpha=12)
    with torch.no_grad():  # non-zero B everywhere, copied from peft's layers into ours
        for name, m in ref.base_model.model.named_modules():
            if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict):
                m.lora_B["default"].weight.normal_(0, 0.1)
                mine = ours.get_submodule(name)
                mine.lora_A.copy_(m.lora_A["default"].weight)
                mine.lora_B.copy_(m.lora_B["default"].weight)
    assert len([p for p in ref.parameters() if p.requires_grad]) == len(lora_parameters(ours)) == 20
    ids = torch.randint(0, 30, (2, 9))
    out_ref, out_ours = ref(input_ids=ids), ours(ids)
    report_diff("LoRA vs peft: logits", out_ours, out_ref)
    out_ref.square().mean().backward()
    out_ours.square().mean().backward()
    grads_ref, grads_ours = [], []
    for name, m in ref.base_model.model.named_modules():
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict):
            mine = ours.get_submodule(name)
            grads_ref += [m.lora_A["default"].weight.grad.flatten(), m.lora_B["default"].weight.grad.flatten()]
            grads_ours += [mine.lora_A.grad.flatten(), mine.lora_B.grad.flatten()]
    assert len(grads_ours) == 20  # 5 layers x 2 blocks, A and B
    report_diff("LoRA vs peft: gradients of every A and B", torch.cat(grads_ours), torch.cat(grads_ref))
    merged = merge_lora(ours)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    report_diff("merged model vs peft merge_and_unload", merged(ids), ref.merge_and_unload()(ids))
