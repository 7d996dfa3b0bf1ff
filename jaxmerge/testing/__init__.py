"""Tiny models, tokenizers and task data that tests, examples and the toy experiments share.

`toy_world`: the ja_math toy world (character-level English and Japanese text; a base
model, a Japanese and a math fine-tune; Japanese math problems and the sources' own skills
as tasks). `toy_vlm_world`: the ja_vlm toy world (synthetic images of shapes; a base LM, a
Japanese fine-tune and a LLaVA VLM; Japanese questions about images as tasks). Each trains
its models with optax and saves them as Hugging Face checkpoints; seed 0 of each is
shipped, other seeds are built once into the cache (`world_dir`).
"""
