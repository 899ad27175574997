"""dq's evaluator CLIP: a tiny open_clip model trained on the default pipeline's procedural scenes.

``dq-evaluator-clip.json`` is its open_clip model config and ``dq-evaluator-clip.safetensors``
its weights; ``train_clip.py`` makes them. ``dq.eval.clip.load_clip()`` loads it.
"""
