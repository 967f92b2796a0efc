"""Evaluation: evaluate.py (lm-evaluation-harness tasks scored with our model), harness.py (our lm_eval backend),
callback.py (the same tasks during training), samples.py (samples.txt of an LM run)."""
