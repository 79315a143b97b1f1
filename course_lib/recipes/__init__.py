"""Recipes: what trains and evaluates the model families on the course's scenes.

The family modules (`course_lib.vit`, `course_lib.clip`, ...) hold models only: configs, pure
functions, modules, `from_hf` and size factories. Everything that is about the course's own
experiments (augmentations, scene tokenizers, question-answer builders, training steps for `fit`,
metrics) lives here, one module per topic, on top of the families.
"""
