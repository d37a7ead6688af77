"""Evaluation, apart from training: retrieval (features, ITM re-rankers, metrics), compositional
swaps, Grad-CAM localisation, test-time occlusion, the Grad-CAM gallery, and the evaluation of a
trained run or any checkpoint under a protocol (``checkpoint.py``)."""
