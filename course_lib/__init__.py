"""course_lib: the course's from-scratch implementations of vision transformers and
vision-language models, numerically equal to Hugging Face `transformers` and able to load its
pretrained weights (`from_hf`).

Shared pieces: `layers` (attention, blocks, position embeddings, weight loading), `hf` (reading
transformers checkpoints), `data` (offline datasets), `train` (the training loop), `plot`,
`utils` (devices, seeds, checkpoints), `checks` (lab exercise checks), `labs` (lab generator).
One module per model family: `vit`, `swin`, `convnext`, `mae`, `dino`, `clip`, `qformer`,
`flamingo` (with `tinylm`, the small frozen language model of the vision-language lectures).
"""

__version__ = "0.1.0"
