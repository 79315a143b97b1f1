"""course_lib: the course's from-scratch implementations of vision transformers and
vision-language models, numerically equal to Hugging Face `transformers` and able to load its
pretrained weights (`from_hf`).

The layers, from the bottom up (each imports only from the ones listed before it):
- the shared layer: `layers` (attention, blocks, patch and position embeddings, weight loading),
  `hf` (reading transformers checkpoints), `utils` (devices, seeds, checkpoints, counting),
  `data` (offline datasets), `plot`;
- the training loop: `train` (`fit`, `evaluate`, `extract_features`), with `distributed`
  (DDP/FSDP under torchrun) beside it;
- the model families, side by side, one module each: `vit`, `swin`, `convnext`, `mae`, `dino`,
  `clip`, `qformer`, `flamingo` (with `tinylm`, the small frozen language model of the
  vision-language lectures). A family holds its config, pure functions, modules, `from_hf` and
  size factories (`vit_base()` is ViT-B/16 as in the paper; `vit_scenes()` the course's model);
- `recipes`: what trains and evaluates the families on the course's scenes (losses for `fit`,
  probes, the lectures' measurements), one module per topic.
"""

__version__ = "0.1.0"
